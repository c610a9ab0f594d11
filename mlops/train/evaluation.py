"""Evaluate a packaged model on the test split, and the build gate over that evaluation.

The gate is a pure rule: it collects every check (value, bound, verdict) before deciding, so one
report shows all that is wrong at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlops.checks import (
    Check, Classification, Report, classification, compare, min_class_recall_check, recall_gap_check,
)
from mlops.config import GateThresholds
from mlops.serve.inference import OnnxClassifier, load_array


@dataclass(frozen=True, kw_only=True)
class Evaluation(Classification):
    """The classification metrics of a model on a test split, with its latency."""

    classes: list[str]
    images: int
    latency_p50_ms: float | None  # None: not measured (latency_images=0)
    latency_p95_ms: float | None

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        flat = {
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p95_ms": self.latency_p95_ms,
        }
        for name, scores in self.per_class.items():
            flat |= {f"{key}_{name}": value for key, value in scores.items() if key != "support"}
        return {prefix + key: float(value) for key, value in flat.items() if value is not None}


def classify(model: OnnxClassifier, files: list[tuple[Path, int]], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over `files`, in batches."""
    truth, predicted = [], []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        batch = np.stack([load_array(path, model.spec) for path, _ in chunk])
        predicted.append(model.logits(batch).argmax(axis=1))
        truth += [label for _, label in chunk]
    return np.asarray(truth), np.concatenate(predicted)


def measure_latency(model: OnnxClassifier, files: list[tuple[Path, int]], count: int) -> tuple[float, float]:
    """p50 and p95 milliseconds of one-image calls (preprocessing included), after a warm-up."""
    paths = [path for path, _ in files]
    model.logits(load_array(paths[0], model.spec)[None])
    times = []
    for index in range(count):
        start = time.perf_counter()
        model.logits(load_array(paths[index % len(paths)], model.spec)[None])
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def evaluate(model: OnnxClassifier, files: list[tuple[Path, int]], latency_images: int) -> Evaluation:
    """Metrics on `files`, and the latency of `latency_images` one-image calls (0: not measured)."""
    classes = list(model.spec.classes)
    truth, predicted = classify(model, files)
    scores = classification(truth, predicted, range(len(classes)), classes)
    p50, p95 = measure_latency(model, files, latency_images) if latency_images else (None, None)
    return Evaluation(**asdict(scores), classes=classes, images=len(truth), latency_p50_ms=p50, latency_p95_ms=p95)


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(evaluation.confusion)
    n = len(evaluation.classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), evaluation.classes, rotation=45, ha="right")
    ax.set_yticks(range(n), evaluation.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {evaluation.accuracy:.3f} on {evaluation.images} images")
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the gate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What the new model is compared with: the production model on the same test split, or why not."""

    label: str  # "production v3", or the reason there is no comparison
    evaluation: Evaluation | None = None
    other_classes: list[str] | None = None  # the production version's classes, when they differ


@dataclass(frozen=True)
class Holdout:
    """The new model and the production model on the production holdout (what production saw)."""

    new: Evaluation
    production: Evaluation | None
    label: str  # "production v3 on 42 production images"


def comparison(new: Evaluation, baseline: Baseline | None, holdout: Holdout | None) -> str:
    """A markdown table: the new model and the production model side by side, on the original
    test split and, when there is one, on the production holdout."""
    label = baseline.label if baseline and baseline.evaluation else "production"
    rows = [("original test split", new, baseline.evaluation if baseline else None)]
    if holdout is not None:
        rows.append(("production holdout", holdout.new, holdout.production))

    def cell(evaluation: Evaluation | None, metric: str) -> str:
        return "-" if evaluation is None else f"{getattr(evaluation, metric):.4f}"

    lines = [f"| data | images | metric | new | {label} |", "|---|---:|---|---:|---:|"]
    for name, mine, theirs in rows:
        for metric in ("accuracy", "macro_f1"):
            lines.append(f"| {name} | {mine.images} | {metric.replace('_', ' ')} | {cell(mine, metric)} | {cell(theirs, metric)} |")
    return "\n".join(lines)


def holdout_check(holdout: Holdout | None, thresholds: GateThresholds) -> Check:
    """Better than production where production failed: by `min_holdout_gain`, or above the
    absolute floor `min_holdout_accuracy` when one is set (whichever is lower)."""
    if holdout is None:
        return Check("holdout_accuracy", None, None, ">=", None, "no production holdout: check skipped")
    bounds, notes = [], []
    if holdout.production is not None:
        bounds.append(round(holdout.production.accuracy + thresholds.min_holdout_gain, 6))
        notes.append(f"{holdout.label}: {holdout.production.accuracy:.4f} + min_holdout_gain")
    if thresholds.min_holdout_accuracy is not None:
        bounds.append(thresholds.min_holdout_accuracy)
        notes.append("or min_holdout_accuracy")
    if not bounds:
        return Check("holdout_accuracy", None, None, ">=", None, f"{holdout.label}: no production model and no floor")
    return compare("holdout_accuracy", holdout.new.accuracy, ">=", min(bounds), ", ".join(notes))


def gate(
    new: Evaluation, thresholds: GateThresholds, baseline: Baseline | None = None, holdout: Holdout | None = None
) -> Report:
    """Absolute bounds on `new`, then change bounds against the baseline (same test split), then
    the gain on the production holdout when the build has one."""
    confidence = thresholds.class_recall_confidence
    checks = [
        compare("accuracy", new.accuracy, ">=", thresholds.min_accuracy),
        min_class_recall_check(new.per_class, thresholds.min_class_recall, confidence),
        recall_gap_check(new.per_class, thresholds.max_recall_gap, confidence),
        compare("p95_latency_ms", new.latency_p95_ms, "<=", thresholds.max_p95_latency_ms, "ONNX, 1 image/call"),
    ]
    production = baseline.evaluation if baseline else None
    if baseline is not None and baseline.other_classes is not None:
        allowed = thresholds.allow_other_classes
        checks.append(Check("same_classes_as_production", None, None, "", True if allowed else False,
                            f"{baseline.label} has classes {baseline.other_classes}, this model {list(new.classes)}"
                            + ("; allowed by gate.allow_other_classes" if allowed else
                               "; gate.allow_other_classes=true registers it anyway")))
    if production is None:
        note = baseline.label if baseline else "no production model yet: comparison skipped"
        checks += [
            Check("accuracy_vs_production", None, None, ">=", None, note),
            Check("macro_f1_vs_production", None, None, ">=", None, note),
        ]
    else:
        checks += [
            compare(
                "accuracy_vs_production",
                new.accuracy,
                ">=",
                round(production.accuracy - thresholds.max_accuracy_drop, 6),
                f"{baseline.label} accuracy {production.accuracy:.4f} - max_accuracy_drop",
            ),
            compare(
                "macro_f1_vs_production",
                new.macro_f1,
                ">=",
                round(production.macro_f1 - thresholds.max_macro_f1_drop, 6),
                f"{baseline.label} macro F1 {production.macro_f1:.4f} - max_macro_f1_drop",
            ),
        ]
    sections = {"gate": checks}
    if holdout is not None:
        sections["production holdout"] = [holdout_check(holdout, thresholds)]
    return Report(sections, title="Gate")
