"""The release rule (`mlops.deploy.release.plan`): pure, no registry, no server."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mlops.deploy.release import Action, Aliases, Move, Plan, Refused, Role, plan


def test_validate_serves_the_candidate_and_approves_it():
    p = plan("validate", Aliases(candidate="3", production="2"))
    assert p == Plan(Action.VALIDATE, "3", (Move(Role.APPROVED, "3"),), reason=p.reason)


def test_validate_without_candidate_is_refused():
    with pytest.raises(Refused, match="candidate"):
        plan("validate", Aliases(production="2"))


def test_release_without_approved_is_refused():
    with pytest.raises(Refused, match="approved"):
        plan("release", Aliases(candidate="3", production="2"))


def test_release_moves_previous_and_production_and_records_replaced():
    p = plan("release", Aliases(candidate="3", approved="3", production="2", previous="1"), live="2")
    assert p.version == "3"
    assert p.moves == (Move(Role.PREVIOUS, "2"), Move(Role.PRODUCTION, "3"))
    assert p.replaced == "2"


def test_first_release_only_sets_production():
    p = plan("release", Aliases(candidate="1", approved="1"))
    assert (p.version, p.moves, p.replaced) == ("1", (Move(Role.PRODUCTION, "1"),), None)


def test_release_of_live_production_serves_nothing():
    p = plan("release", Aliases(approved="2", production="2"), live="2")
    assert (p.version, p.moves, p.replaced) == (None, (), None)


@pytest.mark.parametrize("live", [None, "1"])
def test_release_of_production_not_live_restarts_it_without_moves(live):
    p = plan("release", Aliases(approved="2", production="2", previous="1"), live=live)
    assert (p.version, p.moves, p.replaced) == ("2", (), None)


def test_rollback_serves_previous_and_steps_previous_back():
    p = plan("rollback", Aliases(approved="3", production="3", previous="2", before_previous="1"))
    assert p.version == "2"
    assert p.moves == (Move(Role.PRODUCTION, "2"), Move(Role.PREVIOUS, "1"), Move(Role.APPROVED, None))


def test_rollback_with_nothing_before_removes_previous_and_keeps_other_approval():
    p = plan("rollback", Aliases(approved="4", production="3", previous="2"))
    assert p.moves == (Move(Role.PRODUCTION, "2"), Move(Role.PREVIOUS, None))  # approved 4 is not the rolled-back one


def test_rollback_without_previous_is_refused():
    with pytest.raises(Refused, match="previous"):
        plan("rollback", Aliases(approved="1", production="1"))


def test_stop_moves_nothing():
    p = plan("stop", Aliases(approved="2", production="2", previous="1"), live="2")
    assert (p.action, p.version, p.moves) == (Action.STOP, None, ())


def test_unknown_action_raises():
    with pytest.raises(ValueError):
        plan("promote", Aliases(approved="1"))


# -- a scenario, carried out the way the deploy flow does --------------------------------------


class Registry:
    """Aliases plus the `replaced` tag of each released version (what `read_aliases` reads)."""

    def __init__(self) -> None:
        self.aliases = Aliases()
        self.replaced: dict[str, str | None] = {}

    def current(self) -> Aliases:
        before = self.replaced.get(self.aliases.previous) if self.aliases.previous else None
        return replace(self.aliases, before_previous=before)

    def run(self, action: str, live: str | None = None) -> Plan:
        p = plan(action, self.current(), live)
        for move in p.moves:
            self.aliases = replace(self.aliases, **{move.role.value: move.version})
        if p.action is Action.RELEASE and p.moves:
            self.replaced[p.version] = p.replaced
        return p

    def build(self, version: str) -> None:
        self.aliases = replace(self.aliases, candidate=version)


def test_release_release_rollback_rollback_never_goes_forward_again():
    reg = Registry()
    for version in ("1", "2"):
        reg.build(version)
        reg.run("validate")
        reg.run("release", live=reg.aliases.production)
    assert (reg.aliases.production, reg.aliases.previous, reg.aliases.approved) == ("2", "1", "2")

    first = reg.run("rollback", live="2")
    assert first.version == "1"
    assert (reg.aliases.production, reg.aliases.previous, reg.aliases.approved) == ("1", None, None)

    with pytest.raises(Refused):  # nothing was before v1: v2 must not come back without approval
        reg.run("rollback", live="1")
    with pytest.raises(Refused):  # nor through a release: its approval is gone
        reg.run("release", live="1")
    assert reg.aliases.production == "1"


def released(*versions: str) -> Registry:
    """Each version built, validated and released in turn."""
    reg = Registry()
    for version in versions:
        reg.build(version)
        reg.run("validate")
        reg.run("release", live=reg.aliases.production)
    return reg


def test_three_releases_roll_back_two_steps():
    reg = released("1", "2", "3")
    assert reg.run("rollback").version == "2"
    assert (reg.aliases.production, reg.aliases.previous) == ("2", "1")
    assert reg.run("rollback").version == "1"
    assert (reg.aliases.production, reg.aliases.previous) == ("1", None)
    with pytest.raises(Refused):
        reg.run("rollback")


def test_rollback_never_returns_the_unapproved_version_it_left():
    # v1, v2, then v1 again (a build that reuses v1 points `candidate` back at it): v1 replaced v2
    reg = released("1", "2", "1")
    assert reg.run("rollback").version == "2"
    assert reg.aliases.approved is None  # v1 lost its approval: it must pass the test environment again
    try:
        second = reg.run("rollback")
    except Refused:
        return
    assert second.version != "1", f"rollback put unapproved v1 back live: {reg.aliases}"
