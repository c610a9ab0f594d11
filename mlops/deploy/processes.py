"""Model servers as managed local processes: start, wait for ready, stop, the live record.

A release is blue-green on one port: the new server binds the public port with SO_REUSEPORT
beside the old one plus a private admin port; it is checked on the admin port, then the old
server is stopped (graceful: it finishes what it has), so traffic moves without a gap. If the
new server fails at any point it is stopped and the old one never noticed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from mlops.config import DeployConfig, RecordsConfig, ServeConfig

LIVE_FILE = "live.json"


class DeployError(RuntimeError):
    pass


@dataclass
class LiveServer:
    pid: int
    model: str
    version: str
    host: str
    port: int
    admin_port: int | None
    log: str
    started: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port or self.port}"


# -- processes -----------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(
    serve: ServeConfig,
    records: RecordsConfig | None,
    tracking_uri: str,
    model: str,
    version: str,
    admin_port: int | None = None,
    reuse_port: bool = False,
) -> list[str]:
    """`python -m mlops.serve` for `version`, its settings passed as JSON (validated again there)."""
    command = [
        sys.executable, "-m", "mlops.serve",
        "--tracking-uri", tracking_uri,
        "--model", model,
        "--version", version,
        "--settings", serve.model_dump_json(),
    ]
    if records is not None:
        command += ["--records", records.model_dump_json()]
    if admin_port:
        command += ["--admin-port", str(admin_port)]
    if reuse_port:
        command.append("--reuse-port")
    return command


def start_server(config: DeployConfig, version: str, blue_green: bool) -> LiveServer:
    """Start a detached server process for `version`; it outlives the flow that started it.

    `blue_green`: share the public port with the server being replaced and add a private admin
    port, where the new server is checked before any traffic reaches it.
    """
    serve = config.serve
    admin = free_port(serve.host) if blue_green else None
    command = server_command(
        serve, config.records, config.mlflow.tracking_uri, config.mlflow.registered_model, version, admin, blue_green
    )
    logs = config.paths.deploy / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    log_path = logs / f"server-v{version}-{started:%Y%m%dT%H%M%S%f}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return LiveServer(
        process.pid, config.mlflow.registered_model, version, serve.host, serve.port, admin, str(log_path),
        started.isoformat(),
    )


def wait_ready(server: LiveServer, timeout_s: float) -> dict:
    """Poll /ready (on the admin port if there is one) until our process answers it.

    The pid check matters: another server may hold the port, and its answer is not ours.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(server.pid):
            raise DeployError(f"server for version {server.version} exited before it was ready:\n{log_tail(server)}")
        try:
            answer = httpx.get(server.admin_url + "/ready", timeout=2)
            if answer.status_code == 200 and answer.json().get("pid") == server.pid:
                return answer.json()
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(0.25)
    raise DeployError(
        f"server for version {server.version} was not ready on {server.admin_url} within {timeout_s:g} s"
        f" (deploy.ready_timeout_s):\n{log_tail(server)}"
    )


def log_tail(server: LiveServer, lines: int = 15) -> str:
    try:
        return "\n".join(Path(server.log).read_text().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    """Exists and is not a zombie (a just-started child may not show its command line yet)."""
    _reap(pid)
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_running(pid: int) -> bool:
    """True for a live (not zombie) model-server process with this pid."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "mlops.serve" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_server(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM (uvicorn drains open requests), then SIGKILL after `timeout_s`."""
    if not is_running(pid):
        _reap(pid)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_running(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it


def read_live(state_dir: Path) -> LiveServer | None:
    path = state_dir / LIVE_FILE
    if not path.exists():
        return None
    return LiveServer(**json.loads(path.read_text()))


def write_live(state_dir: Path, server: LiveServer | None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LIVE_FILE
    if server is None:
        path.unlink(missing_ok=True)
    else:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(server), indent=2))
        temporary.replace(path)


