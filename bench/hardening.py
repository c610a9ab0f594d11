"""The model server under load and under attack: errors, latency and memory against its limits.

    python bench/hardening.py [--requests 10000] [--clients 32]

One run builds a model (the build flow, env=test, 1 epoch, in a temporary workspace) and starts
`python -m mlops.serve` on it twice: with the default limits of `conf/serve/default.yaml`, and
with the memory budgets lifted (`max_decode_mb`, `max_bodies_mb` at 100 GB: what a server
without them does). Against each, in turn:

1. load: `--requests` single-image requests (the digits test PNGs) from `--clients` threads,
   one `httpx.Client` each: errors, latency percentiles, server RSS before, at peak and after;
2. decompression attack: 4 clients each send 2 `/predict/batch` requests of 8 black 6300x6300
   PNGs (113 KB each, 40 M pixels: just under `max_pixels`): server RSS at peak (sampled every
   5 ms) and 2 s after, against the ceiling the limits promise (RSS at rest + `max_decode_mb` +
   `max_bodies_mb`);
3. /metrics growth: 2,000 requests to distinct unknown 200-character paths;
4. slow clients: 200 connections that send half a request and stop: how many the server still
   holds open `timeout_request_s` + 2 s later.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serving import ALIAS, MODEL, build_model, free_port, start_server, stop_server, wait_ready  # noqa: E402
from table import print_table  # noqa: E402

from mlops.config.serve import default_serve_config  # noqa: E402
from mlops.data.layout import dataset_dir  # noqa: E402

MB = 2**20


class PeakRss:
    """Samples a process's resident memory every 5 ms in a thread: `with PeakRss(pid) as peak: ...; peak.mb`."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / MB


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / MB


def load(url: str, pid: int, pngs: list[bytes], requests: int, clients: int) -> dict:
    """`requests` single-image requests split over `clients` threads."""
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        mine_status, mine_latency = [], []
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
            for i in range(index, requests, clients):
                sent = time.perf_counter()
                try:
                    status = http.post("/predict", content=pngs[i % len(pngs)], headers={"content-type": "image/png"}).status_code
                except httpx.TransportError:
                    status = 0
                mine_latency.append(time.perf_counter() - sent)
                mine_status.append(status)
        with lock:
            statuses.extend(mine_status)
            latencies.extend(mine_latency)

    before = rss_mb(pid)
    start = time.perf_counter()
    with PeakRss(pid) as peak:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - start
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "requests": len(statuses), "errors": sum(s != 200 for s in statuses), "per_s": len(statuses) / wall,
        "p50": p50, "p95": p95, "p99": p99, "rss_before": before, "rss_peak": peak.mb, "rss_after": rss_mb(pid),
    }


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6300, 6300)).save(buffer, "PNG")
    return buffer.getvalue()


def decompression_attack(url: str, pid: int, clients: int = 4, batches: int = 2, per_batch: int = 8) -> dict:
    files = [("files", (f"{i}.png", bomb(), "image/png")) for i in range(per_batch)]
    outcomes: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300, trust_env=False) as http:
            for _ in range(batches):
                answer = http.post("/predict/batch", files=files)
                kinds = [r.get("error", "ok") for r in answer.json()["results"]] if answer.status_code == 200 else [str(answer.status_code)]
                outcomes.extend(kinds)

    before = rss_mb(pid)
    start = time.perf_counter()
    with PeakRss(pid) as peak:
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - start
    time.sleep(2)
    return {"rss_before": before, "rss_peak": peak.mb, "rss_after": rss_mb(pid), "seconds": wall,
            "outcomes": {kind: outcomes.count(kind) for kind in sorted(set(outcomes))}}


def metrics_growth(url: str, paths: int = 2000) -> tuple[int, int]:
    with httpx.Client(base_url=url, trust_env=False) as http:
        before = len(http.get("/metrics").content)
        for i in range(paths):
            http.get(f"/x{i}{'A' * 200}")
        return before, len(http.get("/metrics").content)


def slow_clients(port: int, wait_s: float, count: int = 200) -> int:
    """Connections that send half a request; how many the server still holds after `wait_s`."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n")  # headers never end
        sockets.append(sock)
    time.sleep(wait_s)
    return sum(held(sock) for sock in sockets)


def held(sock: socket.socket) -> bool:
    """True while the server keeps the connection open (an answer such as 408 may come before it closes)."""
    sock.settimeout(0.05)
    try:
        while sock.recv(4096):
            pass
        return False  # closed by the server
    except TimeoutError:
        return True
    except OSError:
        return False  # reset by the server
    finally:
        sock.close()


def built(prefix: str) -> tuple[Path, str, list[bytes]]:
    """A temporary workspace, the tracking URI of a model the build flow made there, and the
    bytes of its test PNGs."""
    workspace = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"workspace {workspace}: building the model ...", flush=True)
    tracking_uri = build_model(workspace)
    pngs = [p.read_bytes() for p in sorted((dataset_dir(workspace / "dvc", "digits") / "test").glob("*/*.png"))]
    return workspace, tracking_uri, pngs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    if not 1 <= args.requests <= 50_000 or not 1 <= args.clients <= 128:
        parser.error("--requests must be in [1, 50000] and --clients in [1, 128]")

    workspace, tracking_uri, pngs = built("bench-hardening-")
    defaults = default_serve_config()
    variants = {
        "default limits": defaults,
        "budgets lifted": defaults.model_copy(update={"max_decode_mb": 100_000, "max_bodies_mb": 100_000}),
    }
    rows, attacks, other = [], [], []
    for name, settings in variants.items():
        port = free_port()
        settings = settings.model_copy(update={"port": port})
        records = {"dir": str(workspace / "records" / name.replace(" ", "-")), "max_mb": 64, "max_age_days": 1}
        command = [
            sys.executable, "-m", "mlops.serve", "--tracking-uri", tracking_uri, "--model", MODEL, "--alias", ALIAS,
            "--settings", settings.model_dump_json(), "--records", json.dumps(records),
            "--cache-dir", str(workspace / "serving-cache"),
        ]
        log = workspace / f"server-{port}.log"
        server = start_server(command, os.environ.copy(), log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(server, url + "/ready", log)
            print(f"{name}: {args.requests} requests from {args.clients} clients ...", flush=True)
            result = load(url, server.pid, pngs, args.requests, args.clients)
            rows.append([name, f"{result['requests']:,}", result["errors"], f"{result['per_s']:,.0f}", f"{result['p50']:.1f}",
                         f"{result['p95']:.1f}", f"{result['p99']:.1f}", f"{result['rss_before']:.0f}",
                         f"{result['rss_peak']:.0f}", f"{result['rss_after']:.0f}"])
            print(f"{name}: decompression attack ...", flush=True)
            attack = decompression_attack(url, server.pid)
            ceiling = attack["rss_before"] + settings.max_decode_mb + settings.max_bodies_mb
            attacks.append([name, f"{attack['rss_before']:.0f}", f"{attack['rss_peak']:.0f}",
                            f"{ceiling:,.0f}" if settings.max_decode_mb < 100_000 else "none",
                            f"{attack['rss_after']:.0f}", f"{attack['seconds']:.1f}",
                            ", ".join(f"{k} {v}" for k, v in attack["outcomes"].items())])
            print(f"{name}: /metrics growth and slow clients ...", flush=True)
            before, after = metrics_growth(url)
            held = slow_clients(port, settings.timeout_request_s + 2)
            other.append([name, f"{before:,}", f"{after:,}", held])
        finally:
            stop_server(server)

    print(f"\n{os.cpu_count()} CPU cores; RSS in MB of the server process; latency in ms\n")
    print_table(["server", "requests", "errors", "req/s", "p50", "p95", "p99", "RSS before", "RSS peak", "RSS after"], rows)
    print()
    print_table(["server", "RSS at rest", "RSS peak", "ceiling", "RSS 2 s after", "seconds", "images"], attacks)
    print()
    print_table(["server", "/metrics bytes before", "after 2,000 unknown paths", "half-sent requests still open"], other)
    shutil.rmtree(workspace)  # kept, with the servers' logs, when anything above failed


if __name__ == "__main__":
    main()
