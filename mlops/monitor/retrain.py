"""The retraining rule: whether a monitor run starts the build flow, and how.

`retrain_policy` is a pure function from facts (the window's breaches, when retraining last
started, whether the build deployment exists) to a `RetrainDecision`; the monitor flow carries
it out. One breach starts one build: later runs inside the cool-down only say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit


class RetrainKind(StrEnum):
    NONE = "none"  # no breach in the retraining sections
    COOLDOWN = "cooldown"  # wanted, but retraining started less than `cooldown` ago
    DEPLOYMENT = "deployment"  # start a run of the build deployment
    IN_PROCESS = "in_process"  # run the build flow in this process
    MISSING_DEPLOYMENT = "missing_deployment"  # mode: deployment, and it does not exist
    WAITING_FOR_LABELS = "waiting_for_labels"  # wanted, on production data, with too few labels yet


@dataclass(frozen=True)
class RetrainDecision:
    kind: RetrainKind
    reasons: tuple[str, ...] = ()  # the breached checks, "section.check"
    note: str = ""

    @property
    def starts(self) -> bool:
        return self.kind in (RetrainKind.DEPLOYMENT, RetrainKind.IN_PROCESS)


def retrain_reasons(breaches: list[str], sections: list[str]) -> tuple[str, ...]:
    """The breached checks ("section.check") of the retraining `sections`, sorted."""
    return tuple(sorted({b for b in breaches if b.split(".", 1)[0] in sections}))


def retrain_policy(
    breaches: list[str],
    sections: list[str],
    mode: str,
    cooldown: timedelta,
    last_started: datetime | None,
    now: datetime,
    deployment_exists: bool,
    labelled: int | None = None,
    min_labelled: int = 0,
) -> RetrainDecision:
    """`breaches` are "section.check" names; `mode` is deployment | in_process | auto.

    `labelled`: the labelled production images a retraining build would add (None: it adds
    none); below `min_labelled` the retrain waits for labels rather than train on a handful."""
    reasons = retrain_reasons(breaches, sections)
    if not reasons:
        return RetrainDecision(RetrainKind.NONE, note="no breach in the retraining sections")
    if last_started is not None and now - last_started < cooldown:
        return RetrainDecision(RetrainKind.COOLDOWN, reasons, f"in cool-down since {last_started.isoformat()}")
    if labelled is not None and labelled < min_labelled:
        return RetrainDecision(
            RetrainKind.WAITING_FOR_LABELS, reasons,
            f"{labelled} labelled production image(s), fewer than monitor.retrain.min_labelled ({min_labelled})",
        )
    if mode == "in_process":
        return RetrainDecision(RetrainKind.IN_PROCESS, reasons, "monitor.retrain.mode: in_process")
    if deployment_exists:
        return RetrainDecision(RetrainKind.DEPLOYMENT, reasons, f"monitor.retrain.mode: {mode}")
    if mode == "deployment":
        return RetrainDecision(RetrainKind.MISSING_DEPLOYMENT, reasons, "monitor.retrain.deployment does not exist")
    return RetrainDecision(RetrainKind.IN_PROCESS, reasons, "mode auto and no build deployment: in-process")


def store_overrides(stores: dict[str, object]) -> tuple[list[str], list[str]]:
    """Hydra overrides that point a build at these stores (dotted key -> resolved value), whatever
    the environment of the process that runs it (a Prefect worker with another `MLOPS_WORKSPACE`);
    and the keys left out because their value holds a password (a flow run's parameters show in the
    Prefect UI; the worker's environment must supply those)."""
    overrides, withheld = [], []
    for key, value in stores.items():
        if value is None:
            continue
        text = str(value)
        if urlsplit(text).password is not None:
            withheld.append(key)
            continue
        overrides.append(f"{key}='{text.replace(chr(39), chr(92) + chr(39))}'")
    return overrides, withheld
