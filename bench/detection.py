"""Detection power of the monitor's drift and performance checks, per shift and window size.

    python bench/detection.py [--workspace DIR] [--windows 20] [--sizes 50,100,200,500] [--strength 0.5]

1. Builds (the real build flow) a model on the embedded digits with one class held out
   (`data.classes` = 0..8), all images, 10 epochs, and a test split of 35% (the pool windows
   are drawn from: 566 images).
2. Computes, for every pool image and every shift, what the server records for a request: the
   image statistics, the prediction, the logits and the embedding projection (the same
   functions the server calls).
3. Draws `--windows` windows of n requests per shift and n, and judges each with the monitor's
   own checks and the default config (`conf/monitor/default.yaml`), against the version's
   reference. A window is flagged by a detector when its check fails:
   - pixel statistics: `drifted_share` (whylogs, the image statistics);
   - outputs: `prediction_drift` (chi-square) or `output_drift` (BBSD);
   - embeddings: `embedding_drift` (the configured method; the other method is a column too);
   - estimated accuracy: `estimated_accuracy` below `performance.min_accuracy`.
   "any" is the monitor's verdict: a window flagged by at least one of the four.

Shifts (strength `--strength`, `mlops.traffic.corrupt`): none, blur, noise, brightness, jpeg,
rotation; prior (one class 5x more frequent); unseen (half the window from the held-out class).
Windows draw without replacement while the pool (or the class) has enough images; past that,
images repeat, and the table's "repeated" column gives the share of repeated requests (repeats
make every two-sample test more eager, so read those cells with care). Everything runs in this
process; no server.
"""

from __future__ import annotations

import offline  # noqa: F401  bench/offline.py: before anything imports Prefect

import argparse
import io
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from table import print_table  # bench/table.py

from flows.config import load_config
from mlops.data.layout import dataset_dir
from mlops.monitor.checks import drift_checks, embedding_drift, performance_checks
from mlops.monitor.profiling import Reference
from mlops.monitor.window import Traffic
from mlops.registry import Registry
from mlops.serve.features import image_features
from mlops.serve.inference import OnnxClassifier, image_to_array, softmax
from mlops.traffic import corrupt

HELD_OUT = "9"
PIXEL_SHIFTS = ("none", "blur", "noise", "brightness", "jpeg", "rotation")
SHIFTS = (*PIXEL_SHIFTS, "prior", "unseen")
PRIOR_CLASS, PRIOR_WEIGHT, UNSEEN_SHARE = "0", 5.0, 0.5
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def build_model(workspace: Path) -> tuple[OnnxClassifier, Reference, Path, list]:
    """The build flow on digits without the held-out class; (model, reference, source, monitor config)."""
    from flows.build import build

    kept = ",".join(str(k) for k in range(10) if str(k) != HELD_OUT)
    overrides = [f"paths.workspace={workspace}", f"data.classes=[{kept}]", "data.test_fraction=0.35",
                 "data.max_per_class=null", "train.max_epochs=10", "train.batch_size=64", "train.progress_bar=false"]
    result = build("test", overrides)
    config = load_config("build", "test", overrides)
    registry = Registry(config.mlflow)
    ref = registry.version(result.version)
    folder = workspace / "bench-detection" / f"v{ref.version}"
    model = OnnxClassifier(registry.download_model(ref.run_id, folder))
    found = registry.download_reference(ref.run_id, folder)
    if found is None:
        sys.exit(f"version {ref.version} has no reference")
    test = dataset_dir(config.dvc.repo, config.data.name) / "test"
    return model, Reference.load(found), test, config


def default_settings(workspace: Path):
    """The monitor settings with `drift` and `performance` as conf/monitor/default.yaml has them
    (the test environment loosens the performance bounds)."""
    from omegaconf import OmegaConf

    from flows.startup import CONF_DIR
    from mlops.config.monitor import DriftRules, PerformanceRules

    default = OmegaConf.load(CONF_DIR / "monitor" / "default.yaml")
    settings = load_config("monitor", "test", [f"paths.workspace={workspace}"]).monitor
    return settings.model_copy(update={
        "drift": DriftRules(**OmegaConf.to_container(default.drift)),
        "performance": PerformanceRules(**OmegaConf.to_container(default.performance)),
    })


def records(model: OnnxClassifier, paths: list[Path], shift: str, strength: float, seed: int) -> pd.DataFrame:
    """What the server records for each image under `shift` (PNG bodies, as replay sends them)."""
    rng = np.random.default_rng(seed)
    rows, arrays = [], []
    for path in paths:
        buffer = io.BytesIO()
        with Image.open(path) as original:
            corrupt(original, shift if shift in PIXEL_SHIFTS else "none", strength, rng).save(buffer, "PNG")
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            decoded.load()
            rows.append(image_features(decoded))
            arrays.append(image_to_array(decoded, model.spec))
    logits, projection = model.run(np.stack(arrays))
    frame = pd.DataFrame(rows)
    probabilities = softmax(logits)
    frame["prediction"] = [model.spec.classes[i] for i in probabilities.argmax(axis=1)]
    frame["confidence"] = probabilities.max(axis=1)
    frame["logits"] = [list(map(float, row)) for row in logits.round(4)]
    frame["embedding"] = [list(map(float, row)) for row in projection.round(4)]
    frame["label"] = [path.parent.name for path in paths]
    return frame


def draw(pool: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows, without replacement while the pool has enough (repeats only past its size)."""
    return pool.sample(n, replace=n > len(pool), random_state=rng)


def window(pools: dict[str, pd.DataFrame], unseen: pd.DataFrame, shift: str, n: int, rng: np.random.Generator) -> Traffic:
    pool = pools[shift if shift in PIXEL_SHIFTS else "none"]
    if shift in ("prior", "unseen"):
        if shift == "prior":  # PRIOR_CLASS PRIOR_WEIGHT times as frequent as each other class
            chosen = pool["label"] == PRIOR_CLASS
            share = PRIOR_WEIGHT / (PRIOR_WEIGHT + pool.loc[~chosen, "label"].nunique())
            special, rest = pool[chosen], pool[~chosen]
        else:
            share, special, rest = UNSEEN_SHARE, unseen, pool
        k = round(n * share)
        served = pd.concat([draw(special, k, rng), draw(rest, n - k, rng)])
    else:
        served = draw(pool, n, rng)
    served = served.reset_index(drop=True).assign(
        request_id=[uuid.uuid4().hex for _ in range(n)], status="ok", latency_ms=3.0,
        time=[(NOW - timedelta(seconds=n - i)).isoformat() for i in range(n)],
    )
    return Traffic(NOW - timedelta(hours=1), NOW, "1", served, pd.DataFrame(), {}, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/bench-detection"))  # reused by a re-run
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--sizes", default="50,100,200,500")
    parser.add_argument("--strength", type=float, default=0.5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    started = time.perf_counter()
    model, reference, test, _ = build_model(args.workspace.resolve())
    settings = default_settings(args.workspace.resolve())
    other = settings.drift.model_copy(update={"embedding": settings.drift.embedding.model_copy(
        update={"method": "classifier" if settings.drift.embedding.method == "mmd" else "mmd"})})
    classes = list(model.spec.classes)
    paths = sorted(p for p in test.rglob("*.png"))
    unseen_paths = sorted((args.workspace.resolve() / "sources" / "digits" / HELD_OUT).glob("*.png"))
    pools = {shift: records(model, paths, shift, args.strength, seed=1) for shift in PIXEL_SHIFTS}
    unseen = records(model, unseen_paths, "none", 0.0, seed=1)
    print(f"model: {len(classes)} classes (digit {HELD_OUT} held out), pool {len(paths)} test images,"
          f" {len(unseen_paths)} unseen-class images; reference: {len(reference.embedding)} embeddings,"
          f" temperature {reference.temperature:.3g}; build and records {time.perf_counter() - started:.0f} s\n")

    detectors = ("pixel statistics", "outputs", "embeddings", "estimated accuracy")
    rows, accuracy_rows, seconds = [], [], {d: 0.0 for d in (*detectors, "other embedding")}
    rng = np.random.default_rng(0)
    for shift in SHIFTS:
        for n in sizes:
            flags = {d: 0 for d in (*detectors, "any", "other embedding")}
            estimated, realised, repeated = [], [], []
            for _ in range(args.windows):
                traffic = window(pools, unseen, shift, n, rng)
                t = time.perf_counter()
                drift, _ = drift_checks(traffic, reference, classes, settings)
                checks = {c.name: c for c in drift}
                t_drift = time.perf_counter() - t
                t = time.perf_counter()
                performance = {c.name: c for c in performance_checks(traffic, reference, classes, settings)}
                seconds["estimated accuracy"] += time.perf_counter() - t
                seconds["embeddings"] += t_drift  # drift_checks' time, embedding test included
                t = time.perf_counter()
                alternative = embedding_drift(traffic, reference, other)
                seconds["other embedding"] += time.perf_counter() - t
                flagged = {
                    "pixel statistics": checks["drifted_share"].passed is False,
                    "outputs": checks["prediction_drift"].passed is False or checks["output_drift"].passed is False,
                    "embeddings": checks["embedding_drift"].passed is False,
                    "estimated accuracy": performance["estimated_accuracy"].passed is False,
                }
                flagged["any"] = any(flagged.values())
                flagged["other embedding"] = alternative.passed is False
                for name, value in flagged.items():
                    flags[name] += value
                estimated.append(performance["estimated_accuracy"].value)
                realised.append(float((traffic.served["prediction"] == traffic.served["label"]).mean()))
                repeated.append(float(traffic.served["embedding"].map(tuple).duplicated().mean()))
            rows.append([shift, n, f"{np.mean(repeated):.0%}",
                         *[f"{flags[d] / args.windows:.0%}" for d in (*detectors, "any", "other embedding")]])
            accuracy_rows.append([shift, n, f"{np.mean(realised):.3f}", f"{np.mean(estimated):.3f}",
                                  f"{np.mean(np.abs(np.subtract(estimated, realised))):.3f}"])
            print(f"  {shift} n={n}: any {flags['any'] / args.windows:.0%}", file=sys.stderr)

    method, alt = settings.drift.embedding.method, other.embedding.method
    print(f"### Share of windows flagged ({args.windows} windows per cell, strength {args.strength})\n")
    print_table(["shift", "n", "repeated", *detectors[:2], f"embeddings ({method})", detectors[3], "any (the monitor)",
                 f"embeddings ({alt}, not in any)"], rows)
    print("\n### Estimated (CBPE) against realised accuracy, mean over the windows\n")
    print_table(["shift", "n", "realised accuracy", "estimated accuracy", "mean |error|"], accuracy_rows)
    windows = len(SHIFTS) * len(sizes) * args.windows
    print(f"\n{windows} windows; all drift checks (whylogs + BBSD + {method}) {1000 * seconds['embeddings'] / windows:.0f} ms"
          f" per window, {alt} {1000 * seconds['other embedding'] / windows:.0f} ms, estimate"
          f" {1000 * seconds['estimated accuracy'] / windows:.1f} ms; total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
