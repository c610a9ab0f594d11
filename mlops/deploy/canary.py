"""Canary and shadow rules: which requests the new version answers, and whether it may go on.

The server holds both versions in one process. `routes_to_canary` sends a request to the new
version when the hash of its routing key (a client's `X-Route-Key` header, for a sticky choice,
else the request id) falls under the step's share; raising the share keeps every key already
routed there. During each bake the deploy flow reads the server's request records into one
`ArmFigures` per version and `judge_bake` says promote, roll back or wait. The same figures of
shadow records give the monitor's champion-challenger comparison (`compare_shadow`).

All pure functions: the flow and the monitor gather the records and act on what they return.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

ROUTE_HEADER = "x-route-key"
BUCKETS = 10_000
INTERIM = 10  # before a bake is served, a breach by chance must be this many times less likely
RESAMPLES = 19_999  # draws of the permutation test: p-values down to 1 / 20,000


class Role(StrEnum):
    """Who answered a recorded request: the served version, the canary, or the shadow (unseen)."""

    CHAMPION = "champion"
    CANARY = "canary"
    SHADOW = "shadow"


def bucket(key: str) -> float:
    """A stable place in [0, 1) for `key`: the same on every process and machine."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS / BUCKETS


def routes_to_canary(key: str, share: float) -> bool:
    return share > 0.0 and bucket(key) < share


def sampled(key: str, rate: float) -> bool:
    """Whether a request is copied to the shadow version (its own hash: independent of routing)."""
    return rate > 0.0 and bucket("shadow:" + key) < rate


@dataclass
class ArmFigures:
    """What one version did during a bake (or a monitor window)."""

    requests: int = 0
    errors: int = 0  # the model call failed (status error); rejected inputs are the client's doing
    latencies_ms: list[float] = field(default_factory=list)
    predictions: Counter = field(default_factory=Counter)
    labelled: int = 0
    correct: int = 0

    def add(self, record: Mapping, label: str | None = None) -> None:
        status = record.get("status")
        if status == "rejected":
            return
        self.requests += 1
        if status != "ok":
            self.errors += 1
            return
        self.latencies_ms.append(float(record["latency_ms"]))
        self.predictions[record["prediction"]] += 1
        if label is not None:
            self.labelled += 1
            self.correct += record["prediction"] == label

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def figures(self) -> dict[str, float | int | None]:
        p95, accuracy = self.p95_ms, self.accuracy
        return {"requests": self.requests, "error_rate": round(self.error_rate, 4),
                "p95_ms": None if p95 is None else round(p95, 2), "labelled": self.labelled,
                "accuracy": None if accuracy is None else round(accuracy, 4)}


def prediction_shift(a: Counter, b: Counter) -> float:
    """Total variation distance between two class distributions: 0 same, 1 disjoint."""
    total_a, total_b = sum(a.values()), sum(b.values())
    if not total_a or not total_b:
        return 0.0
    return 0.5 * sum(abs(a[c] / total_a - b[c] / total_b) for c in set(a) | set(b))


def shift_p_value(a: Counter, b: Counter) -> float:
    """The chance that two arms of the same version differ by this total variation or more: a
    permutation test (the pooled answers split at random into arms of these sizes, drawn as
    multivariate hypergeometric counts, so its cost does not grow with the requests). Valid at
    the few answers per class of a short bake, where a chi-square test's approximation is not
    (tests/test_canary.py holds a split it puts at 0.006, against 0.016); seeded, so the same
    figures give the same verdict."""
    classes = sorted(set(a) | set(b))
    counts_a, counts_b = np.array([a[c] for c in classes]), np.array([b[c] for c in classes])
    total_a, total_b = int(counts_a.sum()), int(counts_b.sum())
    if len(classes) < 2 or not total_a or not total_b:
        return 1.0
    pooled = counts_a + counts_b
    drawn = np.random.default_rng(0).multivariate_hypergeometric(pooled, total_a, size=RESAMPLES)
    shifts = 0.5 * np.abs(drawn / total_a - (pooled - drawn) / total_b).sum(axis=1)
    as_large = np.count_nonzero(shifts >= prediction_shift(a, b) - 1e-12)
    return float((1 + as_large) / (RESAMPLES + 1))


def drop_p_value(old: ArmFigures, new: ArmFigures) -> float:
    """Fisher's exact test that the new version is less accurate than the old (one-sided)."""
    from scipy.stats import fisher_exact

    table = [[old.correct, old.labelled - old.correct], [new.correct, new.labelled - new.correct]]
    return float(fisher_exact(table, alternative="greater")[1])


class Verdict(StrEnum):
    PROMOTE = "promote"  # this step passed: next share (or 100%)
    ROLLBACK = "rollback"
    WAIT = "wait"  # not enough seen yet


@dataclass(frozen=True)
class BakeBounds:
    min_requests: int
    max_error_rate_increase: float
    max_p95_ratio: float
    max_prediction_shift: float
    max_accuracy_drop: float
    min_labelled: int
    alpha: float  # a shift or accuracy drop over its bound must also be this unlikely by chance


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reasons: tuple[str, ...]  # the breaches (rollback) or what it waits for


def judge_bake(old: ArmFigures, new: ArmFigures, bounds: BakeBounds, baked: bool, timed_out: bool) -> Judgement:
    """Promote, roll back or wait, from both versions' figures in one bake.

    A breach rolls back at once (no need to wait the bake out). Error rate is judged as soon as
    the new version has `min_requests`; latency, prediction shift and accuracy also need the old
    version's figures (accuracy only once both have `min_labelled` labels). A prediction shift or
    accuracy drop is a breach when it is over its bound and unlikely by chance: small samples of ten
    classes differ by 0.2 in total variation with nothing changed. The flow asks at every poll, so
    the looks before the last (the one that would promote) need p < alpha / INTERIM, and the last
    p < alpha (a Haybittle-Peto boundary): a test at alpha at each of a bake's many looks would roll
    back a good version several times more often than alpha. Promotion needs the bake time served
    and `min_requests`; a bake that times out without them rolls back.
    """
    breaches = []
    enough = new.requests >= bounds.min_requests
    level = bounds.alpha if baked and enough else bounds.alpha / INTERIM
    if enough and new.error_rate - old.error_rate > bounds.max_error_rate_increase:
        breaches.append(f"error rate {new.error_rate:.3f} vs {old.error_rate:.3f}"
                        f" (max increase {bounds.max_error_rate_increase})")
    if enough and old.requests >= bounds.min_requests:
        if new.p95_ms is not None and old.p95_ms and new.p95_ms > bounds.max_p95_ratio * old.p95_ms:
            breaches.append(f"p95 latency {new.p95_ms:.1f} ms vs {old.p95_ms:.1f} ms (max ratio {bounds.max_p95_ratio})")
        shift = prediction_shift(new.predictions, old.predictions)
        if shift > bounds.max_prediction_shift and (p := shift_p_value(new.predictions, old.predictions)) < level:
            breaches.append(f"prediction shift {shift:.3f} (max {bounds.max_prediction_shift}, p={p:.2g})")
    if min(new.labelled, old.labelled) >= bounds.min_labelled:
        drop = old.accuracy - new.accuracy
        if drop > bounds.max_accuracy_drop and (p := drop_p_value(old, new)) < level:
            breaches.append(f"accuracy {new.accuracy:.3f} vs {old.accuracy:.3f} (max drop {bounds.max_accuracy_drop},"
                            f" p={p:.2g})")
    if breaches:
        return Judgement(Verdict.ROLLBACK, tuple(breaches))
    if baked and enough:
        return Judgement(Verdict.PROMOTE, ())
    missing = ([] if baked else ["the bake time"]) + ([] if enough else
                                                      [f"{bounds.min_requests} requests ({new.requests} so far)"])
    if timed_out:
        return Judgement(Verdict.ROLLBACK, (f"timed out waiting for {' and '.join(missing)}",))
    return Judgement(Verdict.WAIT, tuple(missing))


def arms(records: Iterable[Mapping], labels: Mapping[str, str], versions: Mapping[str, str]) -> dict[str, ArmFigures]:
    """Figures per role ("champion", "canary", "shadow") of the records whose version is the one
    `versions` names for that role (a record of an earlier server is left out); `labels`:
    request id -> /feedback label."""
    found = {role: ArmFigures() for role in versions}
    for record in records:
        role = record.get("role") or Role.CHAMPION
        if role in found and record.get("model_version") == versions[role]:
            found[role].add(record, labels.get(record.get("request_id")))
    return found


@dataclass(frozen=True)
class ShadowComparison:
    """Champion and shadow on the same requests."""

    pairs: int
    agreement: float | None
    champion: dict
    shadow: dict
    champion_confidence: float | None
    shadow_confidence: float | None


def compare_shadow(records: Iterable[Mapping], labels: Mapping[str, str]) -> ShadowComparison:
    """Pair each shadow record with the served answer of the same request id: agreement of their
    predictions, mean confidence, latency and (where labelled) accuracy of each."""
    served, shadows = {}, {}
    for record in records:
        if record.get("status") == "rejected":
            continue
        role = record.get("role") or Role.CHAMPION
        (shadows if role == Role.SHADOW else served)[record["request_id"]] = record
    common = [rid for rid in shadows if rid in served]
    champion, shadow = ArmFigures(), ArmFigures()
    agree, confidences = 0, ([], [])
    for rid in common:
        a, b = served[rid], shadows[rid]
        champion.add(a, labels.get(rid))
        shadow.add(b, labels.get(rid))
        if a.get("status") == "ok" and b.get("status") == "ok":
            agree += a["prediction"] == b["prediction"]
            confidences[0].append(a["confidence"])
            confidences[1].append(b["confidence"])
    answered = len(confidences[0])
    return ShadowComparison(
        len(common), agree / answered if answered else None, champion.figures(), shadow.figures(),
        float(np.mean(confidences[0])) if answered else None, float(np.mean(confidences[1])) if answered else None,
    )
