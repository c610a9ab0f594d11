from __future__ import annotations

import pytest

from mlops.config import GateThresholds
from mlops.train.evaluation import Baseline, Evaluation, gate, plot_confusion

THRESHOLDS = GateThresholds(
    min_accuracy=0.8,
    min_class_recall=0.6,
    max_recall_gap=0.3,
    max_p95_latency_ms=10.0,
    max_accuracy_drop=0.02,
    max_macro_f1_drop=0.02,
)


def make_eval(accuracy: float, recalls: dict[str, float], p95: float = 2.0, f1: float | None = None) -> Evaluation:
    per_class = {name: {"precision": r, "recall": r, "f1": r, "support": 10} for name, r in recalls.items()}
    return Evaluation(
        classes=list(recalls),
        images=10 * len(recalls),
        accuracy=accuracy,
        macro_precision=accuracy,
        macro_recall=accuracy,
        macro_f1=accuracy if f1 is None else f1,
        per_class=per_class,
        confusion=[[10 if i == j else 0 for j in range(len(recalls))] for i in range(len(recalls))],
        latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
    )


def verdicts(report) -> dict[str, str]:
    return {check.name: check.verdict for check in report.checks}


def test_a_good_model_passes_and_the_comparison_is_skipped_without_production():
    report = gate(make_eval(0.9, {"cat": 0.9, "dog": 0.85}), THRESHOLDS)
    assert report.passed
    assert verdicts(report) == {
        "accuracy": "pass",
        "min_class_recall": "pass",
        "recall_gap": "pass",
        "p95_latency_ms": "pass",
        "accuracy_vs_production": "skipped",
        "macro_f1_vs_production": "skipped",
    }
    assert "no production model yet" in report.checks[-1].note


def test_every_violation_is_reported_at_once_with_value_and_bound():
    report = gate(make_eval(0.5, {"cat": 0.95, "dog": 0.2}, p95=25.0), THRESHOLDS)
    assert not report.passed
    failed = {c.name: (c.value, c.op, c.bound) for c in report.failures}
    assert failed == {
        "accuracy": (0.5, ">=", 0.8),
        "min_class_recall": (0.2, ">=", 0.6),
        "recall_gap": (0.75, "<=", 0.3),
        "p95_latency_ms": (25.0, "<=", 10.0),
    }
    markdown = report.to_markdown()
    assert "**Gate: FAILED**" in markdown and "| recall_gap | 0.75 | <= 0.3 | FAIL |" in markdown
    assert "worst class 'dog'" in markdown


def test_change_bounds_against_production():
    production = make_eval(0.95, {"cat": 0.95, "dog": 0.95})
    worse = gate(make_eval(0.9, {"cat": 0.9, "dog": 0.9}), THRESHOLDS, Baseline("production v3", production))
    assert verdicts(worse)["accuracy_vs_production"] == "FAIL"
    check = next(c for c in worse.checks if c.name == "accuracy_vs_production")
    assert check.bound == pytest.approx(0.93) and "production v3 accuracy 0.9500" in check.note

    close = gate(make_eval(0.94, {"cat": 0.94, "dog": 0.94}), THRESHOLDS, Baseline("production v3", production))
    assert close.passed and verdicts(close)["macro_f1_vs_production"] == "pass"


def test_confusion_plot_is_a_png(tmp_path):
    path = plot_confusion(make_eval(1.0, {"cat": 1.0, "dog": 1.0}), tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
