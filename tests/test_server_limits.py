"""The server's connection limits over real sockets: half-sent requests are closed after the request
timeout, oversized headers are refused, connections are capped; and a busy port is one line."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import LiveApp
from PIL import Image

from mlops.config.serve import default_serve_config
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier

TIMEOUT_S = 1.0
SLACK_S = 2.0


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def app(tiny_onnx):
    """A fresh app for each server (its asyncio state belongs to one event loop)."""
    return create_app(ServedModel("pets", "1", OnnxClassifier(tiny_onnx)), default_serve_config())


def settings(**changes):
    return default_serve_config().model_copy(
        update={"timeout_request_s": TIMEOUT_S, "timeout_keep_alive_s": TIMEOUT_S} | changes
    )


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S + SLACK_S + 5)
    return sock


def closed_after(sock: socket.socket, started: float) -> tuple[float, bytes]:
    """Read until the server closes the connection: (seconds since `started`, what it sent)."""
    answer = b""
    try:
        while chunk := sock.recv(4096):
            answer += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - started, answer


def post_head(length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_half_sent_requests_are_closed_after_the_request_timeout(app, http):
    body = png()
    with LiveApp(app, settings=settings(), http=http) as url:
        started = time.monotonic()
        silent = [connect(url) for _ in range(10)]  # connect, send nothing
        half_line = [connect(url) for _ in range(10)]
        for sock in half_line:
            sock.sendall(b"GET /hea")
        half_headers = [connect(url) for _ in range(10)]
        for sock in half_headers:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        half_body = [connect(url) for _ in range(15)]
        for sock in half_body:
            sock.sendall(post_head(len(body)) + body[:10])
        trickle = [connect(url) for _ in range(5)]  # a byte every 0.2 s: each read is in time, the request is not

        def drip():
            for byte in b"GET /health HTTP/1.1\r\nhost: x\r\n" * 4:
                for sock in trickle:
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        pass
                time.sleep(0.2)

        threading.Thread(target=drip, daemon=True).start()

        # meanwhile a normal request, and one whose body arrives late but within the timeout, succeed
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        late = connect(url)
        late.sendall(post_head(len(body)) + body[:10])
        time.sleep(TIMEOUT_S / 2)
        late.sendall(body[10:])
        assert late.recv(4096).startswith(b"HTTP/1.1 200")

        results = [closed_after(sock, started) for sock in silent + half_line + half_headers + half_body + trickle]
        for sock in silent + half_line + half_headers + half_body + trickle + [late]:
            sock.close()
    assert len(results) == 50
    assert max(seconds for seconds, _ in results) < TIMEOUT_S + SLACK_S, results
    assert min(seconds for seconds, _ in results) >= TIMEOUT_S * 0.9  # not before the timeout
    assert {answer.split(b"\r\n")[0] for _, answer in results} == {b"HTTP/1.1 408 Request Timeout"}


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_half_sent_second_request_on_a_kept_alive_connection_is_closed(app, http):
    with LiveApp(app, settings=settings(timeout_keep_alive_s=30.0), http=http) as url:
        sock = connect(url)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.5)
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nho")
        seconds, answer = closed_after(sock, started)
        sock.close()
    assert TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S + SLACK_S and answer.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_pipelined_request_with_half_its_body_is_closed(app, http):
    body = png()
    with LiveApp(app, settings=settings(timeout_keep_alive_s=30.0), http=http) as url:
        sock = connect(url)
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" + post_head(len(body)) + body[:10])
        seconds, answer = closed_after(sock, started)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and TIMEOUT_S * 0.9 <= seconds < TIMEOUT_S + SLACK_S


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_oversized_headers_are_refused_at_once(app, http):
    with LiveApp(app, settings=settings(), http=http) as url:
        sock = connect(url)
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-filler: " + b"a" * 20_000 + b"\r\n")
        seconds, answer = closed_after(sock, started)
        sock.close()
    assert seconds < TIMEOUT_S / 2
    assert answer.split(b" ")[1] in (b"431", b"400")  # ours (httptools has no limit), h11's own


def test_connections_beyond_the_cap_get_503_until_idle_ones_time_out(app):
    with LiveApp(app, settings=settings(max_connections=5)) as url:
        idle = [connect(url) for _ in range(5)]
        time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        time.sleep(TIMEOUT_S + 0.5)  # the idle connections are closed by the request timeout
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        for sock in idle:
            sock.close()


def test_a_port_in_use_is_one_line_and_a_failure(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "mlops.serve", "--tracking-uri", f"sqlite:///{tmp_path}/none.db",
             "--model", "m", "--version", "1", "--port", str(port)],
            capture_output=True, text=True, timeout=120, env=os.environ | {"MLOPS_API_TOKEN": "x"},
        )
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: address already in use (serve.port)"
