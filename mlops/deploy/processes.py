"""Model servers as managed local processes: start, wait for ready, stop, the live record.

A release is blue-green on one port: the new server binds the public port with SO_REUSEPORT
beside the old one plus a private admin port; it is checked on the admin port, then the old
server is stopped (graceful: it finishes what it has), so traffic moves without a gap. If the
new server fails at any point it is stopped and the old one never noticed.

A server is known by more than its pid, which the system reuses: the live record keeps its
process's create time and the instance id it was started with (`--instance-id`, reported on
/ready), and nothing is signalled unless both still match.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from mlops.config import DeployConfig, RecordsConfig, ServeConfig
from mlops.serve.server import ServerError, tls_files

LIVE_FILE = "live.json"
CREATE_TIME_SLACK_S = 1.0  # the boot time psutil adds to a start time can move by a second

log = logging.getLogger(__name__)


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
    create_time: float | None = None  # of the process (psutil): with `instance`, who `pid` is
    instance: str | None = None  # the id passed as --instance-id and reported on /ready
    tls_cert: str | None = None  # https: the certificate the server presents, which its clients trust
    challenger: str | None = None  # a second version in the process (canary or shadow)
    challenger_role: str | None = None
    challenger_share: float | None = None

    @property
    def identified(self) -> bool:
        """False for a record written before create time and instance were kept."""
        return self.create_time is not None and self.instance is not None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.admin_port or self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What an httpx client of this server passes as `verify`."""
        return trusting(self.tls_cert) if self.tls_cert else True


def trusting(cert_file: str) -> ssl.SSLContext:
    """A client context that trusts this certificate (self-signed, or a chain a CA issued) and no
    other: the deploy flow talks to the server it started and pins its certificate."""
    context = ssl.create_default_context(cafile=cert_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf or intermediate as the anchor
    return context


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
    cache_dir: Path | None = None,
    instance: str | None = None,
    challenger: tuple[str, str, float] | None = None,
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
    if cache_dir is not None:
        command += ["--cache-dir", str(cache_dir)]
    if instance is not None:
        command += ["--instance-id", instance]
    if challenger is not None:
        version, role, share = challenger
        command += ["--challenger-version", version, "--challenger-role", role, "--challenger-share", repr(share)]
    return command


def tls_cert(serve: ServeConfig) -> str | None:
    """The certificate file a server with these settings presents (None: plain http); a
    DeployError when `serve.tls` is incomplete or names what cannot be read."""
    try:
        files = tls_files(serve.tls)
    except ServerError as error:
        raise DeployError(str(error)) from None
    return str(files[0]) if files else None


def start_server(
    config: DeployConfig, version: str, blue_green: bool, challenger: tuple[str, str, float] | None = None
) -> LiveServer:
    """Start a detached server process for `version`; it outlives the flow that started it.

    `blue_green`: share the public port with the server being replaced and add a private admin
    port, where the new server is checked before any traffic reaches it. `challenger`: (version,
    "canary" or "shadow", share) served beside it.
    """
    serve = config.serve
    cert = tls_cert(serve)
    admin = free_port(serve.host) if blue_green else None
    instance = uuid.uuid4().hex
    cache = serve.cache_dir or config.paths.deploy / "models"
    command = server_command(
        serve, config.records, config.mlflow.tracking_uri, config.mlflow.registered_model, version, admin, blue_green,
        cache, instance, challenger,
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
        started.isoformat(), _create_time(process.pid), instance, cert, *(challenger or (None, None, None)),
    )


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None  # gone already: wait_ready says so, with its log


def wait_ready(server: LiveServer, timeout_s: float) -> dict:
    """Poll /ready (on the admin port if there is one) until our process answers it.

    The instance check matters: another server may hold the port, and its answer is not ours.
    """
    deadline = time.monotonic() + timeout_s
    verify = server.verify
    while time.monotonic() < deadline:
        if not _alive(server.pid):
            raise DeployError(f"server for version {server.version} exited before it was ready:\n{log_tail(server)}")
        try:
            answer = httpx.get(server.admin_url + "/ready", timeout=2, verify=verify)
            if answer.status_code == 200 and _answered_by(server, answer.json()):
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


def _answered_by(server: LiveServer, ready: dict) -> bool:
    if server.instance is not None:
        return ready.get("instance") == server.instance
    return ready.get("pid") == server.pid


def is_running(server: LiveServer | int) -> bool:
    """True while `server`'s process lives: a model server, not a zombie, with the recorded create
    time and instance id. Given a bare pid, or a record without them (written before they were
    kept: identity unknown), any model-server process with that pid counts."""
    pid = server if isinstance(server, int) else server.pid
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        if process.status() == psutil.STATUS_ZOMBIE or "mlops.serve" not in " ".join(command):
            return False
        if isinstance(server, LiveServer) and server.identified:
            same_start = abs(process.create_time() - server.create_time) < CREATE_TIME_SLACK_S
            return same_start and server.instance in command
        return True
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_server(server: LiveServer | int, timeout_s: float = 20.0) -> bool:
    """SIGTERM (uvicorn drains open requests), then SIGKILL after `timeout_s`.

    Only the process `is_running` recognises is signalled: a pid that now belongs to another
    process, even another model server, is left alone. True when a server was stopped.
    """
    pid = server if isinstance(server, int) else server.pid
    if not is_running(server):
        _reap(pid)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _gone(pid):  # not is_running: an exiting process may already hide its command line
            return True
        time.sleep(0.1)
    if is_running(server):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    _reap(pid)
    return True


def _gone(pid: int) -> bool:
    """Exited: reaped, if it is our child (its main thread may show as a zombie while its other
    threads still exit), or gone or a zombie otherwise (its own parent reaps it)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not _alive(pid)
    return reaped == pid


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it


def read_live(state_dir: Path) -> LiveServer | None:
    path = state_dir / LIVE_FILE
    if not path.exists():
        return None
    server = LiveServer(**json.loads(path.read_text()))
    if not server.identified:
        log.warning("%s (pid %d) was written before servers were identified by create time and instance:"
                    " identity unknown, any model server with that pid is taken for it", path, server.pid)
    return server


def write_live(state_dir: Path, server: LiveServer | None) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LIVE_FILE
    if server is None:
        path.unlink(missing_ok=True)
    else:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(server), indent=2))
        temporary.replace(path)


