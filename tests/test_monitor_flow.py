"""End-to-end monitor runs on loopback: a real build, real servers kept by the deploy flow,
replayed traffic, a real alert receiver, and retraining through the build flow."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import Receiver, copy_built
from mlflow import MlflowClient

from flows.deploy import deploy
from flows.monitor import monitor
from mlops import traffic
from mlops.data.layout import dataset_dir
from mlops.deploy import processes
from mlops.serve.records import hour_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

MODEL = "digits"  # the registered model is named after the dataset


@pytest.fixture(scope="module")
def workspace(built, tmp_path_factory):
    path = copy_built(built, tmp_path_factory.mktemp("monitor-ws") / "ws")
    yield path
    for live in path.glob("deploy/*/live.json"):
        processes.stop_server(json.loads(live.read_text())["pid"])


def scenario(workspace: Path, name: str) -> list[str]:
    """Overrides giving scenario `name` its own state and records (the monitor's and the deploy's)."""
    return [
        f"paths.workspace={workspace}", f"paths.deploy={workspace}/deploy/{name}",
        f"records.dir={workspace}/records/{name}", f"paths.monitor={workspace}/monitor/{name}",
    ]


def serve(workspace: Path, overrides: list[str]) -> str:
    port = processes.free_port("127.0.0.1")
    state = deploy(env="test", overrides=[*overrides, f"serve.port={port}", "deploy.keep_test_server=true"], return_state=True)
    assert state.is_completed(), state.message
    return state.result().url


def replay(workspace: Path, url: str, **options) -> traffic.ReplayResult:
    result = traffic.replay(url, traffic.load_images(dataset_dir(workspace / "dvc", "digits") / "test"), **options)
    assert result.ok == result.sent
    time.sleep(1.5)  # the server flushes its records every second
    return result


def run_monitor(overrides: list[str], receiver: Receiver | None = None):
    sinks = []
    if receiver is not None:
        import os

        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        os.environ["MLOPS_ALERT_WEBHOOK_URL"] = receiver.url + "/hook"
        os.environ["MLOPS_SLACK_WEBHOOK_URL"] = receiver.url + "/slack"
        # a notification block as an operator makes it in the Prefect UI (Blocks > Custom Webhook)
        CustomWebhookNotificationBlock(
            name="on-call", url=receiver.url + "/block", json_data={"subject": "{{subject}}", "text": "{{body}}"},
            allow_private_urls=True,
        ).save("mlops-alerts", overwrite=True)
        sinks = ["monitor.alerts.sinks=[log,webhook,slack,prefect]",
                 "monitor.alerts.prefect_blocks=[custom-webhook/mlops-alerts]"]
    window = [] if any(o.startswith("monitor.window=") for o in overrides) else ["monitor.window=30m"]
    state = monitor(env="test", overrides=[*overrides, *window, *sinks], return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def checks_json(result) -> dict:
    return json.loads(Path(result.report.removeprefix("file://")).with_name("checks.json").read_text())


def test_an_empty_window_is_no_traffic(workspace):
    result = run_monitor([*scenario(workspace, "empty"), "monitor.version=1"])
    assert (result.outcome, result.requests, result.retrain) == ("no traffic", 0, None)
    assert "no traffic to plot" in Path(result.report.removeprefix("file://")).read_text()


def test_replay_without_drift_is_healthy_and_silent(workspace):
    overrides = scenario(workspace, "clean")
    url = serve(workspace, overrides)
    replay(workspace, url)
    with Receiver() as receiver:
        result = run_monitor(overrides, receiver)
    assert result.outcome == "healthy", result.breaches
    assert result.requests == 120  # the application tests and the replay
    assert receiver.received == [] and result.alerts_sent == [] and result.retrain.decision == "none"
    sections = checks_json(result)["sections"]
    assert sections["drift"][0]["name"] == "drifted_share" and sections["drift"][0]["verdict"] == "pass"
    assert {c["note"] for c in sections["performance"] if c["name"] != "estimated_accuracy"} == {"not enough labels: 0 < 20"}
    estimated = next(c for c in sections["performance"] if c["name"] == "estimated_accuracy")
    assert estimated["verdict"] == "pass" and "CBPE, 95% interval" in estimated["note"]  # before any label
    assert {c["name"]: c["verdict"] for c in sections["drift"]} == {
        "drifted_share": "pass", "prediction_drift": "pass", "output_drift": "pass", "embedding_drift": "pass"}
    assert {c["name"] for c in sections["telemetry"]} == {"request_rate_per_min", "p95_latency_ms", "error_rate"}


def test_unreadable_record_files_are_reported_and_left_alone(workspace):
    overrides = scenario(workspace, "clean")
    garbage = hour_file(workspace / "records" / "clean", "requests", datetime.now(UTC) - timedelta(hours=1))
    before = garbage.read_bytes() if garbage.exists() else b""  # only if the tests crossed an hour
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(before + b"\x00\xffnot records")
    result = run_monitor([*overrides, "monitor.window=3h"])
    assert any(str(garbage) in line for line in checks_json(result)["unreadable"])
    assert garbage.read_bytes().endswith(b"\x00\xffnot records")  # left in place
    assert result.outcome != "no traffic"


def test_drift_alerts_once_and_retrains_once(workspace):
    overrides = scenario(workspace, "drift")
    url = serve(workspace, overrides)
    replay(workspace, url, requests=120, drift="brightness", feedback_share=0.5)
    with Receiver() as receiver:
        first = run_monitor(overrides, receiver)
        second = run_monitor(overrides, receiver)

    assert first.outcome == "breach" and "drift.drifted_share" in first.breaches
    drift = {d["feature"]: d["drifted"] for d in checks_json(first)["feature_drift"]}
    assert drift["brightness"] and not drift["width"]
    hooks = [body for path, body in receiver.received if path == "/hook"]
    assert len(hooks) == 1  # the second run is inside the quiet period
    alert = next(a for a in hooks[0]["alerts"] if a["check"] == "drifted_share")
    assert alert["version"] == "1" and alert["value"] > alert["bound"] and alert["report"] == first.report
    assert any("drifted_share" in body["text"] for path, body in receiver.received if path == "/slack")
    (block,) = [body for path, body in receiver.received if path == "/block"]  # through the Prefect block, once
    assert block["subject"].startswith("[mlops] ") and block["subject"].endswith("alert(s) on model version 1")
    assert "drifted_share" in block["text"] and first.report in block["text"]

    assert (first.retrain.started, first.retrain.state) == ("in-process", "COMPLETED")  # no deployment here
    assert first.retrain.decision == "in_process" and "drift.drifted_share" in first.retrain.reasons
    assert second.retrain.decision == "cooldown" and second.retrain.started is None  # one breach, one build
    assert second.outcome == "breach"
    uri = f"sqlite:///{workspace}/mlflow.db"
    client = MlflowClient(uri, uri)
    builds = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id], "tags.`mlops.trigger` LIKE 'monitor/%'")
    assert len(builds) == 1
    tags = builds[0].data.tags  # the build added what production saw, labelled
    assert first.retrain.labelled >= 20 and tags["mlops.data_production_window"].startswith("7d (")
    assert sum(json.loads(tags["mlops.data_production_counts"]).values()) >= 20
    gate = json.loads(Path(client.download_artifacts(builds[0].info.run_id, "gate/report.json")).read_text())
    assert [c["name"] for c in gate["sections"]["production holdout"]] == ["holdout_accuracy"]
    monitor_runs = client.search_runs([client.get_experiment_by_name(f"{MODEL}-monitor").experiment_id])
    assert sum(r.data.tags.get("mlops.retrain", "none") != "none" for r in monitor_runs) == 1
    assert {r.info.status for r in monitor_runs} == {"FINISHED"}, "a monitor run was left RUNNING"
    report = Path(first.report.removeprefix("file://")).read_text()
    assert "brightness (drifted)" in report or "brightness: reference vs current" in report


def test_with_too_few_labels_the_retrain_waits_and_says_why(workspace):
    overrides = [*scenario(workspace, "drift"), f"paths.monitor={workspace}/monitor/drift-waiting",
                 "monitor.retrain.min_labelled=100000", "monitor.labelling.export=5"]  # the drift scenario's traffic, a fresh memory
    with Receiver() as receiver:
        result = run_monitor(overrides, receiver)
    assert result.outcome == "breach" and result.retrain.decision == "waiting_for_labels"
    assert result.retrain.started is None and "fewer than monitor.retrain.min_labelled (100000)" in result.retrain.note
    assert "retrain.labelled_production_images@v1" in result.alerts_sent
    waiting = [a for _, body in receiver.received if "alerts" in body for a in body["alerts"] if a["section"] == "retrain"]
    assert len(waiting) == 1 and waiting[0]["bound"] == 100000 and waiting[0]["value"] == result.retrain.labelled
    assert not (workspace / "monitor" / "drift-waiting" / "retrain.json").exists()  # no cool-down started
    exported = Path(result.to_label)  # meanwhile a person gets the images the model was least sure of
    assert exported.parent == workspace / "monitor" / "drift-waiting" / "labelling"
    rows = (exported / "tasks.csv").read_text().splitlines()[1:]
    assert len(rows) == 5 and len(list((exported / "unlabelled").iterdir())) == 5


def test_a_retrain_started_through_a_deployment_lands_in_the_monitors_registry(workspace, tmp_path, monkeypatch):
    """The retrain trap: the worker that runs the build has another MLOPS_WORKSPACE; the new
    version must still land in the registry this monitor watches (its stores are passed along)."""
    import os
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.chain import deployment_exists

    monkeypatch.setenv("MLOPS_WORKSPACE", str(workspace))  # the monitor's stores come from its environment
    overrides = [f"paths.deploy={workspace}/deploy/elsewhere", f"records.dir={workspace}/records/elsewhere",
                 f"paths.monitor={workspace}/monitor/elsewhere"]
    url = serve(workspace, overrides)
    replay(workspace, url, requests=120, drift="brightness", feedback_share=0.5)

    elsewhere = tmp_path / "worker-workspace"
    worker_env = os.environ | {"MLOPS_WORKSPACE": str(elsewhere), "PREFECT_API_URL": PREFECT_API_URL.value()}
    runner = subprocess.Popen(  # a process that runs the build deployment's flow runs, as a worker does
        [sys.executable, "-c", "from flows.build import build; build.serve(name='retrain-elsewhere')"],
        cwd=Path(__file__).resolve().parents[1], env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    uri = f"sqlite:///{workspace}/mlflow.db"
    client = MlflowClient(uri, uri)
    try:
        deadline = time.monotonic() + 120
        while not deployment_exists("build/retrain-elsewhere"):
            assert runner.poll() is None and time.monotonic() < deadline, runner.stderr.read()[-3000:] if runner.poll() else "no deployment"
            time.sleep(1)
        before = len(client.search_model_versions(f"name = '{MODEL}'"))
        result = run_monitor([*overrides, "monitor.retrain.mode=deployment", "monitor.retrain.deployment=build/retrain-elsewhere"])
        assert result.retrain.decision == "deployment" and result.retrain.started, result.retrain
        deadline = time.monotonic() + 600
        with get_client(sync_client=True) as prefect:
            while not (state := prefect.read_flow_run(result.retrain.started).state).is_final():
                assert time.monotonic() < deadline, f"the retraining build is still {state.type}"
                time.sleep(2)
        assert state.is_completed(), state.message
    finally:
        runner.terminate()
        runner.wait(timeout=60)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == before + 1  # in the registry this monitor watches
    newest = max(versions, key=lambda v: int(v.version))
    assert client.get_run(newest.tags["build_run_id"]).data.tags["mlops.trigger"].startswith("monitor/")
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "dvc").exists()  # nothing in the worker's


def test_an_unseen_class_is_seen_by_the_embedding_test_while_pixel_statistics_stay_quiet(tmp_path):
    from flows.build import build

    workspace = tmp_path / "ws"
    state = build(env="test", overrides=[f"paths.workspace={workspace}", "data.classes=[0,1,2,3,4,5,6,7,8]",
                                         "train.progress_bar=false"], return_state=True)
    assert state.is_completed(), state.message
    overrides = scenario(workspace, "unseen")
    url = serve(workspace, overrides)
    try:
        seen = traffic.load_images(dataset_dir(workspace / "dvc", "digits") / "test")  # digits 0-8
        unseen = [(path, "9") for path in sorted((workspace / "sources" / "digits" / "9").glob("*.png"))[: len(seen)]]
        result = traffic.replay(url, seen + unseen, requests=2 * len(seen), seed=3)
        assert result.ok == result.sent
        time.sleep(1.5)
        monitored = run_monitor(overrides)
    finally:
        for live in workspace.glob("deploy/*/live.json"):
            processes.stop_server(json.loads(live.read_text())["pid"])
    drift = {c["name"]: c for c in checks_json(monitored)["sections"]["drift"]}
    assert drift["embedding_drift"]["verdict"] == "FAIL", drift["embedding_drift"]
    assert drift["embedding_drift"]["value"] < 0.01 and "mmd p-value" in drift["embedding_drift"]["note"]
    assert drift["drifted_share"]["verdict"] == "pass", drift["drifted_share"]  # the pixels look like digits
    assert "drift.embedding_drift" in monitored.breaches
    page = Path(monitored.report.removeprefix("file://")).read_text()
    assert "embeddings: reference vs window" in page and "estimated vs realised accuracy" in page
