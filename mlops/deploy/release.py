"""The release rule: which version a deploy action serves and how the aliases move.

`plan(action, aliases, live)` is a pure function from facts (where the aliases point, what is
serving) to a decision; the deploy flow gathers the facts, carries the plan out, and moves the
aliases only once the new server is live (validate: once its application tests pass).

The rules it keeps:
- validate serves the `candidate` and, on pass, points `approved` at it;
- only the `approved` version can be released; the released version becomes `production` and
  the one it replaced `previous` (and the new version remembers it as its `replaced` version);
- rollback serves `previous`; `previous` then steps back to what that version had replaced (so
  a second rollback goes further back, never forward again), and the version rolled back from
  loses `approved`: it must pass the test environment again before it can return;
- stop moves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

REPLACED_TAG = "mlops.replaced_version"  # on a released version: the production version it replaced


class Action(StrEnum):
    VALIDATE = "validate"
    RELEASE = "release"
    ROLLBACK = "rollback"
    STOP = "stop"


class Role(StrEnum):
    """The aliases the rule moves (their names in the registry come from `mlflow.*_alias`)."""

    CANDIDATE = "candidate"
    APPROVED = "approved"
    PRODUCTION = "production"
    PREVIOUS = "previous"


@dataclass(frozen=True)
class Aliases:
    candidate: str | None = None
    approved: str | None = None
    production: str | None = None
    previous: str | None = None
    before_previous: str | None = None  # the version `previous` replaced when it was released


@dataclass(frozen=True)
class Move:
    role: Role
    version: str | None  # None removes the alias


@dataclass(frozen=True)
class Plan:
    action: Action
    version: str | None  # the version to serve; None: start nothing
    moves: tuple[Move, ...] = ()
    replaced: str | None = None  # release: the production version the new one replaces
    reason: str = ""


class Refused(ValueError):
    """The action cannot be done with the aliases as they are; the message says what to do."""


def plan(action: Action | str, aliases: Aliases, live: str | None = None) -> Plan:
    """What `action` does given `aliases` and the version `live` (serving in this environment)."""
    action = Action(action)
    if action is Action.STOP:
        return Plan(action, None, reason="stop the server; aliases stay")
    if action is Action.VALIDATE:
        if aliases.candidate is None:
            raise Refused("no 'candidate' version: run `python -m flows.build` first")
        return Plan(action, aliases.candidate, (Move(Role.APPROVED, aliases.candidate),),
                    reason=f"test version {aliases.candidate}, approve it on pass")
    if action is Action.RELEASE:
        target = aliases.approved
        if target is None:
            raise Refused("no 'approved' version: only an approved version can be released"
                          " (run `python -m flows.deploy env=test` first)")
        if target == aliases.production and live == target:
            return Plan(action, None, reason=f"version {target} is already serving")
        if target == aliases.production:  # production alias set but its server is gone: restart it
            return Plan(action, target, reason=f"version {target} is production but not serving: restart it")
        replaced = aliases.production
        moves = ((Move(Role.PREVIOUS, replaced),) if replaced else ()) + (Move(Role.PRODUCTION, target),)
        return Plan(action, target, moves, replaced, f"release version {target}, replacing {replaced or 'nothing'}")
    target = aliases.previous  # rollback
    if target is None:
        raise Refused("no 'previous' version to roll back to: nothing was released before the current one"
                      " (or it was rolled back already)")
    # what `previous` once replaced, unless that is the version being left (a re-release of an
    # older version records the newer one as replaced): going back must never lead forward again
    before = aliases.before_previous if aliases.before_previous not in (aliases.production, target) else None
    moves = [Move(Role.PRODUCTION, target), Move(Role.PREVIOUS, before)]
    if aliases.approved is not None and aliases.approved == aliases.production:
        moves.append(Move(Role.APPROVED, None))  # the version rolled back from must be approved again
    return Plan(action, target, tuple(moves), reason=f"roll back from {aliases.production} to {target}")
