from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # tests talk to 127.0.0.1 only:
os.environ.setdefault("DO_NOT_TRACK", "1")  # no telemetry from Prefect's servers or its SDK


@pytest.fixture(scope="session")
def prefect_api():
    """One ephemeral Prefect API (its own sqlite database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def built(tmp_path_factory, prefect_api):
    """One real build on the embedded data (env=test) for the whole test run: (workspace, result).

    Tests that change what is stored work on a copy (`copy_built`), never on this workspace.
    """
    from flows.build import build

    workspace = tmp_path_factory.mktemp("built")
    state = build(env="test", overrides=[f"paths.workspace={workspace}", "train.progress_bar=false"], return_state=True)
    assert state.is_completed(), state.message
    return workspace, state.result()


def copy_built(built, dest: Path) -> Path:
    """A workspace holding the shared build: its MLflow database, DVC project and runs.

    The copy's MLflow artifact root and DVC remote stay the original's (absolute paths in the
    stores); both are keyed by run id or content hash, so copies never overwrite each other.
    """
    import shutil

    shutil.copytree(built[0], dest, symlinks=True)
    return dest


def write_image(path: Path, size: tuple[int, int] = (16, 16), mode: str = "RGB", seed: int = 0) -> Path:
    """A small random image of `mode`, saved with the format its suffix names."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "CMYK": 4, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Two classes of 12 valid RGB JPEGs each."""
    root = tmp_path / "images"
    for label in ("cat", "dog"):
        for index in range(12):
            write_image(root / label / f"{index:02d}.jpg", seed=index + (100 if label == "dog" else 0))
    return root


def tiny_classifier():
    """A small untrained CNN, deterministic, for tests that need a model but not a good one."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The tiny CNN exported with a spec of three classes at 16 px."""
    from mlops.serve.inference import ModelSpec
    from mlops.train.packaging import export_onnx

    spec = ModelSpec(("cat", "dog", "fox"), 16, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    return export_onnx(tiny_classifier(), spec, tmp_path_factory.mktemp("tiny") / "tiny.onnx", opset=18)


class LiveApp:
    """An ASGI app served by uvicorn on a free port of 127.0.0.1 in a thread: `with LiveApp(app) as url:`.

    With `settings` (a ServeConfig), uvicorn is configured as `python -m mlops.serve` configures
    it (timeouts, connection cap, TLS; `http`: its protocol implementation); `verify` is what
    the readiness check passes to httpx for an https server.
    """

    def __init__(self, app, timeout_s: float = 20.0, settings=None, http: str = "httptools", verify=True):
        import threading

        import uvicorn

        from mlops.serve.server import bind, uvicorn_config

        self.timeout_s, self.verify = timeout_s, verify
        self.sock = bind("127.0.0.1", 0, reuse_port=False)
        if settings is None:
            config = uvicorn.Config(app, log_level="warning", lifespan="on")
        else:
            config = uvicorn_config(app, settings, http)
        self.url = f"{'https' if config.is_ssl else 'http'}://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1, verify=self.verify).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.__exit__()
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.05)

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def register_tiny(onnx_path: Path, workspace: Path, name: str = "digits") -> tuple[str, str]:
    """`onnx_path` logged and registered as the build flow does (checksum included) as a new
    version of `name` in the sqlite MLflow store under `workspace`: (tracking URI, version)."""
    from mlops.config import MlflowConfig
    from mlops.registry import Registry
    from mlops.serve.inference import OnnxClassifier

    workspace.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{workspace}/mlflow.db"
    registry = Registry(MlflowConfig(
        tracking_uri=uri, experiment=name, monitor_experiment=f"{name}-monitor", registered_model=name,
        candidate_alias="candidate", approved_alias="approved", production_alias="production", previous_alias="previous",
    ))
    model = OnnxClassifier(onnx_path)
    example = np.zeros((1, 3, model.spec.input_size, model.spec.input_size), np.float32)
    with registry.run("tiny", {}) as run_id:
        registry.log_onnx_model(run_id, onnx_path, example, model.logits(example))
    ref, _ = registry.register(run_id, {}, "a tiny test model")
    return uri, ref.version


def self_signed(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (an IP address) and its key, PEM files: (cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_path, key_path


class Receiver:
    """A real HTTP server on 127.0.0.1 that keeps every POSTed JSON body (webhook and Slack stand-in)."""

    def __init__(self):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session", autouse=True)
def no_stray_servers(tmp_path_factory):
    """Whatever a failing test left running: model servers started under this session's tmp dir."""
    yield
    import psutil

    from mlops.deploy.processes import stop_server

    base = str(tmp_path_factory.getbasetemp())
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "mlops.serve" in command and base in command:
            stop_server(process.info["pid"])
