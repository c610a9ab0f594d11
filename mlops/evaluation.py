"""Evaluate a packaged model on the test split, and gate it against thresholds.

The gate collects every check (value, bound, verdict) before deciding, so one report shows all
that is wrong at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from mlops.config import ApplicationThresholds, Thresholds
from mlops.inference import OnnxClassifier, load_array


@dataclass
class Evaluation:
    classes: list[str]
    images: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    latency_p50_ms: float
    latency_p95_ms: float

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
        return {prefix + key: float(value) for key, value in flat.items()}


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
    classes = list(model.spec.classes)
    truth, predicted = classify(model, files)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    p50, p95 = measure_latency(model, files, latency_images)
    return Evaluation(
        classes=classes,
        images=len(truth),
        accuracy=float((truth == predicted).mean()),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        per_class={
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
    )


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
class Check:
    name: str
    value: float | None
    bound: float | None
    op: str  # ">=" or "<="
    passed: bool | None  # None: skipped
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]


@dataclass
class GateReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) | {"verdict": c.verdict} for c in self.checks]}

    def to_markdown(self) -> str:
        rows = [
            f"| {c.name} | {_fmt(c.value)} | {c.op} {_fmt(c.bound)} | {c.verdict} | {c.note} |"
            for c in self.checks
        ]
        head = f"**Gate: {'PASSED' if self.passed else 'FAILED'}**\n\n"
        return head + "| check | value | bound | verdict | note |\n|---|---|---|---|---|\n" + "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def compare(name: str, value: float, op: str, bound: float, note: str = "") -> Check:
    passed = value >= bound if op == ">=" else value <= bound
    return Check(name, round(value, 6), bound, op, bool(passed), note)


def gate(
    new: Evaluation,
    thresholds: Thresholds,
    production: Evaluation | None = None,
    production_label: str = "",
) -> GateReport:
    """Absolute bounds on `new`, then change bounds against `production` (same test split)."""
    recalls = {name: scores["recall"] for name, scores in new.per_class.items()}
    worst = min(recalls, key=recalls.get)
    best = max(recalls, key=recalls.get)
    checks = [
        compare("accuracy", new.accuracy, ">=", thresholds.min_accuracy),
        compare("min_class_recall", recalls[worst], ">=", thresholds.min_class_recall, f"worst class '{worst}'"),
        compare(
            "recall_gap",
            recalls[best] - recalls[worst],
            "<=",
            thresholds.max_recall_gap,
            f"'{best}' {recalls[best]:.3f} - '{worst}' {recalls[worst]:.3f}",
        ),
        compare("p95_latency_ms", new.latency_p95_ms, "<=", thresholds.max_p95_latency_ms, "ONNX, 1 image/call"),
    ]
    if production is None:
        note = production_label or "no production model yet: comparison skipped"
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
                f"{production_label} accuracy {production.accuracy:.4f} - max_accuracy_drop",
            ),
            compare(
                "macro_f1_vs_production",
                new.macro_f1,
                ">=",
                round(production.macro_f1 - thresholds.max_macro_f1_drop, 6),
                f"{production_label} macro F1 {production.macro_f1:.4f} - max_macro_f1_drop",
            ),
        ]
    return GateReport(checks)


def application_gate(result, thresholds: ApplicationThresholds) -> GateReport:
    """The served model, over HTTP on the test split (`mlops.deployment.ApplicationResult`)."""
    note = f"{result.requests} requests, statuses {result.statuses}"
    return GateReport(
        [
            compare("app_accuracy", result.accuracy, ">=", thresholds.min_accuracy, note),
            compare("app_macro_precision", result.macro_precision, ">=", thresholds.min_macro_precision),
            compare("app_macro_recall", result.macro_recall, ">=", thresholds.min_macro_recall),
            compare("app_p95_latency_ms", result.latency_p95_ms, "<=", thresholds.max_p95_latency_ms, "HTTP, end to end"),
            compare("app_error_rate", result.error_rate, "<=", thresholds.max_error_rate),
        ]
    )
