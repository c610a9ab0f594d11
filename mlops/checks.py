"""Checks, reports and classification metrics: the one vocabulary of every verdict.

A `Check` is a value against a bound with its verdict; a `Report` holds checks in named
sections (the build gate has one, the monitor five) and renders them as markdown or HTML the
same way everywhere. `classification` computes the metrics every stage judges a model by.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from math import sqrt
from statistics import NormalDist
from typing import Literal

import numpy as np

Op = Literal[">=", "<=", "in range", ""]


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    bound: float | None
    op: Op
    passed: bool | None  # None: skipped
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]

    def to_dict(self) -> dict:
        return asdict(self) | {"verdict": self.verdict}

    def describe(self) -> str:
        """One line for an error message: `accuracy 0.41 not >= 0.5` (with the check's note in
        brackets, if any), or the note of a check that has no value."""
        if self.value is None:
            return f"{self.name}: {self.note}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.name} {fmt(self.value)} not {self.op} {fmt(self.bound)}{note}"


def compare(name: str, value: float, op: Op, bound: float, note: str = "") -> Check:
    """The verdict is taken on the value as reported (6 decimals), so `0.9 - 0.6 <= 0.3` passes."""
    value = round(float(value), 6)
    passed = value >= bound if op == ">=" else value <= bound
    return Check(name, value, bound, op, bool(passed), note)


def skipped(name: str, note: str) -> Check:
    return Check(name, None, None, "", None, note)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class Report:
    """Checks in named sections; it passes when no check failed (skipped checks do not fail)."""

    sections: dict[str, list[Check]] = field(default_factory=dict)
    title: str = ""  # "Gate": the markdown starts with **Gate: PASSED** or **Gate: FAILED**

    @property
    def checks(self) -> list[Check]:
        return [check for checks in self.sections.values() for check in checks]

    @property
    def breaches(self) -> list[tuple[str, Check]]:
        return [(section, c) for section, checks in self.sections.items() for c in checks if c.passed is False]

    @property
    def failures(self) -> list[Check]:
        return [check for _, check in self.breaches]

    @property
    def passed(self) -> bool:
        return not self.breaches

    def describe_failures(self) -> str:
        return "; ".join(check.describe() for check in self.failures)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "sections": {s: [c.to_dict() for c in checks] for s, checks in self.sections.items()}}

    def to_markdown(self) -> str:
        titled = len(self.sections) > 1
        head = f"**{self.title}: {'PASSED' if self.passed else 'FAILED'}**\n\n" if self.title else ""
        return head + "\n".join(
            (f"\n### {section}\n\n" if titled else "") + markdown_table(checks) for section, checks in self.sections.items()
        )

    def to_html(self) -> str:
        return "".join(f"<h2>{html.escape(section)}</h2>{html_table(checks)}" for section, checks in self.sections.items())


HEADER = ("check", "value", "bound", "verdict", "note")


def _cells(check: Check) -> tuple[str, ...]:
    return check.name, fmt(check.value), f"{check.op} {fmt(check.bound)}".strip(), check.verdict, check.note


def markdown_table(checks: list[Check]) -> str:
    rows = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    rows += ["| " + " | ".join(_cells(c)) + " |" for c in checks]
    return "\n".join(rows) + "\n"


def html_table(checks: list[Check]) -> str:
    head = "".join(f"<th>{h}</th>" for h in HEADER)
    rows = "".join(
        f"<tr class='{c.verdict.lower()}'>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in _cells(c)) + "</tr>"
        for c in checks
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


# -- classification metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # class -> precision, recall, f1, support
    confusion: list[list[int]]  # rows: true class, columns: predicted class


def classification(truth: Sequence, predicted: Sequence, labels: Sequence, names: Sequence[str] | None = None,
                   present_only: bool = False) -> Classification:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix.

    `labels` are the values `truth` and `predicted` use (class indices or names); a prediction
    outside them (a failed request) counts as wrong. `present_only` averages the macro figures
    over the classes that occur in `truth` (a window of production labels may lack some).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    truth, predicted, labels = np.asarray(truth), np.asarray(predicted), list(labels)
    names = [str(label) for label in labels] if names is None else list(names)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    keep = support > 0 if present_only else np.ones(len(labels), dtype=bool)
    return Classification(
        accuracy=float((truth == predicted).mean()) if len(truth) else 0.0,
        macro_precision=float(precision[keep].mean()) if keep.any() else 0.0,
        macro_recall=float(recall[keep].mean()) if keep.any() else 0.0,
        macro_f1=float(f1[keep].mean()) if keep.any() else 0.0,
        per_class={
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support)
        },
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist() if len(truth) else [[0] * len(labels)] * len(labels),
    )


def recall_interval(scores: dict[str, float], confidence: float) -> tuple[float, float]:
    """Where a class's true recall lies, from its test images: the Wilson score interval of
    `recall` x `support` hits at `confidence` (0: the recall itself at both ends). 19 of 26
    images give 0.731, within 0.54-0.86 at 0.95: 26 images cannot tell 0.73 from 0.80."""
    recall, n = scores["recall"], scores["support"]
    if not confidence:
        return recall, recall
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    centre, spread = recall + z * z / (2 * n), z * sqrt(recall * (1 - recall) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n)), min(1.0, (centre + spread) / (1 + z * z / n))


def _share(scores: dict[str, float]) -> str:
    return f"{round(scores['recall'] * scores['support'])}/{scores['support']}"


def min_class_recall_check(per_class: dict[str, dict[str, float]], bound: float, confidence: float) -> Check:
    """Every class's recall against `bound`, judged by the top of its interval (`recall_interval`):
    a class fails when its images show it below the bound, not when a few of them were hard."""
    tops = {name: recall_interval(s, confidence)[1] for name, s in per_class.items() if s["support"] > 0}
    if not tops:
        return skipped("min_class_recall", "no class has any labelled example")
    worst = min(tops, key=tops.get)
    note = f"worst class '{worst}'" + (f" {_share(per_class[worst])}: {confidence:.0%} upper bound" if confidence else "")
    return compare("min_class_recall", tops[worst], ">=", bound, note)


def recall_gap_check(per_class: dict[str, dict[str, float]], max_gap: float, confidence: float) -> Check:
    """Best minus worst class recall (classes with support only) against `max_gap`, judged
    between the bottom of the best class's interval and the top of the worst's (`recall_interval`)."""
    intervals = {name: recall_interval(s, confidence) for name, s in per_class.items() if s["support"] > 0}
    if not intervals:
        return skipped("recall_gap", "no class has any labelled example")
    best = max(intervals, key=lambda name: intervals[name][0])
    worst = min(intervals, key=lambda name: intervals[name][1])
    low, high = intervals[best][0], intervals[worst][1]
    if confidence:
        note = (f"'{best}' {_share(per_class[best])} at least {low:.3f} - '{worst}' {_share(per_class[worst])}"
                f" at most {high:.3f} ({confidence:.0%} bounds)")
    else:
        note = f"'{best}' {low:.3f} - '{worst}' {high:.3f}"
    return compare("recall_gap", max(0.0, low - high), "<=", max_gap, note)
