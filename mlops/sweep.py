"""Sweeps that choose: the jobs of a `-m` run (a grid, or an Optuna search), the best passing
one by the configured metric, and the table a sweep ends with. Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlops.checks import fmt


@dataclass
class Job:
    """One job of a sweep: its overrides and what its build gave (or the error that stopped it)."""

    number: int
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    gate: str = "error"  # passed | failed | error
    run_id: str | None = None
    data_version: str | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.gate == "passed"


def objective(metrics: dict[str, float], metric: str) -> float:
    """The job's value of `metric`; a KeyError that lists the metrics there are when it has none."""
    value = metrics.get(metric)
    if value is None or math.isnan(value):
        known = ", ".join(sorted(metrics)) or "none"
        raise KeyError(f"sweep.metric={metric}: the build logged no such metric (it logged {known})")
    return value


def best(jobs: list[Job], metric: str, direction: str) -> Job | None:
    """The passing job with the best `metric` (`maximize` or `minimize`); the earlier job wins a tie.
    None when no job passed the gate."""
    passing = [job for job in jobs if job.passed and metric in job.metrics]
    if not passing:
        return None
    sign = -1 if direction == "maximize" else 1
    return min(passing, key=lambda job: (sign * job.metrics[metric], job.number))


def varying(jobs: list[Job]) -> list[str]:
    """The override keys whose value differs between jobs: the columns worth showing."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job.overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1 or any(key not in dict_of(j) for j in jobs)]


def dict_of(job: Job) -> dict[str, str]:
    return dict(override.partition("=")[::2] for override in job.overrides)


def short(value: str) -> str:
    """An override's value for a table cell: an Optuna float to 4 significant digits."""
    try:
        return value if float(value).is_integer() else fmt(float(value))
    except ValueError:
        return value


def table(jobs: list[Job], metric: str, direction: str, chosen: Job | None, shown: tuple[str, ...] = ("test_accuracy",)) -> str:
    """A markdown table of the jobs: the overrides that vary, the chosen metric and a few others,
    the gate verdict; the chosen job marked."""
    keys = varying(jobs)
    metrics = [metric, *(m for m in shown if m != metric)]
    head = ["job", *keys, *metrics, "gate", "run"]
    lines = [f"Sweep of {len(jobs)} jobs, best passing by {metric} ({direction}):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in jobs:
        values = dict_of(job)
        gate = job.gate if job.error is None else f"error: {job.error[:80]}"
        cells = [f"{job.number}{' (best)' if job is chosen else ''}", *(short(values.get(k, "")) for k in keys),
                 *(fmt(job.metrics.get(m)) for m in metrics), gate, f"`{job.run_id}`" if job.run_id else "-"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    if chosen is None:
        lines.append("No job passed the gate: no alias moved.")
    else:
        lines.append(f"Best: job {chosen.number} ({' '.join(chosen.overrides) or 'no overrides'}),"
                     f" {metric} {fmt(chosen.metrics[metric])}.")
    return "\n".join(lines) + "\n"
