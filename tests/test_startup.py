"""`python -m flows.<name>`: information flags answered by Hydra alone, and runs reported to the
project's Prefect server when the stack runs one (flows.startup)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.startup import command_line_flow, stack_api_url, use_stack_server, workspace_of

ROOT = Path(__file__).resolve().parents[1]


def stack(workspace: Path, pid: int, url: str = "http://127.0.0.1:4200/api") -> Path:
    (workspace / "stack").mkdir(parents=True)
    (workspace / "stack" / "prefect-server.pid").write_text(f"{pid}\n")
    (workspace / "stack" / "prefect-api-url").write_text(url + "\n")
    return workspace


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_command_line_flow_is_the_module_run_with_dash_m():
    assert command_line_flow(["/venv/bin/python", "-X", "importtime", "-m", "flows.build", "env=test"]) == "build"
    assert command_line_flow(["python", "-m", "pytest", "tests"]) is None
    assert command_line_flow(["python", "script.py"]) is None


def test_the_stack_server_is_used_only_while_it_runs(tmp_path):
    assert stack_api_url(tmp_path) is None  # no stack started here
    assert stack_api_url(stack(tmp_path / "up", os.getpid())) == "http://127.0.0.1:4200/api"
    assert stack_api_url(stack(tmp_path / "down", dead_pid())) is None  # stopped or crashed: a stale pid file


def test_a_chosen_api_wins_over_the_stack(tmp_path):
    workspace = stack(tmp_path / "ws", os.getpid())
    environ = {"MLOPS_WORKSPACE": str(workspace)}
    assert use_stack_server([], environ) == "http://127.0.0.1:4200/api"
    assert environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    chosen = {"MLOPS_WORKSPACE": str(workspace), "PREFECT_API_URL": "http://127.0.0.1:9999/api"}
    assert use_stack_server([], chosen) is None and chosen["PREFECT_API_URL"] == "http://127.0.0.1:9999/api"


def test_workspace_of_a_command_line():
    assert workspace_of(["env=test", "paths.workspace=/srv/ws"], {"MLOPS_WORKSPACE": "/other"}) == Path("/srv/ws")
    assert workspace_of(["env=test"], {"MLOPS_WORKSPACE": "/other"}) == Path("/other")
    assert workspace_of([], {}) == Path("workspace")


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["build", "deploy", "monitor"])
def test_information_flags_import_neither_torch_nor_mlflow_nor_prefect(flow):
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", f"flows.{flow}", "--cfg", "job", "env=test"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr[-2000:]
    assert "environment: test" in process.stdout or "environment:" in process.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in process.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"torch", "mlflow", "prefect"}


@pytest.mark.slow
def test_information_flags_check_the_overrides_like_a_run():
    process = subprocess.run([sys.executable, "-m", "flows.build", "--cfg", "job", "train.max_epoch=3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "did you mean `train.max_epochs`?" in process.stderr


@pytest.mark.slow
def test_a_command_line_run_reports_to_the_stack_server(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()  # the session's real Prefect server on 127.0.0.1, standing in for the stack's
    workspace = stack(tmp_path / "ws", os.getpid(), url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {"MLOPS_WORKSPACE": str(workspace)}
    process = subprocess.run([sys.executable, "-m", "flows.deploy", "env=test", "action=stop"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert f"reporting to the project's Prefect server {url}" in process.stderr
    assert "Starting temporary server" not in process.stderr
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["deploy"])))
    assert any(run.parameters.get("overrides") == ["action=stop"] and run.parameters.get("env") == "test" for run in runs), \
        process.stderr[-2000:]


@pytest.mark.slow
def test_a_command_line_run_with_no_api_uses_the_temporary_server_started_during_its_imports(tmp_path):
    """flows.startup starts Prefect's temporary API in a thread while flows.deploy imports; the
    flow waits for it and runs on it: one server started, none left behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")} | {
        "MLOPS_WORKSPACE": str(tmp_path / "ws"), "PREFECT_HOME": str(tmp_path / "prefect")}
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.deploy", "env=test", "action=stop"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    lines = process.stderr.splitlines()
    started = [i for i, line in enumerate(lines) if "Starting temporary server" in line]
    mlflow_imported = next(i for i, line in enumerate(lines)
                           if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == "mlflow")
    assert len(started) == 1 and started[0] < mlflow_imported, "the server started once, before the flow's imports ended"
    assert "Finished in state Completed()" in process.stderr
    assert "Stopping temporary server" in process.stderr


def test_no_temporary_server_is_started_where_an_api_is_chosen(monkeypatch):
    from flows import startup

    monkeypatch.setattr(startup, "_temporary_api", None)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "flows.build", "env=test"])
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    startup.start()
    assert startup._temporary_api is None
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "flows.label", "export"])  # runs no flow
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setattr(startup, "stack_api_url", lambda workspace: None)
    startup.start()
    assert startup._temporary_api is None


def test_a_command_line_run_skips_the_last_garbage_collection(monkeypatch):
    import atexit
    import gc

    from flows import startup

    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "flows.build", "env=test"])
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no temporary server
    startup.start()
    assert registered == [gc.freeze]
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest"])  # not a flow's command line
    startup.start()
    assert registered == [gc.freeze]
