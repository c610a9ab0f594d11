"""Deploy: model servers as managed local processes, application tests over HTTP, manifests.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml
from sklearn.metrics import precision_recall_fscore_support

from mlops.config import Config, ServeConfig

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
    serve: ServeConfig, tracking_uri: str, model: str, version: str, port: int, admin_port: int | None, reuse_port: bool
) -> list[str]:
    command = [
        sys.executable, "-m", "mlops.serving",
        "--tracking-uri", tracking_uri,
        "--model", model,
        "--version", version,
        "--host", serve.host,
        "--port", str(port),
        "--records-dir", str(serve.records.dir),
        "--records-max-mb", str(serve.records.max_mb),
        "--records-max-age-days", str(serve.records.max_age_days),
        "--max-body-mb", str(serve.max_body_mb),
        "--max-pixels", str(serve.max_pixels),
        "--max-batch-images", str(serve.max_batch_images),
        "--batch-max-size", str(serve.batch_max_size),
        "--batch-max-wait-ms", str(serve.batch_max_wait_ms),
    ]
    if admin_port:
        command += ["--admin-port", str(admin_port)]
    if reuse_port:
        command.append("--reuse-port")
    if serve.token_env:
        command += ["--token-env", serve.token_env]
    return command


def start_server(config: Config, version: str, state_dir: Path, reuse_port: bool, admin_port: bool) -> LiveServer:
    """Start a detached server process for `version`; it outlives the flow that started it."""
    serve = config.serve
    admin = free_port(serve.host) if admin_port else None
    command = server_command(
        serve, config.mlflow.tracking_uri, config.mlflow.registered_model, version, serve.port, admin, reuse_port
    )
    logs = state_dir / "logs"
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
        return process.status() != psutil.STATUS_ZOMBIE and "mlops.serving" in " ".join(process.cmdline())
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


# -- application tests ---------------------------------------------------------------------


@dataclass
class ApplicationResult:
    requests: int
    errors: int
    error_rate: float
    accuracy: float
    macro_precision: float
    macro_recall: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_rps: float
    statuses: dict[str, int]

    def metrics(self, prefix: str = "app_") -> dict[str, float]:
        keys = ("error_rate", "accuracy", "macro_precision", "macro_recall", "latency_p50_ms", "latency_p95_ms", "throughput_rps")
        return {prefix + key: float(getattr(self, key)) for key in keys}


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def run_application_tests(
    url: str, files: list[tuple[Path, int]], classes: list[str], concurrency: int, token: str | None = None
) -> ApplicationResult:
    """Send every image as a client would (raw bytes to POST /predict) and score the answers."""
    headers = auth_headers(token)

    def send(client: httpx.Client, path: Path) -> tuple[int, str | None, float]:
        start = time.perf_counter()
        try:
            answer = client.post(
                url + "/predict", content=path.read_bytes(), headers=headers | {"content-type": "image/png"}
            )
        except httpx.TransportError:
            return 0, None, (time.perf_counter() - start) * 1000.0
        latency = (time.perf_counter() - start) * 1000.0
        if answer.status_code != 200:
            return answer.status_code, None, latency
        try:
            return 200, answer.json()["prediction"], latency
        except (ValueError, KeyError, TypeError):  # a 200 that is not a prediction is an error too
            return -1, None, latency

    clients = [httpx.Client(timeout=30) for _ in range(concurrency)]
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            answers = list(pool.map(lambda item: send(clients[item[0] % concurrency], item[1][0]), enumerate(files)))
    finally:
        for client in clients:
            client.close()
    elapsed = time.perf_counter() - started

    truth = np.array([label for _, label in files])
    index = {name: i for i, name in enumerate(classes)}
    predicted = np.array([index.get(label, -1) if label else -1 for _, label, _ in answers])
    precision, recall, _, _ = precision_recall_fscore_support(
        truth, predicted, labels=list(range(len(classes))), zero_division=0
    )
    latencies = [latency for status, _, latency in answers if status == 200] or [float("inf")]
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    errors = sum(1 for status, _, _ in answers if status != 200)
    return ApplicationResult(
        requests=len(answers),
        errors=errors,
        error_rate=errors / max(len(answers), 1),
        accuracy=float((truth == predicted).mean()),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        throughput_rps=len(answers) / elapsed,
        statuses=statuses,
    )


# -- Kubernetes ----------------------------------------------------------------------------


def render_manifests(config: Config, version: str) -> list[dict]:
    """A Deployment and a Service for the model server of `version`, from `deploy.kubernetes`."""
    k8s, serve = config.deploy.kubernetes, config.serve
    name = f"{config.mlflow.registered_model}-server"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "mlops-flows", "mlops/environment": config.environment}
    command = server_command(serve, "$(MLFLOW_TRACKING_URI)", config.mlflow.registered_model, version, 8000, None, False)
    command[0] = "python"
    command[command.index("--host") + 1] = "0.0.0.0"
    command[command.index("--records-dir") + 1] = "/var/lib/mlops/records"
    env = [{"name": "MLFLOW_TRACKING_URI", "value": config.mlflow.tracking_uri}]
    if serve.token_env:
        env.append({
            "name": serve.token_env,
            "valueFrom": {"secretKeyRef": {"name": k8s.token_secret, "key": "token"}},
        })
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "model-server",
        "image": k8s.image,
        "command": command,
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": env,
        "readinessProbe": probe | {"httpGet": {"path": "/ready", "port": "http"}, "initialDelaySeconds": 5},
        "livenessProbe": probe | {"httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 15},
        "resources": {
            "requests": {"cpu": k8s.cpu_request, "memory": k8s.memory_request},
            "limits": {"cpu": k8s.cpu_limit, "memory": k8s.memory_limit},
        },
        "volumeMounts": [{"name": "records", "mountPath": "/var/lib/mlops/records"}],
    }
    metadata = {"name": name, "namespace": k8s.namespace, "labels": labels}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata | {"annotations": {"mlops/model-version": version}},
        "spec": {
            "replicas": k8s.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"}},
                "spec": {"containers": [container], "volumes": [{"name": "records", "emptyDir": {}}]},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    return [deployment, service]


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &anchors: manifests read as written
        return True


def write_manifests(documents: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False))
    return path
