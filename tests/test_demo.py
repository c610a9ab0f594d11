"""The README's one-command demo of the whole loop, shrunk to tiny data and two epochs: one run,
then what it leaves behind (the stop command it prints, no secret anywhere)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.demo import TOKEN_FILE, demo
from mlops.deploy import processes as deployment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

REPO = Path(__file__).resolve().parents[1]
LOOSE = [
    "train.max_epochs=2", "data.max_per_class=40", "gate.min_accuracy=0.3", "gate.min_class_recall=0.0",
    "gate.max_recall_gap=1.0", "gate.max_accuracy_drop=1.0", "gate.max_macro_f1_drop=1.0",
    # the retraining build gets production's gate (gate/default.yaml): its per-class bounds judge
    # the recall intervals of ~26 test images a class (digit 8 at 19/26, a 0.27 gap by the point
    # estimates, failed 2 of 4 CI runs before gate.class_recall_confidence)
]


class Messages(logging.Handler):
    """What the flow runs log, as formatted messages."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One demo run that keeps production serving (as the README's command does): (workspace,
    summary, log messages); every server it left is stopped afterwards."""
    root = tmp_path_factory.mktemp("demo")
    workspace = root / "ws"
    saved, logged = dict(os.environ), Messages()
    logging.getLogger("prefect.flow_runs").addHandler(logged)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_REMOTE_URL", "MLOPS_WORKSPACE"):
        os.environ.pop(name, None)  # the demo's stores are the workspace's, whatever an earlier test set
    try:
        summary = demo(
            workspace=str(workspace), port=deployment.free_port("127.0.0.1"),
            test_port=deployment.free_port("127.0.0.1"), keep=True, overrides=LOOSE,
        )
        yield workspace, summary, logged.messages
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(logged)
        os.environ.clear()
        os.environ.update(saved)
        for env in ("test", "production"):
            live = deployment.read_live(workspace / "deploy" / env)
            if live is not None:
                deployment.stop_server(live.pid)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(root) in " ".join(p.info["cmdline"] or [])]


def gone(pid: int) -> bool:
    """Not running: no such process, or one that has exited (a zombie until the test process reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_demo_runs_the_loop_and_the_retrained_version_passes_the_gates_again(run):
    _, summary, _ = run
    assert summary["build"].startswith("version 1") and summary["deploy test"] == "version 1 approved"
    assert summary["release"].startswith("version 1 live on http://127.0.0.1:")
    assert summary["monitor"].startswith("breach: ") and "drift.drifted_share" in summary["monitor"]
    assert "drift.drifted_share@v1" in summary["alerts"]
    assert summary["retrain"].startswith("in-process, COMPLETED, model version 2 (")
    assert summary["retrained version in test"] == "version 2 approved"
    assert summary["retrained release"].startswith("version 2 live on http://127.0.0.1:")


def test_the_retrained_release_wins_back_the_drifted_accuracy_measured_through_http(run):
    """The issue's promise: production data flows back. On held-out test images (clean and
    brightened, never trained on), through the production server before and after."""
    _, summary, messages = run
    recovery = summary["recovery"]
    print(f"held-out accuracy, clean / brightened: v1 {recovery.old_clean:.3f} / {recovery.old_drifted:.3f},"
          f" v2 {recovery.new_clean:.3f} / {recovery.new_drifted:.3f}")  # for the record (pytest -s)
    assert (recovery.old, recovery.new) == ("1", "2")
    assert recovery.old_clean - recovery.old_drifted >= 0.3, recovery  # the drift hurt
    assert recovery.new_drifted >= recovery.old_drifted + 0.25, recovery  # and retraining on what production saw helped
    assert recovery.new_clean >= recovery.old_clean - 0.15, recovery  # without forgetting the clean world
    assert any("| brightened (the drift) |" in m and "won back" in m for m in messages)


def test_the_printed_stop_command_stops_production_from_a_fresh_shell(run):
    import prefect.settings

    workspace, _, messages = run
    (printed,) = [m for m in messages if "stop it with: " in m]
    command = printed.split("stop it with: ", 1)[1]
    live = deployment.read_live(workspace / "deploy" / "production")
    assert live is not None and not gone(live.pid)
    fresh = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ["HOME"],
             "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}  # this session's Prefect, not a new one
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=fresh, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert deployment.read_live(workspace / "deploy" / "production") is None
    assert gone(live.pid)


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from (path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def holding(secret: bytes, files: list[Path]) -> list[Path]:
    return [path for path in files if secret in path.read_bytes()]


def test_the_production_token_is_in_no_log_artifact_tag_report_or_database(run):
    import prefect.settings
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    workspace, _, _ = run
    APILogWorker.drain_all(timeout=30, at_exit=False)  # what the runs logged is in the database before it is read
    EventsWorker.drain_all(timeout=30, at_exit=False)
    token_file = workspace / TOKEN_FILE
    token = token_file.read_text().strip().encode()
    database = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    roots = [workspace.parent, database.parent, Path(prefect.settings.PREFECT_HOME.value())]
    files = [path for path in files_under(*[r for r in roots if r.exists()]) if path != token_file]

    looked_at = {path.name for path in files}
    assert {"mlflow.db", database.name, "monitor.html", "checks.json"} <= looked_at
    assert any(name.startswith("server-v") and name.endswith(".log") for name in looked_at)  # the servers' logs
    assert len(token) >= 16 and holding(token, [token_file]) == [token_file]  # the search finds it where it is
    assert holding(token, files) == []
