"""serve.workers: several server processes on one port, started and ended by the server."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from conftest import register_tiny
from PIL import Image

from mlops.config.serve import default_serve_config
from mlops.deploy.processes import free_port

pytestmark = pytest.mark.slow  # starts processes: kept out of the fast tier


def start(uri: str, tmp_path, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port("127.0.0.1")
    settings = default_serve_config().model_copy(update={"workers": workers, "port": port})
    command = [sys.executable, "-m", "mlops.serve", "--tracking-uri", uri, "--model", "digits", "--version", "1",
               "--settings", settings.model_dump_json(), "--cache-dir", str(tmp_path / "cache")]
    log = (tmp_path / f"server-{port}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), f"http://127.0.0.1:{port}"


def answering_pids(url: str, want: int, attempts: int = 400) -> set[int]:
    """The pids that answer /ready, each call on a new connection, until `want` of them have."""
    pids: set[int] = set()
    for _ in range(attempts):
        try:
            pids.add(httpx.get(url + "/ready", timeout=2).json()["pid"])
        except httpx.TransportError:
            time.sleep(0.1)
        if len(pids) >= want:
            break
    return pids


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def gone(pid: int, timeout_s: float = 20.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout_s)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


def test_workers_share_the_port_and_end_with_the_server(tiny_onnx, tmp_path):
    uri, _ = register_tiny(tiny_onnx, tmp_path / "store")
    server, url = start(uri, tmp_path, workers=2)
    try:
        pids = answering_pids(url, 2)
        assert server.pid in pids and len(pids) == 2, (tmp_path / f"server-{url.rsplit(':', 1)[1]}.log").read_text()
        (worker,) = pids - {server.pid}
        assert psutil.Process(worker).ppid() == server.pid
        answers = [httpx.post(url + "/predict", content=png(), headers={"content-type": "image/png"}) for _ in range(20)]
        assert [a.status_code for a in answers] == [200] * 20
        server.send_signal(signal.SIGTERM)  # a graceful stop ends the workers first
        assert server.wait(30) == -signal.SIGTERM  # uvicorn ends with the signal it caught
        assert gone(worker, 0.1)
    finally:
        server.kill()

    server, url = start(uri, tmp_path, workers=3)
    try:
        pids = answering_pids(url, 3)
        assert len(pids) == 3
        server.kill()  # no chance to stop them: the kernel tells the workers (PR_SET_PDEATHSIG)
        server.wait()
        assert all(gone(pid) for pid in pids - {server.pid})
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/ready", timeout=2)
    finally:
        server.kill()
