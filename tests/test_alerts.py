"""Alert rules (`mlops.monitor.alerts`): which breaches alert, where, and the quiet period."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mlops.checks import compare
from mlops.config.monitor import AlertPolicy
from mlops.monitor.alerts import Alert, alerts_for, due_alerts, message, resolve_sinks

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
QUIET = timedelta(hours=6)


def policy(sinks=("log", "webhook", "slack"), blocks=()) -> AlertPolicy:
    return AlertPolicy(
        sections=["drift", "performance"],
        sinks=list(sinks),
        webhook_url_env="HOOK_URL",
        slack_url_env="SLACK_URL",
        prefect_blocks=list(blocks),
        quiet_period="6h",
        report_base_url=None,
    )


def breach(section="drift", name="drift_share", value=0.5, bound=0.3, op="<="):
    check = compare(name, value, op, bound)
    assert check.passed is False
    return section, check


def test_alerts_only_for_alerting_sections():
    breaches = [breach(), breach("telemetry", "error_rate", 0.2, 0.05), breach("performance", "accuracy", 0.9, 0.95, ">=")]
    alerts = alerts_for(breaches, ["drift", "performance"], "3", "r.html")
    assert [(a.section, a.check) for a in alerts] == [("drift", "drift_share"), ("performance", "accuracy")]
    assert alerts[0] == Alert("drift", "drift_share", 0.5, 0.3, "<=", "3", "r.html")
    assert alerts[1].op == ">=" and alerts[1].bound == 0.95


def test_key_names_section_check_and_version():
    (alert,) = alerts_for([breach()], ["drift"], "3", "r")
    assert alert.key == "drift.drift_share@v3"


@pytest.mark.parametrize(
    ("sent", "due"),
    [
        ({}, True),
        ({"drift.drift_share@v3": (NOW - timedelta(hours=1)).isoformat()}, False),
        ({"drift.drift_share@v3": (NOW - timedelta(hours=7)).isoformat()}, True),
        ({"drift.drift_share@v3": (NOW - QUIET).isoformat()}, True),
        ({"drift.drift_share@v2": (NOW - timedelta(hours=1)).isoformat()}, True),  # another version
    ],
)
def test_quiet_period(sent, due):
    alerts = alerts_for([breach()], ["drift"], "3", "r")
    assert due_alerts(alerts, sent, QUIET, NOW) == (alerts if due else [])


def test_sinks_with_variables_set():
    sinks, problems = resolve_sinks(policy(), {"HOOK_URL": "http://hook", "SLACK_URL": "http://slack"})
    assert sinks == {"log": None, "webhook": "http://hook", "slack": "http://slack"}
    assert problems == []


@pytest.mark.parametrize("environ", [{}, {"HOOK_URL": ""}])
def test_sink_with_unset_or_empty_variable_is_left_out(environ):
    sinks, problems = resolve_sinks(policy(("log", "webhook")), environ)
    assert sinks == {"log": None}
    assert len(problems) == 1 and "webhook" in problems[0] and "HOOK_URL" in problems[0]


def test_log_sink_needs_no_variable():
    assert resolve_sinks(policy(("log",)), {}) == ({"log": None}, [])


def test_text_names_check_value_bound_and_version():
    (alert,) = alerts_for([breach(value=0.4567, bound=0.3)], ["drift"], "12", "http://r/1")
    text = alert.text()
    for part in ("drift/drift_share", "0.4567", "<= 0.3", "version 12", "http://r/1"):
        assert part in text, (part, text)


def test_a_retrain_waiting_for_labels_alerts_with_the_count_and_the_minimum():
    from mlops.monitor.alerts import waiting_for_labels

    alert = waiting_for_labels(7, 20, "3", "http://r/2")
    assert alert.key == "retrain.labelled_production_images@v3"
    for part in ("retrain/labelled_production_images", "= 7", ">= 20", "version 3", "http://r/2"):
        assert part in alert.text(), (part, alert.text())


def test_the_prefect_sink_is_one_sink_per_notification_block():
    blocks = policy(("log", "prefect"), ["slack-webhook/ops", "custom-webhook/pager"])
    assert resolve_sinks(blocks, {}) == (
        {"log": None, "prefect:slack-webhook/ops": "slack-webhook/ops", "prefect:custom-webhook/pager": "custom-webhook/pager"},
        [])


@pytest.mark.parametrize(("blocks", "problem"), [
    ([], "needs prefect_blocks"),
    (["ops-alerts"], "<block type slug>/<block name>"),
    (["Slack/Ops"], "<block type slug>/<block name>"),
])
def test_the_prefect_sink_needs_well_named_blocks(blocks, problem):
    fields = policy(("log",)).model_dump() | {"sinks": ["prefect"], "prefect_blocks": blocks}
    with pytest.raises(ValueError, match=problem):
        AlertPolicy.model_validate(fields)


def test_one_message_carries_every_alert():
    alerts = alerts_for([breach(), breach("performance", "accuracy", 0.9, 0.95, ">=")], ["drift", "performance"], "3", "r")
    subject, body = message(alerts)
    assert subject == "[mlops] 2 alert(s) on model version 3"
    assert body.splitlines() == [a.text() for a in alerts]
