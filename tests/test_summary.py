"""The summary a flow prints at its end: everything a person needs, nothing secret."""

from __future__ import annotations

from mlops.checks import Check, Report, compare
from mlops.summary import build_summary


def summary(**changes) -> str:
    report = Report({"gate": [compare("accuracy", 0.91, ">=", 0.85), Check("accuracy_vs_production", None, None, ">=", None, "none")]},
                    title="Gate")
    values = dict(
        model="image-classifier", data_version="a" * 32, counts={"train": {"0": 28, "1": 28}, "test": {"0": 6, "1": 6}},
        quarantined=0, quarantine_dir="/ws/quarantine/digits", capped=0, max_per_class=None, production=None,
        metrics={"accuracy": 0.91, "macro_f1": 0.9, "p95_latency_ms": None}, report=report, version="3",
        alias="candidate", tracking_uri="sqlite:////ws/mlflow.db", run_id="r1",
    ) | changes
    return build_summary(**values)


def test_a_build_summary_has_the_data_the_version_the_metrics_each_check_and_where_to_look():
    text = summary()
    for part in ("registered image-classifier version 3", f"data version `{'a' * 32}`: train 56, test 12 images",
                 "accuracy 0.91, macro f1 0.9", "**Gate: PASSED**", "| gate | accuracy | 0.91 | >= 0.85 | pass |",
                 "| gate | accuracy_vs_production | - | none | skipped |", "alias `candidate` -> version 3",
                 "`mlflow ui --backend-store-uri sqlite:////ws/mlflow.db`, run `r1`"):
        assert part in text, (part, text)
    assert "quarantined" not in text and "left out" not in text and "p95" not in text  # nothing to say: said nothing


def test_what_was_left_out_is_said_with_the_override_that_changes_it():
    text = summary(quarantined=2, capped=158, max_per_class=40, version=None)
    assert "2 invalid images quarantined in /ws/quarantine/digits" in text
    assert "158 valid images left out by data.max_per_class=40 (data.max_per_class=null keeps them all)" in text
    assert "nothing registered" in text and "alias" not in text


def test_production_images_and_a_failed_gate_are_in_the_summary_and_no_password_is():
    failing = Report({"gate": [compare("accuracy", 0.41, ">=", 0.85)]}, title="Gate")
    production = {"counts": {"train": {"0": 5}, "holdout": {"0": 2}}, "window": "24h", "base_version": "b" * 32}
    text = summary(report=failing, production=production, tracking_uri="https://bob:s3cret@mlflow.example.com")
    assert "**Gate: FAILED**" in text and "| gate | accuracy | 0.41 | >= 0.85 | FAIL |" in text
    assert f"7 labelled production images added (window 24h) on base data version `{'b' * 32}`" in text
    assert "s3cret" not in text and "https://***@mlflow.example.com" in text


def test_a_deploy_summary_says_what_is_live_where_and_the_application_figures():
    from mlops.summary import deploy_summary

    text = deploy_summary("test", "validate", "3", "http://127.0.0.1:8100", figures={"accuracy": 0.93, "latency_p95_ms": 12.5})
    assert "## Deploy test: validate version 3" in text and "live on http://127.0.0.1:8100" in text
    assert "application tests: accuracy 0.93, latency p95 ms 12.5" in text
    released = deploy_summary("production", "release", "4", "http://127.0.0.1:8000", previous="3")
    assert "replaced version 3 (action=rollback puts it back)" in released and "application tests" not in released
    assert "no server kept" in deploy_summary("test", "validate", "3", None)
    assert "kubectl apply -f /m/model-server.yaml" in deploy_summary("test", "render", "3", None, manifests="/m/model-server.yaml")
    assert "nothing was recorded as live" in deploy_summary("production", "stop", "", None)


def test_a_monitor_summary_has_each_sections_verdict_the_actions_and_the_report():
    from mlops.summary import monitor_summary

    text = monitor_summary("production", "2", "breach", 340, {"drift": "FAIL: drifted_share", "integrity": "pass"},
                           "file:///r/monitor.html", ["drift.drifted_share@v2"], "in_process, started in-process")
    for part in ("version 2, breach (340 requests)", "| drift | FAIL: drifted_share |", "| integrity | pass |",
                 "alerts sent: drift.drifted_share@v2", "retraining: in_process, started in-process", "report: file:///r/monitor.html"):
        assert part in text, (part, text)
