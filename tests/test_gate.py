"""The build gate (`mlops.train.evaluation.gate`) on hand-made evaluations: no model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlops.config import GateThresholds
from mlops.train.evaluation import Baseline, Evaluation, Holdout, comparison, gate, holdout_check

THRESHOLDS = GateThresholds(
    min_accuracy=0.8, min_class_recall=0.7, max_recall_gap=0.2,
    max_p95_latency_ms=50.0, max_accuracy_drop=0.02, max_macro_f1_drop=0.03,
)


def evaluation(accuracy=0.9, recalls=(0.95, 0.85), p95=10.0, macro_f1=0.9) -> Evaluation:
    per_class = {name: {"precision": 0.9, "recall": r, "f1": 0.9, "support": 10} for name, r in zip("ab", recalls)}
    return Evaluation(
        classes=["a", "b"], images=20, accuracy=accuracy, macro_precision=0.9, macro_recall=sum(recalls) / 2,
        macro_f1=macro_f1, per_class=per_class, confusion=[[10, 0], [0, 10]], latency_p50_ms=p95 / 2,
        latency_p95_ms=p95,
    )


def verdicts(report):
    return {c.name: c.passed for c in report.checks}


def test_all_pass_with_baseline():
    report = gate(evaluation(), THRESHOLDS, Baseline("production v1", evaluation(accuracy=0.9, macro_f1=0.9)))
    assert report.passed
    assert all(verdicts(report).values())


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"accuracy": 0.7}, "accuracy"),
        ({"recalls": (0.75, 0.65)}, "min_class_recall"),
        ({"recalls": (1.0, 0.75)}, "recall_gap"),
        ({"p95": 80.0}, "p95_latency_ms"),
    ],
)
def test_each_absolute_bound_fails_alone(changes, failing):
    report = gate(evaluation(**changes), THRESHOLDS)
    assert not report.passed
    assert [c.name for c in report.failures] == [failing]


def test_min_class_recall_names_the_worst_class():
    check = next(c for c in gate(evaluation(recalls=(0.75, 0.65)), THRESHOLDS).checks if c.name == "min_class_recall")
    assert check.value == pytest.approx(0.65) and "'b'" in check.note


@pytest.mark.parametrize("baseline", [None, Baseline("production v2 could not be evaluated")])
def test_without_baseline_comparisons_are_skipped(baseline):
    report = gate(evaluation(), THRESHOLDS, baseline)
    skipped = {c.name: c for c in report.checks if c.passed is None}
    assert set(skipped) == {"accuracy_vs_production", "macro_f1_vs_production"}
    expected = baseline.label if baseline else "no production model yet: comparison skipped"
    assert all(c.note == expected for c in skipped.values())
    assert report.passed


def test_accuracy_drop_against_production_fails():
    production = evaluation(accuracy=0.95, macro_f1=0.9)
    report = gate(evaluation(accuracy=0.92), THRESHOLDS, Baseline("production v3", production))
    check = next(c for c in report.checks if c.name == "accuracy_vs_production")
    assert check.passed is False
    assert check.bound == pytest.approx(0.95 - 0.02)
    assert "production v3" in check.note
    assert [c.name for c in report.failures] == ["accuracy_vs_production"]


def test_report_lists_every_check_when_several_fail():
    new = evaluation(accuracy=0.5, recalls=(1.0, 0.3), p95=100.0, macro_f1=0.5)
    report = gate(new, THRESHOLDS, Baseline("production v3", replace(evaluation(), accuracy=0.95)))
    assert [c.name for c in report.checks] == [
        "accuracy", "min_class_recall", "recall_gap", "p95_latency_ms", "accuracy_vs_production", "macro_f1_vs_production",
    ]
    assert not any(verdicts(report).values())
    assert report.title == "Gate" and report.to_markdown().startswith("**Gate: FAILED**")


def holdout(new: float, production: float | None) -> Holdout:
    return Holdout(evaluation(accuracy=new), None if production is None else evaluation(accuracy=production),
                   "production v1 on 30 production images")


@pytest.mark.parametrize(
    ("new", "production", "floor", "passed"),
    [
        (0.80, 0.60, None, True),  # +0.20 >= +0.05
        (0.62, 0.60, None, False),  # +0.02 < +0.05
        (0.62, 0.60, 0.6, True),  # under the gain but above the floor
        (0.55, None, 0.6, False),  # no production model: the floor alone
        (0.65, 0.60, None, True),  # exactly the gain
    ],
)
def test_the_holdout_asks_for_a_gain_over_production_or_the_floor(new, production, floor, passed):
    thresholds = THRESHOLDS.model_copy(update={"min_holdout_accuracy": floor})
    report = gate(evaluation(), thresholds, Baseline("production v1", evaluation()), holdout(new, production))
    (check,) = report.sections["production holdout"]
    assert check.passed is passed and report.passed is passed
    assert "production v1 on 30 production images" in check.note or production is None


def test_without_a_holdout_the_gate_has_no_holdout_section_and_a_holdout_without_any_bound_is_skipped():
    assert "production holdout" not in gate(evaluation(), THRESHOLDS).sections
    (check,) = gate(evaluation(), THRESHOLDS, None, holdout(0.9, None)).sections["production holdout"]
    assert check.passed is None and "no production model and no floor" in check.note
    assert holdout_check(None, THRESHOLDS).passed is None


def test_the_comparison_sets_new_and_production_side_by_side_on_both_splits():
    table = comparison(evaluation(0.91, macro_f1=0.9), Baseline("production v1", evaluation(0.93, macro_f1=0.92)),
                       holdout(0.80, 0.35))
    lines = table.splitlines()
    assert lines[0] == "| data | images | metric | new | production v1 |"
    assert "| original test split | 20 | accuracy | 0.9100 | 0.9300 |" in lines
    assert "| original test split | 20 | macro f1 | 0.9000 | 0.9200 |" in lines
    assert any(line.startswith("| production holdout |") and "| accuracy | 0.8000 | 0.3500 |" in line for line in lines)
    alone = comparison(evaluation(), Baseline("no production model yet: comparison skipped"), None)
    assert "production holdout" not in alone and "| 0.9000 | - |" in alone  # nothing to compare with


@pytest.mark.parametrize("allowed", [False, True])
def test_other_classes_than_production_are_refused_unless_allowed(allowed):
    baseline = Baseline("production v2 has other classes: comparison skipped", other_classes=["cat", "dog", "fox"])
    report = gate(evaluation(), THRESHOLDS.model_copy(update={"allow_other_classes": allowed}), baseline)
    check = next(c for c in report.checks if c.name == "same_classes_as_production")
    assert check.passed is allowed and report.passed is allowed
    assert "['cat', 'dog', 'fox']" in check.note and "['a', 'b']" in check.note
    if not allowed:
        assert report.describe_failures().startswith("same_classes_as_production: production v2")
        assert "gate.allow_other_classes=true" in report.describe_failures()


def test_same_classes_add_no_check():
    report = gate(evaluation(), THRESHOLDS, Baseline("production v1", evaluation()))
    assert "same_classes_as_production" not in verdicts(report)


def test_class_recall_bounds_take_the_configured_confidence():
    # 7.5 of 10 images against a perfect class: a gap of 0.25 by the recalls, none that 10 images show
    few = evaluation(recalls=(1.0, 0.75))
    assert verdicts(gate(few, THRESHOLDS))["recall_gap"] is False
    judged = gate(few, THRESHOLDS.model_copy(update={"class_recall_confidence": 0.95}))
    assert judged.passed and "95% bounds" in next(c.note for c in judged.checks if c.name == "recall_gap")
