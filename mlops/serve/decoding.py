"""Untrusted image bytes to a small image, within a memory budget.

A 113 KB PNG can hold 40 M black pixels (160 MB decoded), so the server never trusts the size of
the bytes: it reads the header first, refuses what is over `serve.max_pixels`, and decodes only
while the decoded bytes of all concurrent decodes fit in `serve.max_decode_mb` (a decode waits
for room, or is refused when it could never fit). JPEGs are decoded at a reduced scale in the
DCT domain (`Image.draft`) and every image is shrunk by a whole factor right after decoding, so
nothing at full size outlives the decode. Freed memory goes back to the operating system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mlops.serve.inference import shrink

# bytes per pixel as Pillow stores a decoded image (RGB takes 4)
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4}
DIRECT = ("L", "RGB")  # modes shrunk as they are; others are converted to RGB first
TRIM_AFTER = 32 * 2**20  # give the heap back after a decode this large
# an image of at most this many pixels may be decoded on the server's event loop, outside the
# budget: one at a time there, it holds at most ~2 MB, in about a tenth of a millisecond
INLINE_PIXELS = 512 * 512
# serve.max_pixels is the limit; Pillow's warning above its own (larger) one is noise
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


class BadInput(Exception):
    """A client error: HTTP status, a short kind for metrics and records, and what is wrong."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail
        self.request_id: str | None = None


class ByteBudget:
    """At most `limit` bytes held at once across threads; a holder waits up to `wait_s` for room."""

    def __init__(self, limit: int, wait_s: float):
        self.limit, self.wait_s, self.used = limit, wait_s, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int, what: str) -> Iterator[None]:
        if nbytes > self.limit:
            raise BadInput(413, "image_too_large", f"{what} needs {nbytes / 2**20:.0f} MB to decode, over"
                           f" the server's limit of {self.limit / 2**20:.0f} MB (serve.max_decode_mb)")
        with self._changed:
            if not self._changed.wait_for(lambda: self.used + nbytes <= self.limit, self.wait_s):
                raise BadInput(503, "busy", "the server is decoding too many large images: retry later")
            self.used += nbytes
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # shrunk: both sides at least the size asked for (2 x, unless a JPEG), or as decoded
    width: int  # of the original
    height: int


def decode_cost(mode: str, width: int, height: int) -> int:
    """Bytes held at the peak of decoding and shrinking an image of this mode and size."""
    pixels = width * height
    stored = BYTES_PER_PIXEL.get(mode, 4)
    converted = 0 if mode in DIRECT else 4  # a full-size RGB copy before shrinking
    return pixels * (stored + converted) + pixels  # + the shrunk copy, at most a quarter of RGB


def small(data: bytes) -> bool:
    """Whether the header of `data` says at most INLINE_PIXELS (False for what cannot be opened:
    the decode in a thread words the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # noqa: BLE001 - not ours to judge here
        return False
    return width * height <= INLINE_PIXELS


def decode(data: bytes, formats: tuple[str, ...], max_pixels: int, budget: ByteBudget | None, size: int) -> Decoded:
    """Open `data` as one of `formats`, decode it within `budget` (None: a `small` image) and
    shrink it towards `size` px."""
    if not data:
        raise BadInput(400, "empty_image", "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as error:  # Pillow's own limit, far above ours
        raise BadInput(413, "image_too_large", f"{error}"[:200]) from None
    except UnidentifiedImageError:
        raise BadInput(
            422, "not_an_image", f"the bytes are not an image in a format the server reads ({', '.join(formats)})"
        ) from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is the input's fault
        raise BadInput(422, "corrupt_image", f"cannot read the image: {error}"[:200]) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(413, "image_too_large", f"{width}x{height} pixels exceeds the limit of {max_pixels} (serve.max_pixels)")
    image.draft("RGB", (size, size))  # JPEG: at 1/2, 1/4 or 1/8 scale, both sides still >= size; others: no-op
    cost = decode_cost(image.mode, *image.size)
    with budget.hold(cost, f"a {width}x{height} {image.format} image") if budget else nullcontext():
        try:
            image.load()
            image = shrink(image, size)
            image.load()
        except Exception as error:  # noqa: BLE001
            raise BadInput(422, "corrupt_image", f"truncated or corrupt image: {error}"[:200]) from None
    if cost >= TRIM_AFTER:
        return_memory()
    return Decoded(image, width, height)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


LIBC = _libc()
M_MMAP_THRESHOLD = -3


def configure_allocator() -> None:
    """Serve every allocation over 1 MB from its own mapping, returned whole when freed.

    glibc otherwise raises its threshold after the first large free, and 300 MB of decoded
    pixels then stay in the heaps of the decoding threads long after the request ended.
    """
    if LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, 2**20)


def return_memory() -> None:
    if LIBC is not None:
        LIBC.malloc_trim(0)
