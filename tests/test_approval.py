"""The approval rule (`mlops.deploy.approval`): pure, no registry, no Prefect."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mlops.deploy.approval import (
    DECISION_TAG, TESTED_AT_TAG, BadDecision, Decision, awaiting, card_section, decide, decision_tags, releasable,
    summary_for_reviewer,
)

AT = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)
TESTED = {"deploy.test.status": "passed", "deploy.test.at": "2026-12-07T09:00:00+00:00", "deploy.test.app_accuracy": "0.97"}


def approved(**changes) -> dict[str, str]:
    return TESTED | decision_tags(decide("approved", "ana", "looks good", AT, "cli"), TESTED["deploy.test.at"]) | changes


def test_a_form_boolean_and_a_word_give_the_same_decision():
    assert decide(True, "ana", "", AT, "prefect-ui").decision is Decision.APPROVED
    assert decide(" Rejected ", "ana", "worse on 7s", AT, "cli").decision is Decision.REJECTED


@pytest.mark.parametrize(("decision", "reviewer", "comment", "field"), [
    ("maybe", "ana", "", "decision"),
    ("approved", "  ", "", "reviewer"),
    ("approved", None, "", "reviewer"),
    ("rejected", "ana", " ", "comment"),  # a rejection says why
    ("approved", "ana", "x" * 501, "comment"),
])
def test_a_bad_decision_names_its_field(decision, reviewer, comment, field):
    with pytest.raises(BadDecision, match=f"^{field}"):
        decide(decision, reviewer, comment, AT, "cli")


def test_tags_record_who_what_why_when_and_for_which_test_run():
    tags = decision_tags(decide("rejected", "ana  maria", "worse on 7s", AT, "prefect-ui"), "T1")
    assert tags == {DECISION_TAG: "rejected", "approval.reviewer": "ana maria", "approval.comment": "worse on 7s",
                    "approval.at": AT.isoformat(), "approval.via": "prefect-ui", TESTED_AT_TAG: "T1"}


def test_auto_releases_anything():
    assert releasable({}, "auto")[0]


def test_manual_releases_only_an_approved_version_of_the_current_test_run():
    assert releasable(approved(), "manual") == (True, f"approved by ana ({AT.isoformat()})")
    assert not releasable(TESTED, "manual")[0]  # no decision
    ok, why = releasable(approved(**{DECISION_TAG: "rejected"}), "manual")
    assert not ok and why.startswith("rejected by ana")
    ok, why = releasable(approved(**{"deploy.test.at": "2026-12-08T00:00:00+00:00"}), "manual")
    assert not ok and "earlier test run" in why  # tested again since: the decision is stale
    ok, why = releasable(approved(**{"deploy.test.status": "failed"}), "manual")
    assert not ok and "test environment" in why


def test_the_card_and_the_form_show_the_facts():
    section = card_section("3", decide("approved", "ana", "", AT, "cli"))
    assert "Version 3 **approved** by ana (cli)" in section and "2026-12-07 09:30" in section
    text = summary_for_reviewer("3", TESTED | {"other": "x", "deploy.test.app_latency_p95_ms": "32.626972299942715"})
    assert "| app_accuracy | 0.97 |" in text and "| app_latency_p95_ms | 32.63 |" in text and "other" not in text


def test_a_person_is_asked_only_about_a_tested_version_without_a_current_decision():
    assert awaiting(TESTED)
    assert not awaiting(approved()) and not awaiting(approved(**{DECISION_TAG: "rejected"}))
    assert awaiting(approved(**{"deploy.test.at": "2026-12-08T00:00:00+00:00"}))  # tested again: ask again
    assert not awaiting(TESTED | {"deploy.test.status": "failed"}) and not awaiting({})
