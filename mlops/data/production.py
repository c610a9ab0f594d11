"""Labelled production samples: captured requests joined with their feedback labels.

The rules are pure functions (no files, no clock), so what a retraining build adds to its data
is decided the same way in a test and in production:

- `join_labels`: which captured images have a true label, and every label that could not be
  used (an unknown class, two different labels for one request, a label for a request that
  was not captured) with the reason;
- `time_split`: the newest share of the labelled samples held out (the production holdout),
  the rest for training.

`collect` reads both sides from where the model servers wrote them (`captures.url`,
`records.dir`) and joins them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

OnConflict = Literal["last", "drop"]  # two different labels for one request: the latest wins, or neither


class Capture(Protocol):
    request_id: str
    time: datetime


@dataclass(frozen=True)
class Label:
    request_id: str
    label: str
    time: datetime


@dataclass(frozen=True)
class Labelled:
    capture: Capture
    label: str


@dataclass(frozen=True)
class LabelProblem:
    request_id: str
    kind: Literal["unknown_class", "conflicting", "not_captured"]
    detail: str


@dataclass(frozen=True)
class Joined:
    labelled: list[Labelled]  # in capture time order
    unlabelled: list[Capture]  # captured, no usable label (none yet, or dropped conflicting ones)
    problems: list[LabelProblem]

    def counts(self) -> dict[str, int]:
        """Labelled samples per class."""
        counts: dict[str, int] = defaultdict(int)
        for sample in self.labelled:
            counts[sample.label] += 1
        return dict(sorted(counts.items()))

    def problem_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for problem in self.problems:
            counts[problem.kind] += 1
        return dict(sorted(counts.items()))


def join_labels(
    captures: Iterable[Capture], labels: Iterable[Label], classes: Sequence[str], on_conflict: OnConflict
) -> Joined:
    """Each captured request with its label. A repeated identical label counts once; different
    labels for one request follow `on_conflict`; an unknown class and a label for a request
    that was not captured (sampled out, or expired) are reported and not used."""
    known = set(classes)
    by_request: dict[str, list[Label]] = defaultdict(list)
    problems: list[LabelProblem] = []
    for label in labels:
        if label.label not in known:
            problems.append(LabelProblem(label.request_id, "unknown_class", f"'{label.label[:60]}' is not one of {sorted(known)}"))
        else:
            by_request[label.request_id].append(label)
    captured = sorted(captures, key=lambda c: (c.time, c.request_id))
    ids = {capture.request_id for capture in captured}
    for request_id in sorted(set(by_request) - ids):
        problems.append(LabelProblem(request_id, "not_captured", "labelled, but its image was not captured (or expired)"))

    labelled, unlabelled = [], []
    for capture in captured:
        given = by_request.get(capture.request_id)
        if not given:
            unlabelled.append(capture)
            continue
        distinct = sorted({label.label for label in given})
        if len(distinct) > 1:
            latest = max(given, key=lambda label: label.time)
            chosen = latest.label if on_conflict == "last" else None
            outcome = f"the latest, '{latest.label}', is used" if chosen else "neither is used (on_conflict: drop)"
            problems.append(LabelProblem(capture.request_id, "conflicting", f"labels {distinct}: {outcome}"))
            if chosen is None:
                unlabelled.append(capture)  # no usable label: a person may settle it
                continue
        else:
            chosen = distinct[0]
        labelled.append(Labelled(capture, chosen))
    return Joined(labelled, unlabelled, problems)


def time_split(samples: Sequence[Labelled], holdout_share: float) -> tuple[list[Labelled], list[Labelled]]:
    """(train, holdout): the newest `holdout_share` of the samples, by capture time, held out.

    A holdout of at least one sample whenever the share is above zero and there are two or more
    samples, so that a small window still gets judged on what production saw last."""
    if not 0.0 <= holdout_share < 1.0:
        raise ValueError(f"holdout_share {holdout_share} is outside [0, 1)")
    ordered = sorted(samples, key=lambda s: (s.capture.time, s.capture.request_id))
    held = math.ceil(len(ordered) * holdout_share) if holdout_share > 0 and len(ordered) >= 2 else 0
    return ordered[: len(ordered) - held], ordered[len(ordered) - held :]


@dataclass(frozen=True)
class Collected:
    joined: Joined
    unreadable: list[str]  # capture sidecars and record lines that could not be used, with why


def collect(
    captures_url: str, records_dir: Path, classes: Sequence[str], on_conflict: OnConflict, start: datetime,
    end: datetime | None = None,
) -> Collected:
    """The requests captured in [start, end) joined with every feedback label written since
    `start` (a label arrives after its request, sometimes days after)."""
    from mlops.serve.capture import read_captures
    from mlops.serve.records import read_window

    captures = read_captures(captures_url, start, end)
    feedback = read_window(records_dir, "feedback", start, datetime.now(UTC) + timedelta(hours=1))
    labels = [Label(r["request_id"], r["label"], _aware(r["time"])) for r in feedback.records]
    return Collected(join_labels(captures.captured, labels, classes, on_conflict), captures.unreadable + feedback.unreadable)


def _aware(time: datetime | str) -> datetime:
    return (datetime.fromisoformat(time) if isinstance(time, str) else time).astimezone(UTC)
