"""Serving throughput and latency: our model server, `mlflow models serve` and in-process ONNX Runtime.

    python bench/serving.py [--concurrency 8] [--seconds 10] [--batch 32] [--models 32,128,224,m128,m224]
                            [--steps 32,m128]

One run builds each model (the build flow, env=test, 1 epoch, in one temporary workspace) and
serves each registered version three ways. The models (`--models` picks some):

- `32`: ResNet-18 at 32 px, fed the digits' test PNGs as they are (small images);
- `128`, `224`: ResNet-18 at 128 and 224 px, and `m128`, `m224`: MobileNetV3 (small) at 128 and
  224 px, fed what a camera sends: the digits' test images as 640x480 JPEGs (quality 90).

The three ways:

1. our server, `python -m mlops.serve`: the client posts the image bytes
   (`/predict`, or `/predict/batch` with one multipart part per image);
2. `mlflow models serve` (MLflow's ONNX flavour, `--env-manager local`): MLflow cannot take image
   bytes, so its client sends the preprocessed float32 tensors as JSON, `{"inputs": [...]}` of
   shape (n, 3, size, size), at `/invocations`. The preprocessing and the JSON encoding are done
   before the clock starts, so they are not counted against MLflow;
3. the ceiling: `mlops.inference.OnnxClassifier` on the downloaded ONNX file in this process,
   decoding + `image_to_array` + `logits` on one image per call, then on `--batch` images.

`--steps 32,m128` also serves those models with one change each from our server's defaults (the
directions issue 16 asked to measure, one row each), after a row for the client's own limit (a
no-op ASGI server that reads the body and answers): request records on (what production runs),
the decode in a worker thread (`serve.inline_decode_kb: 0`), spinning ONNX Runtime threads
(`serve.onnx_spinning: true`, ONNX Runtime's own default), one ONNX Runtime thread, and two
server processes on the port (`serve.workers: 2`) with one ONNX Runtime thread each.

Both servers get the same two loads: single-image requests, then requests of `--batch` images,
each from `--concurrency` client threads with one `httpx.Client` each, for `--seconds` after a
one-second warm-up. Request bodies are built before the clock starts. Client and server share
the machine's cores, so the CPU used by the client, the server and everything else is printed
with the results (in cores: CPU seconds per wall second).
"""

from __future__ import annotations

import offline  # noqa: F401  bench/offline.py: before anything imports Prefect

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
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from mlops.data.layout import dataset_dir

MODEL = "digits"
WARMUP_SECONDS = 1.0
READY_TIMEOUT_S = 120.0
CAMERA = (640, 480)  # what the 128 and 224 px models are fed, as JPEG
MODELS = {  # --models key: (torchvision model, input px, what the clients send)
    "32": ("resnet18", 32, "png"),
    "128": ("resnet18", 128, "jpeg"),
    "224": ("resnet18", 224, "jpeg"),
    "m128": ("mobilenet_v3_small", 128, "jpeg"),
    "m224": ("mobilenet_v3_small", 224, "jpeg"),
}
STEPS = {  # our server again with one change: row label, `serve` settings changed (None: no-op server), records on
    "noop": ("the client's limit: a no-op ASGI server (uvicorn) that reads the body", None, False),
    "records": ("ours + request records (as in production)", {}, True),
    "thread": ("ours, decode in a thread (inline_decode_kb 0)", {"inline_decode_kb": 0}, False),
    "spin": ("ours, ONNX Runtime threads spinning (onnx_spinning true)", {"onnx_spinning": True}, False),
    "ort1": ("ours, 1 ONNX Runtime thread (onnx_threads 1)", {"onnx_threads": 1}, False),
    "workers": ("ours, 2 processes (workers 2, onnx_threads 1)", {"workers": 2, "onnx_threads": 1}, False),
}
NOOP_SERVER = """
import sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] == "http":
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ready": true, "pid": %d}' % __import__("os").getpid()})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


# -- set-up --------------------------------------------------------------------------------


def build_model(workspace: Path, name: str, size: int) -> str:
    """Run the build flow into `workspace`; returns the version it registered."""
    from flows.build import build

    state = build(
        env="test",
        overrides=[f"paths.workspace={workspace}", "train.progress_bar=false", "train.max_epochs=1",
                   f"model={name}", f"data.input_size={size}", "force=true",
                   # one epoch serves as well as ten: the gate must not stop a model built to be timed
                   "gate.min_accuracy=0", "gate.min_class_recall=0", "gate.max_recall_gap=1"],
        return_state=True,
    )
    if not state.is_completed():
        raise SystemExit(f"build failed: {state.message}")
    return state.result().version


def download_onnx(tracking_uri: str, version: str, dest: Path) -> Path:
    from mlflow import MlflowClient

    from mlops.registry import download_model

    client = MlflowClient(tracking_uri, tracking_uri)
    return download_model(client, client.get_model_version(MODEL, version).run_id, dest)


def camera_jpeg(png: bytes) -> bytes:
    """A digit as a camera would send it: 640x480 RGB, JPEG quality 90."""
    image = Image.open(io.BytesIO(png)).convert("RGB").resize(CAMERA, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


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


@contextmanager
def step_servers(step: str, command: list[str], env: dict[str, str], folder: Path):
    """Our server with `step`'s change (STEPS), on a port of its own: (url, pids) until the block ends."""
    from mlops.config import RecordsConfig
    from mlops.config.serve import default_serve_config

    _, changes, records = STEPS[step]
    port = free_port()
    if changes is None:
        command = [sys.executable, "-c", NOOP_SERVER, str(port)]
    else:
        settings = default_serve_config().model_copy(update=changes)
        command = [*command, "--port", str(port), "--settings", settings.model_dump_json()]
    if records:
        command += ["--records", RecordsConfig(dir=folder / "records", max_mb=512, max_age_days=1).model_dump_json()]
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "server.log"
    server = start_server(command, env, log)
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/ready", log)
        yield f"http://127.0.0.1:{port}", [server.pid]  # its workers are its children: counted with it
    finally:
        stop_server(server)


def groups(items: list, size: int, count: int) -> list[list]:
    """`count` lists of `size` items, taken in turn from `items` (repeating it as needed)."""
    return [[items[(i * size + j) % len(items)] for j in range(size)] for i in range(count)]


def our_single(images: list[bytes], kind: str) -> list[tuple]:
    return [("/predict", image, {"content-type": f"image/{kind}"}, 1) for image in images]


def our_batch(images: list[bytes], size: int, kind: str) -> list[tuple]:
    requests = []
    for group in groups(images, size, count=10):
        files = [("files", (f"{i}.{kind}", image, f"image/{kind}")) for i, image in enumerate(group)]
        request = httpx.Request("POST", "http://127.0.0.1/predict/batch", files=files)
        requests.append(("/predict/batch", request.read(), {"content-type": request.headers["content-type"]}, size))
    return requests


def mlflow_body(arrays: list[np.ndarray]) -> bytes:
    return json.dumps({"inputs": np.stack(arrays).tolist()}).encode()


def mlflow_single(arrays: list[np.ndarray]) -> list[tuple]:
    return [("/invocations", mlflow_body([array]), {"content-type": "application/json"}, 1) for array in arrays]


def mlflow_batch(arrays: list[np.ndarray], size: int) -> list[tuple]:
    count = 10 if arrays[0].shape[-1] <= 64 else 2  # a batch of 32 at 224 px is ~100 MB of JSON
    return [
        ("/invocations", mlflow_body(group), {"content-type": "application/json"}, size)
        for group in groups(arrays, size, count=count)
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


def snapshot(server_pids: list[int]) -> dict[str, float]:
    """The wall clock, and the CPU seconds used so far by this process, the server and the machine."""
    machine = psutil.cpu_times()
    return {
        "wall": time.perf_counter(),
        "bench": time.process_time(),
        "server": sum(cpu_seconds(pid) for pid in server_pids),
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


def http_load(url: str, server_pids: list[int], requests: list[tuple], concurrency: int, seconds: float) -> dict:
    """`concurrency` threads, one httpx.Client each, post `requests` in turn for `seconds` after a warm-up."""
    before = {}
    barrier = threading.Barrier(concurrency, action=lambda: before.update(snapshot(server_pids)))
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
    after = snapshot(server_pids)
    if any(result is None for result in results):
        raise SystemExit(f"{url}: a client thread failed (see its traceback above)")
    latencies = [latency for thread_latencies, _ in results for latency in thread_latencies]
    images = sum(thread_images for _, thread_images in results)
    body_bytes = float(np.mean([len(body) for _, body, _, _ in requests]))
    return summary(latencies, images, before, after, body_bytes)


def to_array(data: bytes, spec) -> np.ndarray:
    """Decode as the server does (a JPEG at a reduced scale in the DCT domain), then `image_to_array`."""
    from mlops.serve.inference import image_to_array

    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (spec.input_size, spec.input_size))
    return image_to_array(image, spec)


def in_process_load(model, images: list[bytes], size: int, seconds: float) -> dict:
    """Decode, `image_to_array` and `logits` on `size` images per call, in this thread, for `seconds`."""
    batches = groups(images, size, count=10)

    def call(batch: list[bytes]) -> None:
        model.logits(np.stack([to_array(data, model.spec) for data in batch]))

    warmup_end = time.perf_counter() + WARMUP_SECONDS
    while time.perf_counter() < warmup_end:
        call(batches[0])
    latencies, images, i = [], 0, 0
    before = snapshot([])
    while time.perf_counter() < before["wall"] + seconds:
        sent = time.perf_counter()
        call(batches[i % len(batches)])
        latencies.append(time.perf_counter() - sent)
        images += size
        i += 1
    return summary(latencies, images, before, snapshot([]), None)


# -- report --------------------------------------------------------------------------------


def table(rows: list[tuple[str, str, str, dict]], ours: dict[tuple, dict], ceiling: dict[tuple, dict]) -> str:
    lines = [
        "| model | target | load | images/s | p50 ms | p95 ms | x ours | x ceiling | requests | KB/request"
        " | bench CPU | server CPU | other CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, target, load, r in rows:
        body = "-" if r["body_kb"] is None else f"{r['body_kb']:.1f}"
        server = "-" if r["server_cores"] is None else f"{r['server_cores']:.2f}"
        lines.append(
            f"| {model} | {target} | {load} | {r['images_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f}"
            f" | {r['images_per_s'] / ours[model, load]['images_per_s']:.2f}"
            f" | {r['images_per_s'] / ceiling[model, load]['images_per_s']:.2f}"
            f" | {r['requests']} | {body} | {r['bench_cores']:.2f} | {server} | {r['other_cores']:.2f} |"
        )
    return "\n".join(lines)


def goals(batch: int, ours: dict[tuple, dict], theirs: dict[tuple, dict], ceiling: dict[tuple, dict]) -> str:
    """Issue 16's goals per model: ratios to the in-process ceiling and to `mlflow models serve`."""
    lines = ["| model | single x ceiling | batch x ceiling | x mlflow (single) | p95 / mlflow p95 (single) |",
             "|---|---:|---:|---:|---:|"]
    for model in dict.fromkeys(m for m, _ in ours):
        single, batched = (model, "single"), (model, f"batch {batch}")
        lines.append(
            f"| {model} | {ours[single]['images_per_s'] / ceiling[single]['images_per_s']:.2f}"
            f" | {ours[batched]['images_per_s'] / ceiling[batched]['images_per_s']:.2f}"
            f" | {ours[single]['images_per_s'] / theirs[single]['images_per_s']:.2f}"
            f" | {ours[single]['p95_ms'] / theirs[single]['p95_ms']:.2f} |")
    return "\n".join(lines + ["", "Goals: 32 px single >= 0.6 and batch >= 0.7 x ceiling; 128 and 224 px batch"
                               " >= 0.85 x ceiling; >= 3 x mlflow and p95 <= 1/3 of its p95."])


def notes(args: argparse.Namespace, agreements: list[str]) -> str:
    return "\n".join([
        *(f"- {agreement}." for agreement in agreements),
        "- load: `single` = one image per request (HTTP, from the client threads) or per call (in-process);"
        f" `batch {args.batch}` = {args.batch} images per request or call. Latency is per request or call.",
        "- x ours: images/s over our server's on the same load; x ceiling: over in-process ONNX Runtime"
        " with the same images per call.",
        "- our server receives the image bytes (PNG at 32 px, 640x480 JPEG otherwise) and decodes, resizes and"
        " normalises them itself; MLflow cannot take image bytes, so its client sends preprocessed float32"
        " tensors as JSON (`{\"inputs\": [...]}`, shape (n, 3, px, px)), built before the clock started:"
        " that client-side preprocessing and JSON encoding are not counted.",
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
    parser.add_argument("--models", default=",".join(MODELS), help=f"which models, of {', '.join(MODELS)}")
    parser.add_argument("--steps", default="", help="models (of --models) also served with each step's change")
    args = parser.parse_args()
    if not 0 < args.seconds <= 15:
        parser.error("--seconds must be in (0, 15]")
    if not 1 <= args.batch <= 64:
        parser.error("--batch must be in [1, 64] (the server's default --max-batch-images is 64)")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    logging.getLogger("prefect").setLevel(logging.WARNING)

    from mlops.serve.inference import OnnxClassifier

    chosen = [key.strip() for key in args.models.split(",") if key.strip()]
    unknown = [key for key in chosen if key not in MODELS]
    if unknown or not chosen:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    steps = [key.strip() for key in args.steps.split(",") if key.strip()]
    if set(steps) - set(chosen):
        parser.error(f"--steps: {sorted(set(steps) - set(chosen))} not among --models {', '.join(chosen)}")
    workspace = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    tracking_uri = f"sqlite:///{workspace}/mlflow.db"
    # `mlflow models serve --env-manager local` runs `bash -c "exec uvicorn ..."`, looked up on PATH:
    # without an activated virtual environment there is none there (exit status 127), so put this
    # interpreter's bin directory first, as activating the environment would.
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    rows, ours, theirs, ceiling, agreements, described = [], {}, {}, {}, [], []
    for key in chosen:
        name, px, kind = MODELS[key]
        label = f"{name} {px} px"
        print(f"workspace {workspace}: building {label} ...", flush=True)
        version = build_model(workspace, name, px)
        model = OnnxClassifier(download_onnx(tracking_uri, version, workspace / f"bench-model-{key}"))
        paths = sorted((dataset_dir(workspace / "dvc", "digits") / "test").glob("*/*.png"))
        images = [path.read_bytes() for path in paths]
        if kind == "jpeg":
            images = [camera_jpeg(png) for png in images]
        arrays = [to_array(data, model.spec) for data in images]
        loads = {
            "single": (our_single(images, kind), mlflow_single(arrays)),
            f"batch {args.batch}": (our_batch(images, args.batch, kind), mlflow_batch(arrays, args.batch)),
        }
        described.append(f"{label}: version {version}, {len(images)} test images as {kind.upper()}"
                         f" ({np.mean([len(i) for i in images]) / 1000:.1f} KB each)")
        our_port, mlflow_port = free_port(), free_port()
        our_url, mlflow_url = f"http://127.0.0.1:{our_port}", f"http://127.0.0.1:{mlflow_port}"
        our_command = [
            sys.executable, "-m", "mlops.serve", "--tracking-uri", tracking_uri, "--model", MODEL, "--version", version,
            "--host", "127.0.0.1", "--port", str(our_port), "--cache-dir", str(workspace / "serving-cache"),
        ]
        mlflow_command = [
            str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}/{version}", "--env-manager", "local",
            "--host", "127.0.0.1", "-p", str(mlflow_port),
        ]
        servers = []
        try:
            print("starting both servers ...", flush=True)
            servers.append(start_server(our_command, env, workspace / f"our-server-{key}.log"))
            servers.append(start_server(mlflow_command, env, workspace / f"mlflow-server-{key}.log"))
            wait_ready(servers[0], our_url + "/ready", workspace / f"our-server-{key}.log")
            wait_ready(servers[1], mlflow_url + "/ping", workspace / f"mlflow-server-{key}.log")
            our_requests, mlflow_requests = loads[f"batch {args.batch}"]
            first = groups(arrays, args.batch, count=1)[0]
            agreement = check_agreement(our_url, mlflow_url, our_requests[0], mlflow_requests[0], model, first)
            agreements.append(f"{label}: {agreement}")
            for load, (our_requests, mlflow_requests) in loads.items():
                at = (label, load)
                print(f"{label}, load '{load}': our server ...", flush=True)
                ours[at] = http_load(our_url, [servers[0].pid], our_requests, args.concurrency, args.seconds)
                print(f"{label}, load '{load}': mlflow models serve ...", flush=True)
                theirs[at] = http_load(mlflow_url, [servers[1].pid], mlflow_requests, args.concurrency, args.seconds)
                print(f"{label}, load '{load}': in-process ONNX Runtime ...", flush=True)
                size = 1 if load == "single" else args.batch
                ceiling[at] = in_process_load(model, images, size, args.seconds)
                rows += [
                    (label, f"ours: mlops.serve ({kind.upper()} bytes)", load, ours[at]),
                    (label, "mlflow models serve (preprocessed tensor JSON)", load, theirs[at]),
                    (label, f"ceiling: in-process ONNX Runtime, batch {size}", load, ceiling[at]),
                ]
        finally:
            for server in servers:
                stop_server(server)
        if key in steps:
            for step in STEPS:
                target = STEPS[step][0]
                print(f"{label}: {target} ...", flush=True)
                with step_servers(step, our_command, env, workspace / f"{key}-{step}") as (url, pids):
                    for load, (our_requests, _) in loads.items():
                        result = http_load(url, pids, our_requests, args.concurrency, args.seconds)
                        rows.append((label, target, load, result))

    import mlflow
    import onnxruntime

    print(
        f"\n{'; '.join(described)}; {os.cpu_count()} CPU cores; mlflow {mlflow.__version__},"
        f" onnxruntime {onnxruntime.__version__}; {args.concurrency} client threads, {args.seconds:g} s per load\n"
    )
    print(table(rows, ours, ceiling))
    print()
    print(goals(args.batch, ours, theirs, ceiling))
    print()
    print(notes(args, agreements))
    shutil.rmtree(workspace)  # kept, with the servers' logs, when anything above failed


if __name__ == "__main__":
    main()
