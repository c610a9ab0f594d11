"""End-to-end on loopback: build, deploy to test, release to production, predict, roll back,
and a release whose server cannot start leaving production as it was."""

from __future__ import annotations

import os
import threading
import time

import httpx
import psutil
import pytest
from conftest import copy_built
from mlflow import MlflowClient

from flows.build import build
from flows.deploy import deploy
from mlops.data.layout import dataset_dir
from mlops.deploy import processes as deployment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

MODEL = "digits"  # the registered model is named after the dataset
TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def stack(built, tmp_path_factory):
    """A copy of the shared build's workspace, production settings in the environment, free ports;
    every server started under it is stopped afterwards, also when a test fails."""
    workspace = copy_built(built, tmp_path_factory.mktemp("deploy-ws") / "ws")
    saved = dict(os.environ)
    os.environ |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db",
        "DVC_REMOTE_URL": str(workspace / "dvc-remote"),
        "MLOPS_WORKSPACE": str(workspace),
        "MLOPS_API_TOKEN": TOKEN,
    }
    ports = {"test": deployment.free_port("127.0.0.1"), "production": deployment.free_port("127.0.0.1")}
    try:
        yield workspace, ports
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for process in psutil.process_iter(["pid", "cmdline"]):
            if "mlops.serve" in " ".join(process.info["cmdline"] or []) and str(workspace) in " ".join(process.info["cmdline"]):
                deployment.stop_server(process.info["pid"])


def run_build(stack, *overrides: str):
    return build(env="test", overrides=[f"paths.workspace={stack[0]}", "train.progress_bar=false", *overrides],
                 return_state=True)


def run_deploy(stack, env: str, *overrides: str):
    """The deploy flow; production releases without a person unless the test sets deploy.approval."""
    workspace, ports = stack
    if env == "production" and not any(o.startswith("deploy.approval=") for o in overrides):
        overrides = ("deploy.approval=auto", *overrides)
    return deploy(env=env, overrides=[f"paths.workspace={workspace}", f"serve.port={ports[env]}", *overrides],
                  return_state=True)


def client(stack) -> MlflowClient:
    uri = f"sqlite:///{stack[0]}/mlflow.db"
    return MlflowClient(uri, uri)


def alias(stack, name: str) -> str | None:
    aliases = client(stack).get_registered_model(MODEL).aliases
    return str(aliases[name]) if name in aliases else None


def production_url(stack) -> str:
    return f"http://127.0.0.1:{stack[1]['production']}"


def predict(stack, token: str | None = TOKEN) -> httpx.Response:
    image = next((dataset_dir(stack[0] / "dvc", "digits") / "test" / "7").iterdir())
    headers = {"content-type": "image/png"} | ({"authorization": f"Bearer {token}"} if token else {})
    return httpx.post(production_url(stack) + "/predict", content=image.read_bytes(), headers=headers, timeout=10)


def test_validate_in_test_approves_the_candidate(stack):
    state = run_deploy(stack, "test")
    assert state.is_completed(), state.message
    assert alias(stack, "approved") == "1"
    tags = client(stack).get_model_version(MODEL, "1").tags
    assert tags["deploy.test.status"] == "passed" and float(tags["deploy.test.app_accuracy"]) >= 0.5
    assert float(tags["deploy.test.app_error_rate"]) == 0.0
    assert deployment.read_live(stack[0] / "deploy" / "test") is None  # the test server was stopped
    assert list((stack[0] / "records" / "test" / "requests").rglob("*.jsonl"))  # it recorded the traffic


def test_failing_application_tests_do_not_approve(stack):
    state = run_deploy(stack, "test", "slo.max_p95_latency_ms=0.001")
    assert state.is_failed() and "app_p95_latency_ms" in state.message
    assert alias(stack, "approved") == "1"  # unchanged


def test_release_to_production_serves_with_a_token(stack):
    assert alias(stack, "production") is None
    state = run_deploy(stack, "production")
    assert state.is_completed(), state.message
    assert alias(stack, "production") == "1"
    answer = predict(stack)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert predict(stack, token=None).status_code == 401
    assert client(stack).get_model_version(MODEL, "1").tags["deploy.production.status"] == "live"


def test_blue_green_release_keeps_serving_then_rollback(stack):
    state = run_build(stack, "train.learning_rate=0.002", "gate.max_accuracy_drop=1.0", "gate.max_macro_f1_drop=1.0")
    assert state.is_completed(), state.message
    assert run_deploy(stack, "test").is_completed()
    assert alias(stack, "approved") == "2"

    statuses: list[int] = []
    retried: list[int] = []
    done = threading.Event()

    def traffic():  # a client that retries a refused or reset connection once, as clients should
        while not done.is_set():
            for attempt in (1, 2):
                try:
                    statuses.append(predict(stack).status_code)
                    break
                except httpx.TransportError:
                    if attempt == 2:
                        statuses.append(0)
                    retried.append(1)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        state = run_deploy(stack, "production")
    finally:
        done.set()
        sender.join()
    assert state.is_completed(), state.message
    # no request lost while traffic moved; a connection still queued on the old server's socket
    # when it closes may be reset (unless net.ipv4.tcp_migrate_req=1) and succeeds when retried
    assert len(statuses) > 10 and set(statuses) == {200}
    assert len(retried) <= 3
    assert predict(stack).json()["model"]["version"] == "2"
    assert (alias(stack, "production"), alias(stack, "previous")) == ("2", "1")

    state = run_deploy(stack, "production", "action=rollback")
    assert state.is_completed(), state.message
    assert predict(stack).json()["model"]["version"] == "1"
    # nothing was released before v1: no previous, and v2 must pass the test environment again
    assert (alias(stack, "production"), alias(stack, "previous"), alias(stack, "approved")) == ("1", None, None)
    again = run_deploy(stack, "production", "action=rollback")  # never forward to the unapproved v2
    assert again.is_failed() and "no 'previous' version" in again.message
    assert predict(stack).json()["model"]["version"] == "1"
    servers = [p for p in psutil.process_iter(["cmdline"]) if "mlops.serve" in " ".join(p.info["cmdline"] or [])
               and f'"port":{stack[1]["production"]}' in " ".join(p.info["cmdline"])]
    assert len(servers) == 1  # the replaced server is gone


def test_a_server_that_cannot_start_leaves_production_alone(stack):
    mlflow = client(stack)
    experiment = mlflow.get_experiment_by_name(MODEL).experiment_id
    run_id = mlflow.create_run(experiment).info.run_id
    source = mlflow.get_model_version(MODEL, "1")
    corrupt = stack[0] / "corrupt" / "model.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"this is not an onnx model")
    mlflow.log_artifact(run_id, str(corrupt), "model")
    version = mlflow.create_model_version(MODEL, f"{mlflow.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    for key in ("data_name", "data_version"):
        mlflow.set_model_version_tag(MODEL, version.version, key, source.tags[key])
    mlflow.set_registered_model_alias(MODEL, "approved", version.version)

    state = run_deploy(stack, "production")
    assert state.is_failed()
    assert "exited before it was ready" in state.message and "cannot load" in state.message
    assert alias(stack, "production") == "1"
    assert predict(stack).json()["model"]["version"] == "1"  # the old server kept serving
    live = deployment.read_live(stack[0] / "deploy" / "production")
    assert live.version == "1" and deployment.is_running(live.pid)


def test_the_traffic_flow_replays_against_the_live_server(stack):
    from flows.traffic import traffic

    records = stack[0] / "records" / "production"

    def recorded(kind: str) -> int:
        return sum(len(path.read_text().splitlines()) for path in (records / kind).rglob("*.jsonl"))

    time.sleep(1.5)  # what earlier tests sent is flushed first
    before = recorded("requests"), recorded("feedback")
    state = traffic(env="production", overrides=[f"paths.workspace={stack[0]}", "traffic.requests=30",
                                                 "traffic.feedback=0.5", "traffic.drift=brightness"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    live = deployment.read_live(stack[0] / "deploy" / "production")
    assert (result.url, result.version) == (live.url, live.version)
    assert (result.sent, result.ok, result.errors, result.feedback_sent) == (30, 30, 0, 15)
    time.sleep(1.5)  # the server flushes its records every second
    assert (recorded("requests") - before[0], recorded("feedback") - before[1]) == (30, 15)


def test_stop_action_stops_the_production_server(stack):
    live = deployment.read_live(stack[0] / "deploy" / "production")
    assert deployment.is_running(live.pid)
    state = run_deploy(stack, "production", "action=stop")
    assert state.is_completed(), state.message
    assert not deployment.is_running(live.pid)
    assert deployment.read_live(stack[0] / "deploy" / "production") is None
    assert alias(stack, "production") == "1"
