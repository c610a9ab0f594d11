"""The production stack for real: `deployments/stack.sh start --production` (PostgreSQL, an S3
server, MLflow on both, Prefect on PostgreSQL, the deployments and a worker), then the whole loop
on it with no sqlite file and no local artifact folder: build -> test -> approval -> release ->
drifted traffic -> monitor -> retraining through the build deployment (the worker runs it) ->
the new version through test and release. Then the MLflow server dies in the middle of a monitor
run, and a second machine (a fresh workspace and the clients' variables only) serves the
production version and rolls it back.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from mlops.deploy.processes import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "deployments" / "stack.sh"
MODEL = "digits"
LOOPBACK = "127.0.0.1"
# the clients' variables come from the stack alone, never from the shell running the tests
FOREIGN = ("MLFLOW_", "DVC_", "MLOPS_", "AWS_", "PREFECT_API", "PG")


def read_env_file(path: Path) -> dict[str, str]:
    """`export NAME=value` lines (bash %q quoting) as a dict."""
    variables = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        variables[name] = shlex.split(value)[0] if value else ""
    return variables


@pytest.fixture(scope="module")
def stack():
    """The production stack on free ports, in a workspace PostgreSQL's user can reach when root."""
    base = Path(tempfile.mkdtemp(prefix="mlops-stack-", dir="/tmp"))
    base.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | {
        "MLOPS_WORKSPACE": str(base / "stack-ws"),
        "PREFECT_PORT": str(free_port(LOOPBACK)), "MLFLOW_PORT": str(free_port(LOOPBACK)),
        "PG_PORT": str(free_port(LOOPBACK)), "S3_PORT": str(free_port(LOOPBACK)),
    }
    started = subprocess.run(["bash", str(STACK), "start", "--production"], env=env, capture_output=True,
                             text=True, timeout=600)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        clients = read_env_file(base / "stack-ws" / "stack" / "production.env")
        yield {"base": base, "env": env, "clients": clients, "stack": base / "stack-ws" / "stack"}
    finally:
        stopped = subprocess.run(["bash", str(STACK), "stop"], env=env, capture_output=True, text=True, timeout=180)
        print(stopped.stdout)
        shutil.rmtree(base, ignore_errors=True)


def client_env(stack, **extra) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    return base | stack["clients"] | extra


def run_flow(stack, args: list[str], timeout: float, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=client_env(stack, **extra),
                            capture_output=True, text=True, timeout=timeout)
    return result


def database(stack, name: str):
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=int(stack["env"]["PG_PORT"]), dbname=name, user="mlops",
                           password=(stack["stack"] / "pg-password").read_text().strip())


def bucket_keys(stack) -> list[str]:
    import boto3

    clients = stack["clients"]
    s3 = boto3.client("s3", endpoint_url=clients["AWS_ENDPOINT_URL"], region_name=clients["AWS_DEFAULT_REGION"],
                      aws_access_key_id=clients["AWS_ACCESS_KEY_ID"], aws_secret_access_key=clients["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mlops")
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def registry(stack):
    from mlflow import MlflowClient

    uri = stack["clients"]["MLFLOW_TRACKING_URI"]
    return MlflowClient(uri, uri)


def local_stores(*folders: Path) -> list[Path]:
    """Any sqlite file or local MLflow artifact folder under `folders`."""
    found = []
    for folder in folders:
        found += [p for pattern in ("**/*.db", "**/mlartifacts", "**/mlruns", "**/dvc-remote") for p in folder.glob(pattern)]
    return found


def kill_mlflow(stack) -> None:
    pid = int((stack["stack"] / "mlflow.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # its own session: the server and its workers
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.mark.timeout(2400)
def test_the_loop_on_the_production_stack(stack):
    workspace = stack["base"] / "client"
    stray = {p for p in ROOT.glob("*") if p.name in ("mlruns", "mlartifacts", "mlflow.db")}
    status = subprocess.run(["bash", str(STACK), "status"], env=stack["env"], capture_output=True, text=True)
    for part in ("postgres", "s3", "prefect-server", "mlflow", "worker"):
        assert f"{part}: running" in status.stdout, status.stdout

    # the loop, the demo's: a worker runs the retraining build (monitor.retrain.mode auto finds build/build-production)
    started = time.monotonic()
    demo = run_flow(stack, [
        "flows.demo", f"workspace={workspace}", f"port={free_port(LOOPBACK)}", f"test_port={free_port(LOOPBACK)}",
        "keep=false",
        "records.upload_s=2",
        'monitor.retrain.overrides=["train.max_epochs=5","gate.max_recall_gap=0.9","gate.min_class_recall=0.1"]',
    ], timeout=1800)
    took = time.monotonic() - started
    print(f"the loop on the production stack: {took:.0f} s")
    log = demo.stdout + demo.stderr
    assert demo.returncode == 0, log[-5000:]
    assert "retrained release" in log and "waiting for the retraining build" in log, log[-5000:]

    mlflow = registry(stack)
    versions = sorted(mlflow.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.version for v in versions] == ["1", "2"]
    aliases = mlflow.get_registered_model(MODEL).aliases
    assert aliases["production"] == "2" and aliases["previous"] == "1"

    # every run and version in PostgreSQL; the retraining build a deployment run the worker completed
    with database(stack, "mlflow") as db:
        assert db.execute("SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,)).fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] >= 3  # two builds and a monitor run at least
    with database(stack, "prefect") as db:
        states = db.execute("SELECT fr.state_type FROM flow_run fr JOIN deployment d ON fr.deployment_id = d.id"
                            " WHERE d.name = 'build-production'").fetchall()
        assert [s[0] for s in states] == ["COMPLETED"]
        assert db.execute("SELECT count(*) FROM flow_run WHERE name IS NOT NULL").fetchone()[0] >= 8

    # every artifact in the bucket: both models, the monitor's report, DVC's data, records, captures
    keys = bucket_keys(stack)
    for version in versions:
        assert any(k.endswith(f"/{version.run_id}/artifacts/model/model.onnx") for k in keys), version.run_id
    assert any(k.endswith("/artifacts/report/monitor.html") for k in keys)
    for prefix in ("dvc/", "captures/", "records/"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith("records/") and "/feedback/" in k for k in keys)
    assert not local_stores(workspace, stack["base"] / "stack-ws"), "a local store was used"
    assert {p for p in ROOT.glob("*") if p.name in ("mlruns", "mlartifacts", "mlflow.db")} == stray

    # the MLflow server dies in the middle of a monitor run: a clear failure, nothing half done, then a good run
    monitor_args = ["flows.monitor", "env=production", f"paths.workspace={workspace}", "monitor.window=2h"]
    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    runs_before = {r.info.run_id for r in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])}
    running = subprocess.Popen([sys.executable, "-m", *monitor_args], cwd=ROOT, env=client_env(stack, **bounded),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in running.stdout:  # kill it once the model is fetched: the analysis runs, the publishing is next
        lines.append(line)
        if "fetch_model" in line and "Finished" in line:
            kill_mlflow(stack)
            break
    lines += running.stdout.readlines()
    assert running.wait(timeout=600) != 0, "".join(lines)[-3000:]
    failed = "".join(lines)
    assert f"{stack['clients']['MLFLOW_TRACKING_URI']}" in failed and "error:" in failed, failed[-3000:]
    print("the monitor without MLflow:", [line for line in failed.splitlines() if line.startswith("error:")])
    restarted = subprocess.run(["bash", str(STACK), "start", "--production"], env=stack["env"], capture_output=True,
                               text=True, timeout=300)
    assert restarted.returncode == 0 and "mlflow: started" in restarted.stdout, restarted.stdout + restarted.stderr
    mlflow = registry(stack)
    assert len(mlflow.search_model_versions(f"name = '{MODEL}'")) == 2  # nothing registered by the failed run
    assert mlflow.get_registered_model(MODEL).aliases == aliases
    left = [r for r in mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
            if r.info.run_id not in runs_before]
    assert all(r.info.status != "RUNNING" for r in left), [(r.info.run_id, r.info.status) for r in left]
    again = run_flow(stack, monitor_args, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]

    # a second machine: a fresh workspace and the clients' variables only load, serve and roll back production
    second = stack["base"] / "second-machine"
    second.mkdir()
    port = free_port(LOOPBACK)
    common = ["env=production", f"paths.workspace={second}", f"serve.port={port}"]
    served = run_flow(stack, ["flows.deploy", *common], timeout=600)
    assert served.returncode == 0, (served.stdout + served.stderr)[-3000:]
    headers = {"Authorization": f"Bearer {stack['clients']['MLOPS_API_TOKEN']}"}
    assert httpx.get(f"http://127.0.0.1:{port}/ready", headers=headers).json()["version"] == "2"
    rolled = run_flow(stack, ["flows.deploy", *common, "action=rollback"], timeout=600)
    assert rolled.returncode == 0, (rolled.stdout + rolled.stderr)[-3000:]
    assert httpx.get(f"http://127.0.0.1:{port}/ready", headers=headers).json()["version"] == "1"
    assert registry(stack).get_registered_model(MODEL).aliases["production"] == "1"
    stopped = run_flow(stack, ["flows.deploy", *common, "action=stop"], timeout=300)
    assert stopped.returncode == 0, (stopped.stdout + stopped.stderr)[-3000:]
    assert not local_stores(second)
