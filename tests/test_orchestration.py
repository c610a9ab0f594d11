"""The stack for real on loopback: a Prefect server with its own database, the deployments of
prefect.yaml, a process worker; a deployment run through the client, and the monitor's retraining
trigger starting the build deployment. Everything is stopped afterwards, also on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mlops import traffic
from mlops.data.layout import dataset_dir
from mlops.deploy import processes as deployment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prefect server + deployments + worker, with the flows' workspace in a temporary folder."""
    home = tmp_path_factory.mktemp("stack")
    port = deployment.free_port("127.0.0.1")
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
        "MLOPS_WORKSPACE": str(home / "workspace"),
    }
    processes = []
    try:
        with (home / "server.log").open("w") as log:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=home)
        processes.append(server)
        wait_for(api + "/health", server, home / "server.log")
        for command in (
            ["work-pool", "create", "mlops-process", "--type", "process"],
            ["work-pool", "create", "mlops-k8s", "--type", "kubernetes",
             "--base-job-template", str(ROOT / "deployments" / "kubernetes" / "work-pool-template.json")],
            ["--no-prompt", "deploy", "--all"],
        ):
            done = subprocess.run([PREFECT, *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with (home / "worker.log").open("w") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "mlops-process"],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        processes.append(worker)
        saved = dict(os.environ)
        os.environ.update(env)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):  # also over a test harness of the session
            yield home, api
    finally:
        if "saved" in locals():
            os.environ.clear()
            os.environ.update(saved)
        for process in reversed(processes):
            stop(process)
        for live in home.glob("workspace/deploy/*/live.json"):
            deployment.stop_server(deployment.read_live(live.parent).pid)


def flow_runs_of(api: str, deployment_name: str) -> list[dict]:
    flow, name = deployment_name.split("/")
    found = httpx.get(f"{api}/deployments/name/{flow}/{name}").json()
    runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [found["id"]]}}}).json()
    return runs


def wait_for_runs(api: str, deployment_name: str, count: int, timeout_s: float = 400) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = flow_runs_of(api, deployment_name)
        if len(runs) >= count and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"runs of {deployment_name} did not finish: {[r['state_type'] for r in runs]}")


def test_every_deployment_of_prefect_yaml_is_registered(stack):
    _, api = stack
    names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
    assert {"build-test", "deploy-test", "monitor-test", "monitor-production", "build-production-k8s"} <= names
    monitor = httpx.get(f"{api}/deployments/name/monitor/monitor-production").json()
    assert monitor["schedules"][0]["schedule"]["cron"] == "0 6 * * *"
    assert monitor["enforce_parameter_schema"] is True


def test_a_deployment_run_completes_on_the_worker(stack):
    from prefect.deployments import run_deployment

    home, api = stack
    run = run_deployment("build/build-test", parameters={"overrides": ["train.progress_bar=false"]}, timeout=400)
    assert run.state.is_completed(), run.state.message
    assert (home / "workspace" / "mlflow.db").exists()


def test_the_monitors_retraining_trigger_starts_the_build_deployment(stack):
    from flows.deploy import deploy
    from flows.monitor import monitor

    home, api = stack
    before = len(flow_runs_of(api, "build/build-test"))
    port = deployment.free_port("127.0.0.1")
    state = deploy(env="test", overrides=[f"serve.port={port}", "deploy.keep_test_server=true"], return_state=True)
    assert state.is_completed(), state.message
    images = traffic.load_images(dataset_dir(home / "workspace" / "dvc", "digits") / "test")
    replayed = traffic.replay(f"http://127.0.0.1:{port}", images, requests=120, drift="brightness", feedback_share=0.5)
    assert replayed.ok == 120 and replayed.feedback_sent == 60  # labels: the build adds what production saw
    time.sleep(1.5)
    state = monitor(env="test", overrides=["monitor.retrain.mode=deployment"], return_state=True)
    assert state.is_completed(), state.message
    retrain = state.result().retrain
    assert retrain.decision == "deployment" and retrain.started is not None
    runs = wait_for_runs(api, "build/build-test", before + 1)
    assert len(runs) == before + 1
    newest = max(runs, key=lambda r: r["created"])
    assert newest["state_type"] == "COMPLETED"
    assert any(o.startswith("trigger=monitor/") for o in newest["parameters"]["overrides"])
    assert "data.production=7d" in newest["parameters"]["overrides"] and retrain.labelled >= 20


def test_a_passing_build_starts_the_test_deployment_when_chained(stack):
    from prefect.deployments import run_deployment

    home, api = stack
    before = len(flow_runs_of(api, "deploy/deploy-test"))
    run = run_deployment(
        "build/build-test",
        parameters={"overrides": ["train.progress_bar=false", "chain.after_build=deploy/deploy-test"]},
        timeout=400,
    )
    assert run.state.is_completed(), run.state.message
    runs = wait_for_runs(api, "deploy/deploy-test", before + 1)
    assert max(runs, key=lambda r: r["created"])["state_type"] == "COMPLETED"
