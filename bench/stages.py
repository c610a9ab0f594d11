"""Where a camera image's time goes in the model server, stage by stage, without HTTP.

    python bench/stages.py [--images 64] [--models 32,m128,128,224] [--passes 3] [--batch 32] [--threads 2]

Each stage is the server's own function, called in one thread on `--images` synthetic 640x480
JPEGs (quality 90; the 32 px model gets 32x32 PNGs, as the digits are served):
  decode       `decoding.decode`: open, draft (JPEG DCT-domain downscale), load, shrink;
  to array     `inference.image_to_array`: resize, normalise (lookup table), CHW float32;
  features     `features.image_features`: the monitoring features of the request record;
  record JSON  `json.dumps` of a full request record;
  model b1     `OnnxClassifier.run` on one image; model b32: per image of a `--batch` batch.
Models: torchvision ResNet-18 and MobileNetV3-small with random weights, 10 classes, exported
by `packaging.export_onnx` with a projection as the build exports them; ONNX Runtime on
`--threads` threads. Best of `--passes` passes, ms per image. The HTTP side is measured by
`bench/serving.py` (its `--steps` row "the client's limit").
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import models

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlops.serve import decoding, inference  # noqa: E402
from mlops.serve.features import image_features  # noqa: E402
from mlops.train import packaging  # noqa: E402
from table import print_table  # noqa: E402  bench/table.py
from serving import CAMERA, MODELS  # noqa: E402  bench/serving.py: the same models and camera size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPSET = 18  # conf/build.yaml's export.opset


def images(count: int, size: tuple[int, int], kind: str, seed: int = 0) -> list[bytes]:
    """Smooth random gradients plus noise: they compress like photographs."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize(size, Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3)), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buffer, kind, **({"quality": 90} if kind == "JPEG" else {}))
        found.append(buffer.getvalue())
    return found


def export(name: str, size: int, folder: Path) -> Path:
    torch.manual_seed(0)
    network = getattr(models, name)(num_classes=10).eval()
    spec = inference.ModelSpec(tuple(str(d) for d in range(10)), size, MEAN, STD)
    sample = [np.random.default_rng(0).random((16, 3, size, size), np.float32)]
    projection = packaging.fit_projection(packaging.embeddings(network, sample), 8, 0)
    return packaging.export_onnx(network, spec, folder / f"{name}-{size}.onnx", OPSET, projection)


def best_ms(function, items: list, passes: int) -> float:
    """Best of `passes` passes over `items`, ms per item."""
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            function(item)
        times.append((time.perf_counter() - start) / len(items) * 1000)
    return min(times)


def stages(key: str, folder: Path, args: argparse.Namespace) -> list[object]:
    name, size, sent = MODELS[key]
    model = inference.OnnxClassifier(export(name, size, folder), threads=args.threads, spinning=False)
    kind = sent.upper()
    raw = images(args.images, (32, 32) if sent == "png" else CAMERA, kind)

    def decode(data: bytes):
        return decoding.decode(data, ("JPEG", "PNG"), 10**8, None, size)

    decoded = [decode(data) for data in raw]
    arrays = [inference.image_to_array(d.image, model.spec) for d in decoded]
    features = [image_features(d.image, (d.width, d.height)) for d in decoded]
    record = {"request_id": "0" * 32, "time": "2026-12-07T00:00:00+00:00", "status": "ok", "model_version": "3",
              "prediction": "7", "confidence": 0.93, "latency_ms": 4.2, "role": "champion",
              "projection": [0.1] * 8, **features[0]}
    batches = [np.stack(arrays[i:i + args.batch]) for i in range(0, len(arrays) - args.batch + 1, args.batch)]
    model.run(batches[0])  # the first call allocates
    figures = [
        best_ms(decode, raw, args.passes),
        best_ms(lambda d: inference.image_to_array(d.image, model.spec), decoded, args.passes),
        best_ms(lambda d: image_features(d.image, (d.width, d.height)), decoded, args.passes),
        best_ms(lambda _: json.dumps(record), range(len(raw)), args.passes),
        best_ms(lambda a: model.run(a[None]), arrays, args.passes),
        best_ms(model.run, batches, args.passes) / args.batch,
    ]
    around = sum(figures[:4])
    return [f"{name} {size} px", *(f"{f:.3f}" for f in figures), f"{around:.3f}", f"{around / (around + figures[5]):.0%}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--models", default="32,m128,128,224")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.images < args.batch:
        parser.error(f"--images ({args.images}) must be at least --batch ({args.batch})")
    unknown = [key for key in args.models.split(",") if key not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory() as folder:
        rows = [stages(key, Path(folder), args) for key in args.models.split(",")]
    print(f"ms per image, best of {args.passes} passes over {args.images} images, one thread "
          f"(ONNX Runtime: {args.threads} threads)")
    print_table(["model", "decode", "to array", "features", "record JSON", "model b1", f"model b{args.batch}",
                 "all but the model", f"its share at b{args.batch}"], rows)


if __name__ == "__main__":
    main()
