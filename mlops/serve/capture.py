"""Captured inputs: the uploaded bytes of a sampled share of the images the server answered,
kept for labelling and retraining (production data flowing back into the next model).

Where: `serve.capture.url`, a local directory or any fsspec URL (`s3://bucket/prefix`; the
credentials come from the environment, e.g. AWS_*, never from the config). Under it:

    <url>/<YYYY-MM-DD>/<HH>/<request_id>.<ext>   the bytes exactly as uploaded; <ext> from their
                                                 first bytes: png jpg webp bmp gif tif, else bin
    <url>/<YYYY-MM-DD>/<HH>/<request_id>.json    the sidecar, written after the image

Day and hour (UTC) are those of the answer; `request_id` is the one the client got (and sends
back with `/feedback`). The sidecar (`CaptureRecord`) is one JSON object:

    {"request_id": "3f0c...", "time": "2025-05-01T12:00:03.120000+00:00",
     "model": "image-classifier", "model_version": "7", "endpoint": "/predict",
     "content_type": "image/png", "bytes": 1234, "sha256": "9a1e...", "image": "3f0c....png",
     "prediction": "cat", "confidence": 0.93}

A capture is complete once its sidecar exists; an image alone is an interrupted write (counted
in the budget and pruned, never read). Read captures with `read_captures(url, start, end)`:
each `Captured` has the sidecar's fields, the URL of its bytes and `read_bytes()`; sidecars
that cannot be read are reported and skipped.

Which: only images answered (never rejected input), those whose request id `sampled` keeps at
`serve.capture.sample_rate` (a pure function of the id: the same ids at any time, on any
server). `serve.capture.enabled: false` or no URL: nothing is kept.

Off the request path: a request only hands its bytes to `CaptureWriter.offer` (a queue bounded
in bytes, `max_queue_mb`: beyond it the capture is dropped); one thread writes them through
fsspec. A write that fails, a store that cannot be reached, a full queue or a capture that
cannot fit in the budget is counted (`mlops_captures_total{outcome}` on /metrics) and logged at
most once a minute per kind (the URL without credentials, never image bytes); the request has
its answer already.

Retention, as for request records: the store holds at most `max_mb` (a running total, checked
before each write: the oldest captures go first, hour by hour) and nothing from an hour older
than `max_age_days` (checked every minute). The total starts from a listing of the store and
is listed again every 10 minutes, so servers sharing a store see each other's captures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mlops.config.serve import CaptureConfig
from mlops.serve.records import Time, is_local, redact, store_of, validation_problem

log = logging.getLogger(__name__)

OUTCOMES = ("stored", "sampled_out", "dropped_queue_full", "dropped_budget", "failed")
PRUNE_EVERY_S = 60.0  # the age limit is checked this often
RESCAN_EVERY_S = 600.0  # the store is listed again this often (other servers' captures)
LOG_EVERY_S = 60.0  # a kind of problem is logged at most this often
CAPTURE_URL = "serve.capture.url"  # what errors about the store name
REQUEST_ID = r"[A-Za-z0-9_-]{1,64}"  # a request id as captures store it: their file names
KEY = re.compile(rf"(?P<day>\d{{4}}-\d{{2}}-\d{{2}})/(?P<hour>\d{{2}})/(?P<id>{REQUEST_ID})\.(?P<ext>[a-z]{{3,4}})")
MAGIC = (  # first bytes -> suffix, for the formats the server may be configured to read
    (b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
    (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
)


# -- the rules ------------------------------------------------------------------------------


def sampled(request_id: str, rate: float) -> bool:
    """Whether the request `request_id` is captured at `rate` (0..1): a hash of the id against
    the rate, so the same ids are kept every time (rate 0: none, rate 1: all)."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64


def image_suffix(data: bytes) -> str:
    """The file suffix of an image by its first bytes (".bin" when none of ours)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in MAGIC if data.startswith(magic)), ".bin")


def capture_key(when: datetime, request_id: str) -> str:
    """The path of a capture under the store, without its suffix: "<YYYY-MM-DD>/<HH>/<request id>"."""
    return f"{when.astimezone(UTC):%Y-%m-%d/%H}/{request_id}"


def to_free(sizes: Iterable[int], total: int, incoming: int, max_bytes: int) -> int | None:
    """How many of the oldest captures (`sizes`, oldest first) must go so that `incoming` more
    bytes fit in `max_bytes` beside `total`; None when they cannot fit at all."""
    if incoming > max_bytes:
        return None
    count = 0
    for size in sizes:
        if total + incoming <= max_bytes:
            break
        total -= size
        count += 1
    return count if total + incoming <= max_bytes else None


@dataclass(frozen=True)
class Stored:
    """A capture in the store: its files and their bytes."""

    key: str  # "<YYYY-MM-DD>/<HH>/<request id>"
    paths: tuple[str, ...]
    size: int

    @property
    def hour(self) -> str:
        return self.key[:13]  # "YYYY-MM-DD/HH"


def index_of(root: str, listing: dict[str, dict]) -> list[Stored]:
    """The captures in a store listing (`fs.find(root, detail=True)`), oldest hour first; files
    that are not laid out as captures are left out (and never deleted)."""
    found: dict[str, tuple[list[str], int]] = {}
    for path, info in listing.items():
        match = KEY.fullmatch(path[len(root) + 1:]) if path.startswith(root + "/") else None
        if match and info.get("type", "file") == "file":
            key = f"{match['day']}/{match['hour']}/{match['id']}"
            paths, size = found.get(key, ([], 0))
            found[key] = ([*paths, path], size + int(info.get("size") or 0))
    return [Stored(key, tuple(sorted(paths)), size) for key, (paths, size) in sorted(found.items())]


def expired(index: Iterable[Stored], now: datetime, max_age: timedelta) -> int:
    """How many of the oldest captures are from an hour older than `max_age` (as records are pruned)."""
    cutoff = (now - max_age).astimezone(UTC).strftime("%Y-%m-%d/%H")
    count = 0
    for stored in index:
        if stored.hour >= cutoff:
            break
        count += 1
    return count


# -- writing --------------------------------------------------------------------------------


@dataclass
class Pending:
    key: str
    data: bytes
    record: dict


class Throttled:
    """Logs each kind of problem at most once per `every_s`, with how many happened since."""

    def __init__(self, every_s: float = LOG_EVERY_S):
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str) -> None:
        with self._lock:
            self._since[kind] = self._since.get(kind, 0) + 1
            now = time.monotonic()
            if now - self._last.get(kind, -math.inf) < self.every_s:
                return
            count, self._since[kind], self._last[kind] = self._since[kind], 0, now
        log.warning("%s (%d time(s) since the last report of this kind)", message, count)


class CaptureWriter:
    """Keeps the bytes of sampled requests in a store (see the module's docstring for the layout).

    `offer` is what a request calls: it never blocks on the store, never raises for it. A thread
    does the writing, the budget and the retention. `counts()` and `stored_bytes` are what
    /metrics reports.
    """

    def __init__(
        self, url: str, sample_rate: float, max_mb: float, max_age_days: float, max_queue_mb: float = 16.0,
        start: bool = True,
    ):
        self.fs, self.root = store_of(url, CAPTURE_URL)
        self.url, self.sample_rate = redact(url), sample_rate
        self.max_bytes, self.max_age = int(max_mb * 2**20), timedelta(days=max_age_days)
        self.max_queue_bytes = int(max_queue_mb * 2**20)
        self.stored_bytes = 0  # in the store, as this server knows it
        self._index: deque[Stored] = deque()  # oldest first
        self._queue: deque[Pending] = deque()
        self._queued_bytes, self._stopping = 0, False
        self._writing = start  # until the store is listed
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._changed = threading.Condition()  # the queue, the counts and the flags
        self._logs = Throttled()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        if start:
            self._thread.start()

    @classmethod
    def from_config(cls, config: CaptureConfig) -> CaptureWriter | None:
        """The writer `serve.capture` asks for, or None (and why, in the log) when it asks for none."""
        if not config.enabled:
            log.info("capture is off (serve.capture.enabled is false)")
            return None
        if config.url is None:
            log.info("capture is off: serve.capture.url is not set (the deploy flow sets it)")
            return None
        writer = cls(config.url, config.sample_rate, config.max_mb, config.max_age_days, config.max_queue_mb)
        log.info("capturing %.0f%% of answered images to %s (at most %.0f MB, %.0f days)",
                 100 * config.sample_rate, writer.url, config.max_mb, config.max_age_days)
        return writer

    # -- the request side (the event loop) --

    def offer(
        self, request_id: str, data: bytes, *, model: str, model_version: str, endpoint: str, content_type: str,
        prediction: str, confidence: float,
    ) -> str:
        """Queue the bytes of an answered request if its id is sampled; returns the outcome so far
        ("queued", "sampled_out" or "dropped_queue_full")."""
        if not sampled(request_id, self.sample_rate):
            self._count("sampled_out")
            return "sampled_out"
        now = datetime.now(UTC)
        record = {
            "request_id": request_id, "time": now.isoformat(), "model": model, "model_version": model_version,
            "endpoint": endpoint, "content_type": content_type, "bytes": len(data),
            "prediction": prediction, "confidence": confidence,
        }
        with self._changed:
            if self._stopping or self._queued_bytes + len(data) > self.max_queue_bytes:
                self._counts["dropped_queue_full"] += 1
                full = True
            else:
                self._queue.append(Pending(capture_key(now, request_id), data, record))
                self._queued_bytes += len(data)
                self._changed.notify_all()
                full = False
        if full:
            self._logs.warning("dropped_queue_full", f"capture queue full ({self.max_queue_bytes} bytes): a capture was dropped")
            return "dropped_queue_full"
        return "queued"

    def counts(self) -> dict[str, int]:
        with self._changed:
            return dict(self._counts)

    def _count(self, outcome: str) -> None:
        with self._changed:
            self._counts[outcome] += 1

    # -- the writer thread --

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until the store is listed and everything queued written (or dropped); False if that
        took over `timeout_s`."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._queue and not self._writing, timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (for at most `timeout_s`), then stop taking captures."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        self._rescan()
        with self._changed:
            self._writing = False
            self._changed.notify_all()
        last_prune = last_scan = time.monotonic()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._stopping, timeout=1.0)
                if not self._queue and self._stopping:
                    return
                item = self._queue.popleft() if self._queue else None
                if item is not None:
                    self._queued_bytes -= len(item.data)
                    self._writing = True
            if item is not None:
                self._store(item)
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()
            if time.monotonic() - last_scan >= RESCAN_EVERY_S:
                last_scan = last_prune = time.monotonic()
                self._rescan()
            elif time.monotonic() - last_prune >= PRUNE_EVERY_S:
                last_prune = time.monotonic()
                self._prune_expired()

    def _store(self, item: Pending) -> None:
        suffix = image_suffix(item.data)
        name = item.key.rsplit("/", 1)[1] + suffix
        sidecar = json.dumps(
            item.record | {"sha256": hashlib.sha256(item.data).hexdigest(), "image": name}, separators=(",", ":")
        ).encode()
        size = len(item.data) + len(sidecar)
        if not self._make_room(size):
            self._count("dropped_budget")
            self._logs.warning("dropped_budget", f"capture of {size} bytes does not fit in the budget of {self.max_bytes} "
                                                 f"bytes under {self.url}: dropped")
            return
        base = f"{self.root}/{item.key}"
        paths = (base + suffix, base + ".json")
        try:
            if is_local(self.fs):
                self.fs.makedirs(base.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(paths[0], item.data)
            self.fs.pipe_file(paths[1], sidecar)
        except Exception as error:  # noqa: BLE001 - any store failure is counted, never raised
            self._count("failed")
            self._logs.warning("failed", f"cannot write a capture under {self.url}: {self._problem(error)}")
            self._delete(paths, quiet=True)
            return
        self._index.append(Stored(item.key, paths, size))
        self.stored_bytes += size
        self._count("stored")

    def _make_room(self, size: int) -> bool:
        """Delete the oldest captures until `size` more bytes fit; False when they cannot."""
        count = to_free((stored.size for stored in self._index), self.stored_bytes, size, self.max_bytes)
        if count is None:
            return False
        return self._drop_oldest(count)

    def _prune_expired(self) -> None:
        self._drop_oldest(expired(self._index, datetime.now(UTC), self.max_age))

    def _drop_oldest(self, count: int) -> bool:
        for _ in range(count):
            if not self._delete(self._index[0].paths):
                return False
            self.stored_bytes -= self._index.popleft().size
        return True

    def _delete(self, paths: Iterable[str], quiet: bool = False) -> bool:
        for path in paths:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:  # never written, or pruned by another server sharing the store
                pass
            except Exception as error:  # noqa: BLE001
                if not quiet:
                    self._logs.warning("delete", f"cannot delete an old capture under {self.url}: {self._problem(error)}")
                return False
        if is_local(self.fs):  # no empty hour and day folders left behind
            folder = next(iter(paths)).rsplit("/", 1)[0]
            for path in (folder, folder.rsplit("/", 1)[0]):
                try:
                    os.rmdir(path)
                except OSError:
                    break
        return True

    def _rescan(self) -> None:
        """Take the index and the running total from a listing of the store; then enforce the limits."""
        try:
            listing = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            listing = {}
        except Exception as error:  # noqa: BLE001 - an unreachable store: keep what is known
            self._logs.warning("list", f"cannot list the captures under {self.url}: {self._problem(error)}")
            return
        self._index = deque(index_of(self.root, listing))
        self.stored_bytes = sum(stored.size for stored in self._index)
        self._prune_expired()
        self._make_room(0)

    @staticmethod
    def _problem(error: Exception) -> str:
        return redact(f"{type(error).__name__}: {error}")[:300]


class CaptureMetrics:
    """A Prometheus collector for a writer's counts, read when /metrics is scraped:
    `mlops_captures_total{outcome}` and `mlops_capture_stored_bytes`."""

    def __init__(self, writer: CaptureWriter):
        self.writer = writer

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        outcomes = CounterMetricFamily("mlops_captures", "Answered images by capture outcome (serve.capture)", labels=["outcome"])
        for outcome, count in self.writer.counts().items():
            outcomes.add_metric([outcome], count)
        yield outcomes
        yield GaugeMetricFamily(
            "mlops_capture_stored_bytes", "Bytes of captures in the store, as this server knows it", value=self.writer.stored_bytes
        )


# -- reading --------------------------------------------------------------------------------


class CaptureRecord(BaseModel):
    """A capture's sidecar, as `CaptureWriter` writes it."""

    model_config = ConfigDict(extra="allow")

    request_id: str = Field(pattern=f"^{REQUEST_ID}$")
    time: Time
    model: str
    model_version: str
    endpoint: str
    content_type: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    image: str = Field(pattern=rf"^{REQUEST_ID}\.[a-z]{{3,4}}$")
    prediction: str
    confidence: float = Field(ge=0.0, le=1.0)


@dataclass(frozen=True)
class Captured:
    """One captured request: what answered it and where its bytes are."""

    request_id: str
    time: datetime  # UTC
    model: str
    model_version: str
    endpoint: str
    content_type: str
    bytes: int
    sha256: str
    prediction: str
    confidence: float
    image_url: str  # fsspec URL of the bytes: fsspec.open(image_url, "rb")

    def read_bytes(self) -> bytes:
        import fsspec

        with fsspec.open(self.image_url, "rb") as handle:
            return handle.read()


@dataclass
class Captures:
    captured: list[Captured]  # by time
    unreadable: list[str]  # "path: reason"; the files are left as they are

    def __iter__(self) -> Iterator[Captured]:
        return iter(self.captured)

    def __len__(self) -> int:
        return len(self.captured)


def read_captures(url: str, start: datetime | None = None, end: datetime | None = None) -> Captures:
    """The captures under `url` with start <= time < end (aware datetimes; None: unbounded), by
    time. Sidecars that cannot be read or are not valid (`CaptureRecord`), and those whose image
    is missing, are reported as "path: reason" and skipped, never fatal."""
    fs, root = store_of(url, CAPTURE_URL)
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    first = start.astimezone(UTC).strftime("%Y-%m-%d/%H") if start else ""
    last = end.astimezone(UTC).strftime("%Y-%m-%d/%H") if end else "9999"
    captured, unreadable = [], []
    for stored in index_of(root, listing):
        if not first <= stored.hour <= last:
            continue
        sidecar = f"{root}/{stored.key}.json"
        if sidecar not in stored.paths:
            continue  # an interrupted write: its image alone
        try:
            record = CaptureRecord.model_validate_json(fs.cat_file(sidecar))
        except ValidationError as error:
            unreadable.append(f"{fs.unstrip_protocol(sidecar)}: invalid capture record: {validation_problem(error)}")
            continue
        except Exception as error:  # noqa: BLE001 - an unreadable file is reported, never fatal
            unreadable.append(f"{fs.unstrip_protocol(sidecar)}: {type(error).__name__}: {error}")
            continue
        image = f"{root}/{stored.key.rsplit('/', 1)[0]}/{record.image}"
        if image not in stored.paths or record.request_id != stored.key.rsplit("/", 1)[1]:
            unreadable.append(f"{fs.unstrip_protocol(sidecar)}: its image {record.image} is not beside it")
            continue
        stamp = record.time.astimezone(UTC)
        if (start and stamp < start) or (end and stamp >= end):
            continue
        captured.append(Captured(
            record.request_id, stamp, record.model, record.model_version, record.endpoint, record.content_type,
            record.bytes, record.sha256, record.prediction, record.confidence, fs.unstrip_protocol(image),
        ))
    return Captures(sorted(captured, key=lambda c: c.time), unreadable)
