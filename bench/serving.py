"""Serving throughput and latency: our model server, `mlflow models serve` and in-process ONNX Runtime.

    python bench/serving.py [--concurrency 8] [--seconds 10] [--batch 32]

One run builds a model (the build flow, env=test, 1 epoch, in a temporary workspace) and serves
the same registered version, `digits@candidate`, three ways:

1. our server, `python -m mlops.serve`: the client posts the PNG bytes of the test images
   (`/predict`, or `/predict/batch` with one multipart part per image);
2. `mlflow models serve` (MLflow's ONNX flavour, `--env-manager local`): MLflow cannot take image
   bytes, so its client sends the preprocessed float32 tensors as JSON, `{"inputs": [...]}` of
   shape (n, 3, size, size), at `/invocations`. The preprocessing and the JSON encoding are done
   before the clock starts, so they are not counted against MLflow;
3. the ceiling: `mlops.inference.OnnxClassifier` on the downloaded ONNX file in this process,
   decoding + `image_to_array` + `logits` on one image per call, then on `--batch` images.

Both servers get the same two loads: single-image requests, then requests of `--batch` images,
each from `--concurrency` client threads with one `httpx.Client` each, for `--seconds` after a
one-second warm-up. Request bodies are built before the clock starts. Client and server share
the machine's cores, so the CPU used by the client, the server and everything else is printed
with the results (in cores: CPU seconds per wall second).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from mlops.data.layout import dataset_dir

MODEL = "digits"
ALIAS = "candidate"
WARMUP_SECONDS = 1.0
READY_TIMEOUT_S = 120.0


# -- set-up --------------------------------------------------------------------------------


def build_model(workspace: Path) -> str:
    """Run the build flow into `workspace`; returns the tracking URI of its registry."""
    from flows.build import build

    state = build(
        env="test",
        overrides=[f"paths.workspace={workspace}", "train.progress_bar=false", "train.max_epochs=1"],
        return_state=True,
    )
    if not state.is_completed():
        raise SystemExit(f"build failed: {state.message}")
    return f"sqlite:///{workspace}/mlflow.db"


def download_onnx(tracking_uri: str, dest: Path) -> Path:
    from mlflow import MlflowClient

    from mlops.registry import download_model

    client = MlflowClient(tracking_uri, tracking_uri)
    return download_model(client, client.get_model_version_by_alias(MODEL, ALIAS).run_id, dest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a server in its own process group (so `stop_server` also reaches its children)."""
    log = log_path.open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with status {process.returncode}:\n{tail(log_path)}")
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 10 s."""
    if process.poll() is not None:
        print(f"warning: server pid {process.pid} exited early, status {process.returncode}", file=sys.stderr)
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- requests: (path, body, headers, images) -------------------------------------------------


def groups(items: list, size: int, count: int) -> list[list]:
    """`count` lists of `size` items, taken in turn from `items` (repeating it as needed)."""
    return [[items[(i * size + j) % len(items)] for j in range(size)] for i in range(count)]


def our_single(pngs: list[bytes]) -> list[tuple]:
    return [("/predict", png, {"content-type": "image/png"}, 1) for png in pngs]


def our_batch(pngs: list[bytes], size: int) -> list[tuple]:
    requests = []
    for group in groups(pngs, size, count=10):
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(group)]
        request = httpx.Request("POST", "http://127.0.0.1/predict/batch", files=files)
        requests.append(("/predict/batch", request.read(), {"content-type": request.headers["content-type"]}, size))
    return requests


def mlflow_body(arrays: list[np.ndarray]) -> bytes:
    return json.dumps({"inputs": np.stack(arrays).tolist()}).encode()


def mlflow_single(arrays: list[np.ndarray]) -> list[tuple]:
    return [("/invocations", mlflow_body([array]), {"content-type": "application/json"}, 1) for array in arrays]


def mlflow_batch(arrays: list[np.ndarray], size: int) -> list[tuple]:
    return [
        ("/invocations", mlflow_body(group), {"content-type": "application/json"}, size)
        for group in groups(arrays, size, count=10)
    ]


def check_agreement(our_url: str, mlflow_url: str, ours: tuple, theirs: tuple, model, arrays: list) -> str:
    """The three targets must serve the same model: compare their classes on one batch."""
    classes = model.spec.classes
    path, body, headers, _ = ours
    response = httpx.post(our_url + path, content=body, headers=headers, timeout=60, trust_env=False)
    response.raise_for_status()
    our_classes = [result["prediction"] for result in response.json()["results"]]
    path, body, headers, _ = theirs
    response = httpx.post(mlflow_url + path, content=body, headers=headers, timeout=60, trust_env=False)
    response.raise_for_status()
    logits = np.asarray(response.json()["predictions"]["logits"])
    mlflow_classes = [classes[i] for i in logits.argmax(axis=1)]
    local_classes = [classes[i] for i in model.logits(np.stack(arrays)).argmax(axis=1)]
    if not our_classes == mlflow_classes == local_classes:
        raise SystemExit(
            f"the targets disagree:\n ours   {our_classes}\n mlflow {mlflow_classes}\n local  {local_classes}"
        )
    return f"all three targets predict the same classes for the first {len(arrays)} test images"


# -- measuring -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its children."""
    process = psutil.Process(pid)
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def snapshot(server_pid: int | None) -> dict[str, float]:
    """The wall clock, and the CPU seconds used so far by this process, the server and the machine."""
    machine = psutil.cpu_times()
    return {
        "wall": time.perf_counter(),
        "bench": time.process_time(),
        "server": cpu_seconds(server_pid) if server_pid else 0.0,
        "machine": machine.user + machine.nice + machine.system + machine.irq + machine.softirq,
    }


def summary(latencies: list[float], images: int, before: dict, after: dict, body_bytes: float | None) -> dict:
    wall = after["wall"] - before["wall"]
    cores = {key: (after[key] - before[key]) / wall for key in ("bench", "server", "machine")}
    p50, p95 = np.percentile(latencies, [50, 95]) * 1000.0
    return {
        "images_per_s": images / wall,
        "p50_ms": p50,
        "p95_ms": p95,
        "requests": len(latencies),
        "body_kb": None if body_bytes is None else body_bytes / 1000.0,
        "bench_cores": cores["bench"],
        "server_cores": None if body_bytes is None else cores["server"],
        "other_cores": cores["machine"] - cores["bench"] - cores["server"],
    }


def http_load(url: str, server_pid: int, requests: list[tuple], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads, one httpx.Client each, post `requests` in turn for `seconds` after a warm-up."""
    before = {}
    barrier = threading.Barrier(concurrency, action=lambda: before.update(snapshot(server_pid)))
    results = [None] * concurrency

    def client_thread(index: int) -> None:
        latencies, images, i = [], 0, index
        try:
            with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
                warmup_end = time.perf_counter() + WARMUP_SECONDS
                while time.perf_counter() < warmup_end:
                    path, body, headers, _ = requests[i % len(requests)]
                    client.post(path, content=body, headers=headers).raise_for_status()
                    i += 1
                barrier.wait()  # the last thread to arrive takes the `before` snapshot
                deadline = before["wall"] + seconds
                while time.perf_counter() < deadline:
                    path, body, headers, n = requests[i % len(requests)]
                    sent = time.perf_counter()
                    response = client.post(path, content=body, headers=headers)
                    latencies.append(time.perf_counter() - sent)
                    response.raise_for_status()
                    images += n
                    i += 1
        except BaseException:
            barrier.abort()  # the other threads stop waiting for this one
            raise
        results[index] = (latencies, images)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = snapshot(server_pid)
    if any(result is None for result in results):
        raise SystemExit(f"{url}: a client thread failed (see its traceback above)")
    latencies = [latency for thread_latencies, _ in results for latency in thread_latencies]
    images = sum(thread_images for _, thread_images in results)
    body_bytes = float(np.mean([len(body) for _, body, _, _ in requests]))
    return summary(latencies, images, before, after, body_bytes)


def in_process_load(model, pngs: list[bytes], size: int, seconds: float) -> dict:
    """Decode, `image_to_array` and `logits` on `size` images per call, in this thread, for `seconds`."""
    from mlops.serve.inference import image_to_array

    batches = groups(pngs, size, count=10)

    def call(batch: list[bytes]) -> None:
        model.logits(np.stack([image_to_array(Image.open(io.BytesIO(png)), model.spec) for png in batch]))

    warmup_end = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < warmup_end:
        call(batches[0])
    latencies, images, i = [], 0, 0
    before = snapshot(None)
    while time.perf_counter() < before["wall"] + seconds:
        sent = time.perf_counter()
        call(batches[i % len(batches)])
        latencies.append(time.perf_counter() - sent)
        images += size
        i += 1
    return summary(latencies, images, before, snapshot(None), None)


# -- report --------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, dict]], ours: dict[str, dict], ceiling: dict[str, dict]) -> str:
    lines = [
        "| target | load | images/s | p50 ms | p95 ms | x ours | x ceiling | requests | KB/request"
        " | bench CPU | server CPU | other CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, load, r in rows:
        body = "-" if r["body_kb"] is None else f"{r['body_kb']:.1f}"
        server = "-" if r["server_cores"] is None else f"{r['server_cores']:.2f}"
        lines.append(
            f"| {target} | {load} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f}"
            f" | {r['images_per_s'] / ours[load]['images_per_s']:.2f}"
            f" | {r['images_per_s'] / ceiling[load]['images_per_s']:.2f}"
            f" | {r['requests']} | {body} | {r['bench_cores']:.2f} | {server} | {r['other_cores']:.2f} |"
        )
    return "\n".join(lines)


def notes(args: argparse.Namespace, agreement: str, input_size: int) -> str:
    return "\n".join([
        f"- {agreement}.",
        "- load: `single` = one image per request (HTTP, from the client threads) or per call (in-process);"
        f" `batch {args.batch}` = {args.batch} images per request or call. Latency is per request or call.",
        "- x ours: images/s over our server's on the same load; x ceiling: over in-process ONNX Runtime"
        " with the same images per call.",
        "- our server receives PNG bytes and decodes, resizes and normalises them itself; MLflow cannot take"
        " image bytes, so its client sends preprocessed float32 tensors as JSON (`{\"inputs\": [...]}`, shape"
        f" (n, 3, {input_size}, {input_size})), built before the clock started: that client-side"
        " preprocessing and JSON encoding are not counted.",
        "- KB/request: mean request body.",
        f"- bench / server / other CPU: cores used (CPU seconds per wall second; {os.cpu_count()} cores in all)"
        " by this process (the client threads, or ONNX Runtime for the ceiling), by the server's processes"
        " and by everything else on the machine. Client and server share the cores, so bench CPU is capacity"
        " the server did not get; other CPU is load from outside the benchmark, which lowers every figure.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="client threads per HTTP load")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per load (at most 15)")
    parser.add_argument("--batch", type=int, default=32, help="images per batched request or call")
    args = parser.parse_args()
    if not 0 < args.seconds <= 15:
        parser.error("--seconds must be in (0, 15]")
    if not 1 <= args.batch <= 64:
        parser.error("--batch must be in [1, 64] (the server's default --max-batch-images is 64)")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from mlops.serve.inference import OnnxClassifier, image_to_array

    workspace = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    print(f"workspace {workspace}: building the model ...", flush=True)
    tracking_uri = build_model(workspace)
    model = OnnxClassifier(download_onnx(tracking_uri, workspace / "bench-model"))
    paths = sorted((dataset_dir(workspace / "dvc", "digits") / "test").glob("*/*.png"))
    pngs = [path.read_bytes() for path in paths]
    arrays = [image_to_array(Image.open(io.BytesIO(png)), model.spec) for png in pngs]
    loads = {
        "single": (our_single(pngs), mlflow_single(arrays)),
        f"batch {args.batch}": (our_batch(pngs, args.batch), mlflow_batch(arrays, args.batch)),
    }

    # `mlflow models serve --env-manager local` runs `bash -c "exec uvicorn ..."`, looked up on PATH:
    # without an activated virtual environment there is none there (exit status 127), so put this
    # interpreter's bin directory first, as activating the environment would.
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    our_port, mlflow_port = free_port(), free_port()
    our_url, mlflow_url = f"http://127.0.0.1:{our_port}", f"http://127.0.0.1:{mlflow_port}"
    our_command = [
        sys.executable, "-m", "mlops.serve", "--tracking-uri", tracking_uri, "--model", MODEL, "--alias", ALIAS,
        "--host", "127.0.0.1", "--port", str(our_port), "--cache-dir", str(workspace / "serving-cache"),
    ]
    mlflow_command = [
        str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@{ALIAS}", "--env-manager", "local",
        "--host", "127.0.0.1", "-p", str(mlflow_port),
    ]

    servers = []
    try:
        print("starting both servers ...", flush=True)
        servers.append(start_server(our_command, env, workspace / "our-server.log"))
        servers.append(start_server(mlflow_command, env, workspace / "mlflow-server.log"))
        wait_ready(servers[0], our_url + "/ready", workspace / "our-server.log")
        wait_ready(servers[1], mlflow_url + "/ping", workspace / "mlflow-server.log")
        our_requests, mlflow_requests = loads[f"batch {args.batch}"]
        first = groups(arrays, args.batch, count=1)[0]
        agreement = check_agreement(our_url, mlflow_url, our_requests[0], mlflow_requests[0], model, first)

        rows, ours, ceiling = [], {}, {}
        for load, (our_requests, mlflow_requests) in loads.items():
            print(f"load '{load}': our server ...", flush=True)
            ours[load] = http_load(our_url, servers[0].pid, our_requests, args.concurrency, args.seconds)
            print(f"load '{load}': mlflow models serve ...", flush=True)
            theirs = http_load(mlflow_url, servers[1].pid, mlflow_requests, args.concurrency, args.seconds)
            print(f"load '{load}': in-process ONNX Runtime ...", flush=True)
            size = 1 if load == "single" else args.batch
            ceiling[load] = in_process_load(model, pngs, size, args.seconds)
            rows += [
                ("ours: mlops.serve (PNG bytes)", load, ours[load]),
                ("mlflow models serve (preprocessed tensor JSON)", load, theirs),
                (f"ceiling: in-process ONNX Runtime, batch {size}", load, ceiling[load]),
            ]
    finally:
        for server in servers:
            stop_server(server)

    import mlflow
    import onnxruntime

    print(
        f"\nmodel {MODEL}@{ALIAS} ({len(model.spec.classes)} classes, input {model.spec.input_size} px),"
        f" {len(pngs)} test PNGs; {os.cpu_count()} CPU cores; mlflow {mlflow.__version__},"
        f" onnxruntime {onnxruntime.__version__}; {args.concurrency} client threads, {args.seconds:g} s per load\n"
    )
    print(table(rows, ours, ceiling))
    print()
    print(notes(args, agreement, model.spec.input_size))
    shutil.rmtree(workspace)  # kept, with the servers' logs, when anything above failed


if __name__ == "__main__":
    main()
