"""The release approval rule: who may let a version into production, and what is recorded.

With `deploy.approval: manual` (production's default) a person certifies the version the test
environment passed: in the Prefect UI's form of the paused release run, or from the command line
(`action=approve|reject version=N reviewer=... comment=...`). The decision is kept as tags on the
model version (`approval.*`) and a section of its model card; `releasable` reads them back.
A rejection, a missing decision or one given for an earlier test run blocks the release.

These are pure functions: the deploy flow gathers the facts and writes what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

PREFIX = "approval."
DECISION_TAG = PREFIX + "decision"
TESTED_AT_TAG = PREFIX + "tested_at"  # the test run the decision was given for
MAX_COMMENT = 500
MAX_REVIEWER = 100


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class BadDecision(ValueError):
    """A decision that cannot be recorded; the message names the field."""


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reviewer: str
    comment: str
    at: datetime
    via: str  # "prefect-ui" or "cli"


def decide(decision: str | bool, reviewer: str | None, comment: str | None, at: datetime, via: str) -> Verdict:
    """A checked decision: approve/reject (or True/False from the form), a named reviewer, and
    for a rejection a reason."""
    if isinstance(decision, bool):
        decision = Decision.APPROVED if decision else Decision.REJECTED
    try:
        decision = Decision(str(decision).strip().lower())
    except ValueError:
        raise BadDecision(f"decision '{decision}': give 'approved' or 'rejected'") from None
    reviewer = " ".join((reviewer or "").split())
    if not reviewer:
        raise BadDecision("reviewer: a decision needs the reviewer's name (reviewer=...)")
    if len(reviewer) > MAX_REVIEWER:
        raise BadDecision(f"reviewer: at most {MAX_REVIEWER} characters ({len(reviewer)} given)")
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise BadDecision(f"comment: at most {MAX_COMMENT} characters ({len(comment)} given)")
    if decision is Decision.REJECTED and not comment:
        raise BadDecision("comment: a rejection needs a reason (comment=...)")
    return Verdict(decision, reviewer, comment, at, via)


def decision_tags(verdict: Verdict, tested_at: str | None) -> dict[str, str]:
    """The `approval.*` tags that record `verdict` on the model version."""
    return {
        DECISION_TAG: verdict.decision.value,
        PREFIX + "reviewer": verdict.reviewer,
        PREFIX + "comment": verdict.comment,
        PREFIX + "at": verdict.at.isoformat(),
        PREFIX + "via": verdict.via,
        TESTED_AT_TAG: tested_at or "",
    }


def card_section(version: str, verdict: Verdict) -> str:
    """The model card's record of a decision (appended: earlier decisions stay readable)."""
    comment = verdict.comment or "(no comment)"
    return (f"\n## Release decision ({verdict.at:%Y-%m-%d %H:%M} UTC)\n"
            f"Version {version} **{verdict.decision.value}** by {verdict.reviewer} ({verdict.via}): {comment}\n")


def releasable(tags: dict[str, str], mode: str) -> tuple[bool, str]:
    """May the version with `tags` be released under `deploy.approval: mode`? (yes/no, why)"""
    if mode == "auto":
        return True, "deploy.approval is auto"
    tested = tags.get("deploy.test.at")
    if tags.get("deploy.test.status") != "passed" or not tested:
        return False, "it has not passed the test environment (python -m flows.deploy env=test)"
    decision = tags.get(DECISION_TAG)
    if decision is None:
        return False, "no decision recorded: approve it in the Prefect UI or with action=approve"
    if tags.get(TESTED_AT_TAG) != tested:
        return False, "its decision was given for an earlier test run: decide again"
    by = f"{tags.get(PREFIX + 'reviewer', '?')} ({tags.get(PREFIX + 'at', '?')})"
    if decision != Decision.APPROVED:
        return False, f"rejected by {by}: {tags.get(PREFIX + 'comment', '')}"
    return True, f"approved by {by}"


def awaiting(tags: dict[str, str]) -> bool:
    """Whether a person should be asked: the version passed its latest test run and has no
    decision for that run (none, or one given for an earlier run)."""
    tested = tags.get("deploy.test.at")
    return tags.get("deploy.test.status") == "passed" and bool(tested) and tags.get(TESTED_AT_TAG) != tested


def readable(value: str) -> str:
    """A tag's number to 4 significant digits (tags hold floats' full text); other text as it is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def summary_for_reviewer(version: str, tags: dict[str, str]) -> str:
    """What the form shows above its fields: the test environment's figures for `version`."""
    prefix = "deploy.test."
    rows = "\n".join(f"| {key[len(prefix):]} | {readable(value)} |" for key, value in sorted(tags.items())
                     if key.startswith(prefix))
    return (f"### Release version {version} to production?\n\nApplication tests in the test environment:\n\n"
            f"| figure | value |\n|---|---|\n{rows}\n\nApprove, or reject with a reason.")
