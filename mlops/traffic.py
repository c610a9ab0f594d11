"""Replay an image folder against a running model server, optionally drifted, optionally labelled.

    python -m mlops.traffic --url http://127.0.0.1:8100 \\
        --images workspace/dvc/datasets/digits/test --requests 500 --drift brightness --feedback-share 0.3

For demos and tests of monitoring: the images (one sub-folder per class) go to `POST /predict`
as raw PNG bodies, corrupted to simulate input drift (`brightness`, `noise`, `blur`, `jpeg`, `rotation`) or drawn
with a shifted class mix (`class_mix`); a share of the answered requests then gets its true
label through `POST /feedback`. The same seed sends the same images with the same corruption.
"""

from __future__ import annotations

import argparse
import io
import json
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from PIL import Image, ImageFilter

from mlops.clients import auth_headers, in_threads, predict
from mlops.config import secret
from mlops.data.layout import IMAGE_SUFFIXES, scan_classes

DRIFTS = ("none", "brightness", "noise", "blur", "jpeg", "rotation", "class_mix")
CLASS_MIX_SHARE = 0.8  # share of the requests drawn from the target class under `class_mix`

T = TypeVar("T")


# -- corruption ----------------------------------------------------------------------------


def corrupt(image: Image.Image, drift: str, strength: float, rng: np.random.Generator) -> Image.Image:
    """The image with `drift` applied at `strength` (0: none, 1: strong).

    brightness lifts every pixel by up to 160 of 255 levels, noise adds gaussian noise (sigma up
    to 64 levels), blur applies a Gaussian blur (radius up to 2 px of a 64 px thumbnail, the
    scale monitoring measures features at), jpeg re-encodes at a quality from 95 down to 5,
    rotation turns by up to 45 degrees (the corners filled black); none and class_mix return
    the image unchanged.
    """
    if drift not in DRIFTS:
        raise ValueError(f"unknown drift '{drift}': use one of {', '.join(DRIFTS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} is outside [0, 1]")
    if drift in ("none", "class_mix") or strength == 0.0:
        return image
    base = image.convert("L" if image.mode in ("1", "L") else "RGB")
    if drift == "blur":
        radius = 2.0 * strength * max(1.0, max(base.size) / 64.0)
        return base.filter(ImageFilter.GaussianBlur(radius))
    if drift == "jpeg":
        buffer = io.BytesIO()
        base.save(buffer, "JPEG", quality=round(95 - 90 * strength))
        with Image.open(buffer) as decoded:
            return decoded.convert(base.mode)
    if drift == "rotation":
        return base.rotate(45.0 * strength, resample=Image.BILINEAR, fillcolor=0)
    pixels = np.asarray(base, dtype=np.float32)
    if drift == "brightness":
        pixels = pixels + 160.0 * strength
    else:  # noise
        pixels = pixels + rng.normal(0.0, 64.0 * strength, pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode=base.mode)


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- images --------------------------------------------------------------------------------


def load_images(root: Path) -> list[tuple[Path, str]]:
    """(path, class name) of every image under `root/<class>/`, sorted by class, then path."""
    found = scan_classes(root, nested=False, suffixes=IMAGE_SUFFIXES)
    if not found:
        raise ValueError(f"{root}: no class folders (expected one sub-folder of images per class)")
    images = [(path, name) for name, paths in found.items() for path in paths]
    if not images:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return images


def _cycle(items: Sequence[T], count: int, rng: np.random.Generator) -> list[T]:
    """`count` items: shuffled passes over `items`, so each is used about equally often."""
    picked: list[T] = []
    while len(picked) < count:
        picked.extend(items[i] for i in rng.permutation(len(items)))
    return picked[:count]


def pick_images(
    images: list[tuple[Path, str]],
    requests: int | None = None,
    drift: str = "none",
    seed: int = 0,
    class_mix_target: str | None = None,
) -> list[tuple[Path, str]]:
    """The images replay sends, in order: `requests` of them (default: each once), from `seed`.

    Under `class_mix`, round(80%) of them come from `class_mix_target` (default: the first
    class) and the rest from the other classes.
    """
    if not images:
        raise ValueError("no images to replay")
    if drift not in DRIFTS:
        raise ValueError(f"unknown drift '{drift}': use one of {', '.join(DRIFTS)}")
    count = len(images) if requests is None else requests
    if count < 0:
        raise ValueError(f"requests must be >= 0, got {count}")
    rng = np.random.default_rng(seed)
    if drift != "class_mix":
        if class_mix_target is not None:
            raise ValueError(f"class_mix_target only applies to drift 'class_mix', not '{drift}'")
        return _cycle(images, count, rng)
    classes = sorted({label for _, label in images})
    target = classes[0] if class_mix_target is None else class_mix_target
    if target not in classes:
        raise ValueError(f"class_mix_target '{target}' is not one of the classes {classes}")
    inside = [item for item in images if item[1] == target]
    outside = [item for item in images if item[1] != target]
    from_target = count if not outside else round(CLASS_MIX_SHARE * count)
    picked = _cycle(inside, from_target, rng) + _cycle(outside, count - from_target, rng)
    return [picked[i] for i in rng.permutation(len(picked))]


# -- replay --------------------------------------------------------------------------------


@dataclass
class Answer:
    """One replayed request: what was sent and what came back (status 0: no HTTP answer)."""

    path: Path
    label: str
    status: int
    request_id: str | None = None
    prediction: str | None = None
    feedback: bool = False  # the server accepted this request's true label


@dataclass
class ReplayResult:
    sent: int
    ok: int
    errors: int  # predict requests without a 200 answer, connection failures included
    feedback_sent: int  # feedback labels the server accepted (202)
    feedback_errors: int
    predictions: dict[str, int]
    accuracy: float  # share of ok answers predicting the true label (0 when none is ok)
    elapsed_s: float
    answers: list[Answer] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        mix = ", ".join(f"{name}: {count}" for name, count in self.predictions.items()) or "none"
        return (
            f"sent {self.sent} in {self.elapsed_s:.1f} s: {self.ok} ok, {self.errors} errors, "
            f"{self.feedback_sent} feedback labels ({self.feedback_errors} refused), "
            f"accuracy {self.accuracy:.3f}; predictions {mix}"
        )


def replay(
    url: str,
    images: list[tuple[Path, str]],
    *,
    requests: int | None = None,
    drift: str = "none",
    strength: float = 0.8,
    feedback_share: float = 0.0,
    concurrency: int = 4,
    token: str | None = None,
    seed: int = 0,
    class_mix_target: str | None = None,
    timeout_s: float = 30.0,
    verify: ssl.SSLContext | str | bool = True,
    progress: Callable[[], object] | None = None,
) -> ReplayResult:
    """Send the picked images (see `pick_images`) to `POST {url}/predict`, corrupted by `drift`.

    Then `POST {url}/feedback` the true label of round(feedback_share x ok) answered requests,
    chosen from `seed`. Failures are counted, never raised. `verify`: an https server's
    certificate check (httpx's argument, e.g. `LiveServer.verify`); `progress()` is called after
    each predict request (from the client threads).
    """
    if not 0.0 <= feedback_share <= 1.0:
        raise ValueError(f"feedback_share {feedback_share} is outside [0, 1]")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength {strength} is outside [0, 1]")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    url = url.rstrip("/")
    picked = pick_images(images, requests, drift, seed, class_mix_target)
    headers = auth_headers(token)

    def send(client: httpx.Client, index: int, item: tuple[Path, str]) -> Answer:
        path, label = item
        try:
            with Image.open(path) as image:
                image.load()
                body = encode_png(corrupt(image, drift, strength, np.random.default_rng([seed, index])))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from error
        reply = predict(client, url, body, headers)
        if progress is not None:
            progress()
        return Answer(path, label, reply.status, reply.request_id, reply.prediction)

    def feedback(client: httpx.Client, _: int, answer: Answer) -> None:
        try:
            response = client.post(url + "/feedback", json={"request_id": answer.request_id, "label": answer.label}, headers=headers)
            answer.feedback = response.status_code == 202
        except httpx.HTTPError:
            answer.feedback = False

    started = time.perf_counter()
    answers = in_threads(picked, concurrency, timeout_s, send, verify)
    ok = [a for a in answers if a.status == 200 and a.request_id and a.prediction is not None]
    chosen = round(feedback_share * len(ok))
    labelled = [ok[i] for i in sorted(np.random.default_rng([seed, 1]).permutation(len(ok))[:chosen])]
    in_threads(labelled, concurrency, timeout_s, feedback, verify)
    elapsed = time.perf_counter() - started

    return ReplayResult(
        sent=len(answers),
        ok=len(ok),
        errors=len(answers) - len(ok),
        feedback_sent=sum(a.feedback for a in labelled),
        feedback_errors=sum(not a.feedback for a in labelled),
        predictions=dict(sorted(Counter(a.prediction for a in ok).items())),
        accuracy=sum(a.prediction == a.label for a in ok) / len(ok) if ok else 0.0,
        elapsed_s=elapsed,
        answers=answers,
    )


# -- command line --------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mlops.traffic",
        description="Replay an image folder (one sub-folder per class) against a model server.",
        epilog="Exits 1 when no request got an answer, 2 on bad arguments.",
    )
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8100")
    parser.add_argument("--images", required=True, type=Path, help="image folder with one sub-folder per class")
    parser.add_argument("--requests", type=_positive, help="how many requests (default: each image once)")
    parser.add_argument("--drift", choices=DRIFTS, default="none", help="corruption or class shift to simulate")
    parser.add_argument("--strength", type=_fraction, default=0.8, help="drift strength, 0 to 1 (default 0.8)")
    parser.add_argument("--feedback-share", type=_fraction, default=0.0, help="share of answers to label (default 0)")
    parser.add_argument("--concurrency", type=_positive, default=4, help="client threads (default 4)")
    parser.add_argument("--token-env", help="send 'Authorization: Bearer <value of this variable>'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-mix-target", help="with --drift class_mix: the over-represented class (default: first)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call (default 30)")
    parser.add_argument("--cacert", help="https: trust this CA bundle or certificate file (default: the system's CAs)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        token = secret(args.token_env)
    except ValueError:
        sys.exit(f"error: --token-env {args.token_env}: the variable is not set or empty")
    try:
        images = load_images(args.images)
        result = replay(
            args.url, images, requests=args.requests, drift=args.drift, strength=args.strength,
            feedback_share=args.feedback_share, concurrency=args.concurrency, token=token, seed=args.seed,
            class_mix_target=args.class_mix_target, timeout_s=args.timeout, verify=args.cacert or True,
        )
    except ValueError as error:
        sys.exit(f"error: {error}")
    if args.json:
        fields = {key: value for key, value in vars(result).items() if key != "answers"}
        print(json.dumps(fields | {"url": args.url, "drift": args.drift, "strength": args.strength}))
    else:
        print(f"{args.url} drift={args.drift} strength={args.strength}: {result.summary()}")
    if result.sent and not result.ok:
        print(f"error: no request to {args.url}/predict was answered with 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
