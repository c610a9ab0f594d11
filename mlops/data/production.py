"""Labelled production samples: captured requests joined with their feedback labels.

The rules are pure functions (no files, no clock), so what a retraining build adds to its data
is decided the same way in a test and in production:

- `join_labels`: which captured images have a true label, and every label that could not be
  used (an unknown class, two different labels for one request, a label for a request that
  was not captured) with the reason;
- `time_split`: the newest share of the labelled samples held out (the production holdout),
  the rest for training.

`collect` reads both sides from where the model servers wrote them (`captures.url`, and
`records.url` or else `records.dir`) and joins them; `split_production` decides where each
labelled image goes in a dataset and `add_production` puts them there: validated like any
image, with the provenance of every file in the manifest, so the new data version needs no
capture to be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
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
        return _counts(self.labelled)

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
    captures_url: str, records: Path | str, classes: Sequence[str], on_conflict: OnConflict, start: datetime,
    end: datetime | None = None,
) -> Collected:
    """The requests captured in [start, end) (None: unbounded) joined with every feedback label
    written since `start` (a label arrives after its request, sometimes days after)."""
    from mlops.serve.capture import read_captures
    from mlops.serve.records import read_window

    captures = read_captures(captures_url, start, end)
    now = datetime.now(UTC)
    # no start (all that is stored): a label comes after its request, so none before the oldest capture
    since = start or (captures.captured[0].time if captures.captured else now)
    feedback = read_window(records, "feedback", since, now + timedelta(hours=1))
    labels = [Label(r["request_id"], r["label"], _aware(r["time"])) for r in feedback.records]
    return Collected(join_labels(captures.captured, labels, classes, on_conflict), captures.unreadable + feedback.unreadable)


def _aware(time: datetime | str) -> datetime:
    return (datetime.fromisoformat(time) if isinstance(time, str) else time).astimezone(UTC)


# -- into a dataset -------------------------------------------------------------------------

HOLDOUT = "holdout"  # the split folder of the production holdout
PREFIX = "production__"  # file names of production images in a dataset: production__<request id>.<ext>


def split_production(
    samples: Sequence[Labelled], split: Literal["time", "stratified"], share: float, val_fraction: float, seed: int
) -> dict[str, list[Labelled]]:
    """train / val / holdout. The holdout is the newest `share` (time) or a seeded `share` of
    each class (stratified, at least one of a class with two or more); the rest is split per
    class like the source data, `val_fraction` of each class to val."""
    if split == "time":
        rest, holdout = time_split(samples, share)
    else:
        rest, holdout = [], []
        for label, group in sorted(_by_class(samples).items()):
            shuffled = _shuffled(group, f"{seed}:production-holdout:{label}")
            n = len(shuffled)
            held = min(max(1, math.floor(n * share + 0.5)), n - 1) if n >= 2 else 0
            holdout += shuffled[:held]
            rest += shuffled[held:]
    parts: dict[str, list[Labelled]] = {"train": [], "val": [], HOLDOUT: _by_time(holdout)}
    for label, group in sorted(_by_class(rest).items()):
        shuffled = _shuffled(group, f"{seed}:production:{label}")
        n_val = math.floor(len(shuffled) * val_fraction + 0.5)
        parts["val"] += shuffled[:n_val]
        parts["train"] += shuffled[n_val:]
    return {name: _by_time(items) for name, items in parts.items()}


def _by_class(samples: Iterable[Labelled]) -> dict[str, list[Labelled]]:
    groups: dict[str, list[Labelled]] = defaultdict(list)
    for sample in samples:
        groups[sample.label].append(sample)
    return groups


def _by_time(samples: Iterable[Labelled]) -> list[Labelled]:
    return sorted(samples, key=lambda s: (s.capture.time, s.capture.request_id))


def _shuffled(samples: Iterable[Labelled], key: str) -> list[Labelled]:
    ordered = sorted(samples, key=lambda s: s.capture.request_id)
    random.Random(key).shuffle(ordered)
    return ordered


@dataclass(frozen=True)
class Added:
    """What `add_production` put in a dataset."""

    counts: dict[str, dict[str, int]]  # split -> class -> images
    rejected: list[dict]  # request_id, kind, detail: failed validation, unreadable or changed since capture

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def add_production(
    dataset: Path, samples: Sequence[Labelled], split: Literal["time", "stratified"], share: float,
    val_fraction: float, seed: int, policy, quarantine_dir: Path, provenance: dict,
) -> Added:
    """Copy the labelled production images into the prepared dataset at `dataset` (its
    `manifest.json` gains a "production" section: `provenance`, the counts and every file's
    request id, capture time, serving version, label and sha256).

    Each image is checked like a source image (`policy`: a ValidationPolicy) and against the
    sha256 its capture recorded; a failure is copied under `quarantine_dir` with a report and
    left out. The source data's splits are not touched, so its test split stays the old world's."""
    from mlops.data.ingest import MANIFEST, inspect_image

    staging = dataset.parent / f".{dataset.name}.production"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    usable, rejected = [], []
    try:
        for sample in samples:
            capture = sample.capture
            name = PREFIX + capture.image_url.rsplit("/", 1)[-1]
            try:
                data = capture.read_bytes()
            except Exception as error:  # noqa: BLE001 - expired or unreachable: reported, not fatal
                rejected.append({"request_id": capture.request_id, "kind": "unreadable", "detail": f"{type(error).__name__}: {error}"[:200]})
                continue
            path = staging / name
            path.write_bytes(data)
            if hashlib.sha256(data).hexdigest() != capture.sha256:
                problem = ("changed", "its bytes no longer match the sha256 recorded at capture")
            else:
                problem = inspect_image(path, policy)
            if problem is None:
                usable.append((sample, path))
            else:
                rejected.append({"request_id": capture.request_id, "kind": problem[0], "detail": problem[1]})
                target = quarantine_dir / problem[0] / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        if rejected:
            quarantine_dir.mkdir(parents=True, exist_ok=True)
            (quarantine_dir / "report.json").write_text(json.dumps(rejected, indent=2))

        staged = {id(sample): path for sample, path in usable}
        parts = split_production([sample for sample, _ in usable], split, share, val_fraction, seed)
        counts: dict[str, dict[str, int]] = {}
        files = []
        for part, chosen in parts.items():
            counts[part] = _counts(chosen)
            for sample in chosen:
                source = staged[id(sample)]
                target = dataset / part / sample.label / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(source, target)
                capture = sample.capture
                files.append({
                    "file": str(target.relative_to(dataset)), "request_id": capture.request_id,
                    "time": capture.time.isoformat(), "model_version": capture.model_version,
                    "label": sample.label, "sha256": capture.sha256,
                })
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    section = provenance | {"counts": counts, "rejected": rejected, "files": sorted(files, key=lambda f: f["file"])}
    manifest = json.loads((dataset / MANIFEST).read_text())
    manifest["production"] = section
    for part, per_class in counts.items():
        merged = manifest["counts"].setdefault(part, {})
        for label, n in per_class.items():
            merged[label] = merged.get(label, 0) + n
    (dataset / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Added(counts, rejected)


def _counts(samples: Iterable[Labelled]) -> dict[str, int]:
    """Samples per class, by class name."""
    return {label: len(group) for label, group in sorted(_by_class(samples).items())}


def production_tags(section: dict | None) -> dict[str, str]:
    """Lineage tags of a dataset's production images: base version, window, count per class."""
    if not section:
        return {}
    per_class: dict[str, int] = defaultdict(int)
    for counts in section["counts"].values():
        for label, n in counts.items():
            per_class[label] += n
    return {
        "data_base_version": section["base_version"],
        "data_production_window": f"{section['window']} ({section['first']} to {section['last']})",
        "data_production_counts": json.dumps(dict(sorted(per_class.items())), separators=(",", ":")),
        "data_production_holdout": str(sum(section["counts"].get(HOLDOUT, {}).values())),
    }
