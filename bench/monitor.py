"""How many served requests per second the monitor analyses, against whylogs' own image logging.

    python bench/monitor.py [--requests 3000] [--reference 1000]

Both sides start from the same digit images (scikit-learn's, written as PNG files) and end with
whylogs drift scores of the current window against a reference:

- ours: the model server records image features with every request (cost measured here as
  "feature extraction"); the monitor then reads the window's record files, profiles them with
  whylogs and computes drift (`mlops.monitor.window.load_traffic` + `mlops.monitor.checks.drift_checks`);
- whylogs: `whylogs.extras.image_metric.log_image` on each image, one by one, profiles merged,
  then the same drift scores.
"""

from __future__ import annotations

import offline  # noqa: F401  bench/offline.py: before anything imports Prefect

import argparse
import json
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from table import print_table  # bench/table.py

from flows.config import load_config
from mlops.data.ingest import materialize_digits
from mlops.monitor.checks import drift_checks
from mlops.monitor.profiling import Reference, profile_frame, whylogs
from mlops.monitor.window import load_traffic
from mlops.serve.features import image_features
from mlops.serve.records import hour_file


def write_records(paths: list[Path], folder: Path, now: datetime) -> float:
    """Records as the server writes them; returns the seconds spent on feature extraction."""
    rng = np.random.default_rng(0)
    extraction, lines = 0.0, []
    for index, path in enumerate(paths):
        start = time.perf_counter()
        with Image.open(path) as image:
            features = image_features(image)
        extraction += time.perf_counter() - start
        lines.append(json.dumps({
            "request_id": uuid.uuid4().hex, "time": (now - timedelta(seconds=len(paths) - index)).isoformat(),
            "model": "image-classifier", "model_version": "1", "endpoint": "/predict", "status": "ok",
            "content_type": "image/png", "bytes": path.stat().st_size,
            "prediction": path.parent.name, "confidence": float(rng.uniform(0.5, 1.0)), "latency_ms": 3.0, **features,
        }))
    target = hour_file(folder, "requests", now)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    return extraction


def ours(folder: Path, reference: Reference, now: datetime, config) -> tuple[float, int, int]:
    start = time.perf_counter()
    traffic = load_traffic(folder, "1", now - timedelta(hours=1), now + timedelta(seconds=1))
    checks, scores = drift_checks(traffic, reference, [str(k) for k in range(10)], config.monitor)
    return time.perf_counter() - start, len(traffic.served), sum(s.drifted for s in scores)


def whylogs_images(paths: list[Path]):
    from whylogs.extras.image_metric import log_image

    view = None
    for path in paths:
        with Image.open(path) as image:
            result = log_image(image.convert("RGB")).view()
        view = result if view is None else view.merge(result)
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--reference", type=int, default=1000)
    args = parser.parse_args()
    whylogs()
    from whylogs.viz.drift.column_drift_algorithms import calculate_drift_scores

    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    images = sorted(materialize_digits(work / "digits").rglob("*.png"))
    current = [images[i % len(images)] for i in range(args.requests)]
    baseline = images[: args.reference]
    config = load_config("monitor", "test", [f"paths.workspace={work}"])
    now = datetime.now(UTC)

    extraction = write_records(current, work / "records", now)
    features = pd.DataFrame([image_features(Image.open(p)) for p in baseline])
    features["prediction"] = [p.parent.name for p in baseline]
    features["confidence"] = np.random.default_rng(1).uniform(0.5, 1.0, len(baseline))
    reference = Reference(profile_frame(features), {c: features[c].tolist() for c in features})
    analysis, analysed, drifted = ours(work / "records", reference, now, config)

    start = time.perf_counter()
    reference_view = whylogs_images(baseline)
    reference_s = time.perf_counter() - start
    start = time.perf_counter()
    current_view = whylogs_images(current)
    scores = calculate_drift_scores(target_view=current_view, reference_view=reference_view)
    theirs = time.perf_counter() - start

    n = args.requests
    rows = [
        ("ours: monitor analysis of recorded features", analysis, f"{drifted} of {len(reference.values)} drifted"),
        ("ours: + feature extraction (done by the server)", analysis + extraction, ""),
        ("whylogs log_image one by one + drift", theirs, f"{sum(bool(s) for s in scores.values())} columns scored"),
    ]
    print(f"\n{n} requests ({analysed} analysed), reference {args.reference} images; "
          f"whylogs image reference took {reference_s:.1f} s\n")
    print_table(["method", "seconds", "requests/s", "x whylogs", "note"],
                [[label, f"{seconds:.2f}", f"{n / seconds:.0f}", f"{theirs / seconds:.1f}", note] for label, seconds, note in rows])


if __name__ == "__main__":
    main()
