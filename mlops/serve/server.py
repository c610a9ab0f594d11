"""The model server process: load one registered version, bind its sockets, run uvicorn.

    python -m mlops.serve --tracking-uri sqlite:///workspace/mlflow.db \\
        --model image-classifier --alias candidate [--port 8000]

Limits and batching come from `--settings` (the `serve` section as JSON, which the deploy flow
passes) or else from `conf/serve/default.yaml`; `--host`/`--port` override them.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from mlops.config import RecordsConfig, ServeConfig, secret
from mlops.config.serve import default_serve_config
from mlops.registry import download_model
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier
from mlops.serve.records import RecordWriter

log = logging.getLogger(__name__)


def load_served(tracking_uri: str, name: str, alias: str | None, version: str | None, cache: Path) -> ServedModel:
    """Download the ONNX file of a registered version (by alias or number) and open it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    path = download_model(client, found.run_id, cache / f"{name}-v{found.version}")
    return ServedModel(name, str(found.version), OnnxClassifier(path))


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # blue-green: old and new server share the port while traffic moves over
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mlops.serve", description="Serve a registered ONNX model.")
    parser.add_argument("--tracking-uri", required=True, help="MLflow tracking/registry URI")
    parser.add_argument("--model", required=True, help="registered model name")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--alias", help="serve the version this alias points at")
    which.add_argument("--version", help="serve this version number")
    parser.add_argument("--settings", help="the serve section as JSON (default: conf/serve/default.yaml)")
    parser.add_argument("--records", help="record requests and feedback: the records section as JSON")
    parser.add_argument("--host", help="override the settings' host")
    parser.add_argument("--port", type=int, help="override the settings' port")
    parser.add_argument("--admin-port", type=int, help="also listen here, alone (deploy checks a new server on it)")
    parser.add_argument("--reuse-port", action="store_true", help="share --port with the server being replaced")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "mlops-serving")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> tuple[ServeConfig, RecordsConfig | None]:
    try:
        settings = ServeConfig.model_validate_json(args.settings) if args.settings else default_serve_config()
        records = RecordsConfig.model_validate_json(args.records) if args.records else None
    except ValidationError as error:
        sys.exit(f"error: --settings/--records: {error}")
    overrides = {key: value for key, value in (("host", args.host), ("port", args.port)) if value is not None}
    return settings.model_copy(update=overrides), records


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, records_config = settings_from(args)
    try:
        token = secret(settings.token_env)
    except ValueError:
        sys.exit(f"error: serve.token_env {settings.token_env}: the variable is not set or empty")
    try:
        served = load_served(args.tracking_uri, args.model, args.alias, args.version, args.cache_dir)
    except Exception as error:  # noqa: BLE001 - report why the model cannot be served, then exit
        sys.exit(f"error: cannot load {args.model} ({args.alias or args.version}): {type(error).__name__}: {error}")
    records = None
    if records_config is not None:
        records = RecordWriter(records_config.dir, records_config.max_mb, records_config.max_age_days)
    app = create_app(served, settings, token, records)
    sockets = [bind(settings.host, settings.port, args.reuse_port)]
    if args.admin_port:
        sockets.append(bind(settings.host, args.admin_port, False))
    log.info("serving %s v%s on %s:%s", served.name, served.version, settings.host, settings.port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=sockets)
