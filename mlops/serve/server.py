"""The model server process: load one registered version, bind its sockets, run uvicorn.

    python -m mlops.serve --tracking-uri sqlite:///workspace/mlflow.db \\
        --model digits --alias candidate [--port 8000]

Limits and batching come from `--settings` (the `serve` section as JSON, which the deploy flow
passes) or else from `conf/serve/default.yaml`; `--host`/`--port` override them. With
`serve.tls` set it serves https only; with `serve.capture.url` set it keeps a sampled share of
the images it answers there (`mlops.serve.capture`). With `serve.workers` above 1 it starts that
many processes in all, serving the same sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mlops.config import RecordsConfig, ServeConfig, secret
from mlops.config.serve import TlsConfig, default_serve_config
from mlops.registry import cached_model
from mlops.deploy.canary import Role
from mlops.serve.app import Challenger, ServedModel, create_app
from mlops.serve.capture import CAPTURE_URL, CaptureWriter, store_of
from mlops.serve.inference import OnnxClassifier
from mlops.serve.records import RecordWriter

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024  # request line and headers (h11's own default; httptools has no limit)


class ServerError(Exception):
    """Why the server cannot start, in one line for the person who started it."""


# -- the model -------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Per user, so that no other account can put a file where this server reads its models."""
    return Path(tempfile.gettempdir()) / f"mlops-serving-{os.getuid()}"


def load_served(
    tracking_uri: str, name: str, alias: str | None, version: str | None, cache: Path, settings: ServeConfig | None = None
) -> ServedModel:
    """The ONNX file of a registered version (by alias or number), verified and opened (with the
    ONNX Runtime threads of `settings`, if given)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, tracking_uri)
    found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    path = cached_model(client, tracking_uri, found, cache)
    threads, spinning = (settings.onnx_threads, settings.onnx_spinning) if settings else (None, True)
    return ServedModel(name, str(found.version), OnnxClassifier(path, threads, spinning))


# -- sockets, TLS, HTTP ----------------------------------------------------------------------


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # blue-green: old and new server share the port while traffic moves over
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def listen_on(host: str, port: int, reuse_port: bool, setting: str) -> socket.socket:
    """`bind`, or a ServerError naming the address and the setting that chose it."""
    try:
        return bind(host, port, reuse_port)
    except OSError as error:
        reason = "address already in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error)).lower()
        raise ServerError(f"cannot listen on {host}:{port}: {reason} ({setting})") from None


def tls_files(tls: TlsConfig) -> tuple[Path, Path] | None:
    """The certificate chain and key files of `serve.tls`, each from its path or from the variable
    its `*_env` names; None when neither is set (plain http). Raises ServerError when only one
    is set, a variable is unset or a file cannot be read."""
    found = {}
    for part in ("cert_file", "key_file"):
        path, variable = getattr(tls, part), getattr(tls, f"{part}_env")
        if path and variable:
            raise ServerError(f"serve.tls: {part} and {part}_env are both set (set one of them)")
        try:
            value = path or secret(variable)
        except ValueError:
            raise ServerError(f"serve.tls.{part}_env: the variable {variable} is not set or empty") from None
        found[part] = Path(value).expanduser() if value else None
    if not any(found.values()):
        return None
    missing = [part for part, path in found.items() if path is None]
    if missing:
        raise ServerError(f"serve.tls: {missing[0]} is not set (https needs both cert_file and key_file, or neither)")
    for part, path in found.items():
        try:
            path.read_bytes()
        except OSError as error:
            raise ServerError(f"serve.tls.{part}: cannot read {path}: {error.strerror or error}") from None
    return found["cert_file"], found["key_file"]


def check_tls(tls: TlsConfig) -> tuple[Path, Path] | None:
    """`tls_files`, and that they load as a certificate chain and its private key."""
    files = tls_files(tls)
    if files is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*files)
        except (ssl.SSLError, OSError) as error:
            raise ServerError(f"serve.tls: cannot use certificate {files[0]} with key {files[1]}: {error}") from None
    return files


class RequestTimeout:
    """Mixed into uvicorn's HTTP protocol: each request's line, headers and body must arrive within
    `timeout_s` of its first byte (for a connection's first request: of the connection), and
    its line and headers must fit in MAX_HEADER_BYTES; else the connection is closed, with a
    408 (431) when nothing was answered yet.

    uvicorn itself only closes keep-alive connections idle between requests: a client that sends
    half a request keeps its connection, and a slot of `limit_concurrency`, for ever. The timer
    runs while a request is being read and stops once its body is complete; between requests
    uvicorn's keep-alive timer is in charge (also of a pipelined request whose headers are
    incomplete when the one before is answered).
    """

    def __init__(self, *args, timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_timeout_s = timeout_s
        self.request_timer: asyncio.TimerHandle | None = None
        self.cycle_before = None  # the current cycle when the request being read began, if not its own
        self.header_bytes = 0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_timer()

    def data_received(self, data: bytes) -> None:
        answering = self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete
        if self.request_timer is None and not answering:  # the first bytes of a new request
            self._start_timer()
        super().data_received(data)
        if self.request_timer is None:
            self._time_unwatched_body()
        elif self.cycle is None or self.cycle is self.cycle_before:  # its line and headers are incomplete
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                self._close(431, "Request Header Fields Too Large")
        elif not self.cycle.more_body:  # all of it arrived
            self._stop_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may begin a pipelined request
        self._time_unwatched_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _reading_body(self) -> bool:
        return self.cycle is not None and self.cycle.more_body and not self.cycle.response_complete

    def _time_unwatched_body(self) -> None:
        """A request parsed while another was answered and still missing body: time it from now."""
        if self.request_timer is None and self._reading_body():
            self._start_timer()

    def _start_timer(self) -> None:
        self.cycle_before = None if self._reading_body() else self.cycle
        self.header_bytes = 0
        self.request_timer = self.loop.call_later(self.request_timeout_s, self._close, 408, "Request Timeout")

    def _stop_timer(self) -> None:
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None

    def _close(self, status: int, reason: str) -> None:
        self._stop_timer()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle is self.cycle_before or not self.cycle.response_started:
            self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        self.transport.close()


class TimedHttpToolsProtocol(RequestTimeout, HttpToolsProtocol):
    pass


class TimedH11Protocol(RequestTimeout, H11Protocol):
    pass


HTTP_PROTOCOLS = {"httptools": TimedHttpToolsProtocol, "h11": TimedH11Protocol}


def uvicorn_config(app, settings: ServeConfig, http: str = "httptools"):
    """uvicorn's settings for `app`: the timeouts, the connection cap and TLS of `settings`.

    Connections beyond `max_connections` are answered 503; the request and keep-alive timeouts
    bound how long a slow or idle client holds one."""
    import uvicorn

    tls = check_tls(settings.tls)
    return uvicorn.Config(
        app,
        http=functools.partial(HTTP_PROTOCOLS[http], timeout_s=settings.timeout_request_s),
        timeout_keep_alive=settings.timeout_keep_alive_s,
        limit_concurrency=settings.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ssl_certfile=str(tls[0]) if tls else None,
        ssl_keyfile=str(tls[1]) if tls else None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )


# -- worker processes ------------------------------------------------------------------------


def start_workers(argv: list[str], sockets: list[socket.socket], count: int) -> list[subprocess.Popen]:
    """`count` more server processes on the same listening sockets (inherited: one accept queue,
    the kernel gives each connection to one process). Each loads the model itself (from the
    cache this process filled) and ends when this process does."""
    fds = [sock.fileno() for sock in sockets]
    command = [sys.executable, "-m", "mlops.serve", *argv,
               "--worker-of", str(os.getpid()), "--worker-fds", ",".join(map(str, fds))]
    return [subprocess.Popen(command, pass_fds=fds) for _ in range(count)]


def end_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM (a graceful stop) to this worker when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        sys.exit("error: the server that started this worker is gone")


def terminate(workers: list[subprocess.Popen]) -> None:
    """SIGTERM to those still running: a graceful stop, as for this process."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()


def stop_workers(workers: list[subprocess.Popen], grace_s: float) -> None:
    """`terminate`, then SIGKILL what is left after `grace_s`."""
    terminate(workers)
    for worker in workers:
        try:
            worker.wait(grace_s)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def supervising(workers: list[subprocess.Popen], grace_s: float):
    """A uvicorn server whose shutdown also stops `workers`, so this process exits after them
    (uvicorn ends the process with the signal it caught, right after shutdown)."""
    import uvicorn

    class Supervisor(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            terminate(workers)  # they drain their connections while this one drains its own
            await super().shutdown(sockets)
            await asyncio.to_thread(stop_workers, workers, grace_s)

    return Supervisor


# -- the command -----------------------------------------------------------------------------


def instance_id(value: str) -> str:
    if not value or len(value) > 64 or not value.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"'{value}' is not an instance id (up to 64 of A-Z a-z 0-9 _ -)")
    return value


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
    parser.add_argument("--cache-dir", type=Path,
                        help="where model files are kept (default: serve.cache_dir, else a per-user temporary folder)")
    parser.add_argument("--instance-id", type=instance_id, help="reported on /ready (the deploy flow's name for this process)")
    parser.add_argument("--challenger-version", help="a second version beside the served one (canary or shadow)")
    parser.add_argument("--challenger-role", choices=[Role.CANARY.value, Role.SHADOW.value], default=Role.CANARY.value,
                        help="canary: answers --challenger-share of requests; shadow: a copy of that share, unseen")
    parser.add_argument("--challenger-share", type=float, default=0.05, help="in (0, 1]")
    parser.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)  # started by that server (serve.workers)
    parser.add_argument("--worker-fds", help=argparse.SUPPRESS)  # its listening sockets, inherited
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

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker_of:
        end_with_parent(args.worker_of)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, records_config = settings_from(args)
    try:
        token = secret(settings.token_env)
    except ValueError:
        sys.exit(f"error: serve.token_env {settings.token_env}: the variable is not set or empty")
    try:  # what can be checked in a moment, before the model is downloaded
        check_tls(settings.tls)
        if settings.capture.enabled and settings.capture.url:
            store_of(settings.capture.url, CAPTURE_URL)  # its protocol's package is installed
        if args.worker_fds:
            sockets = [socket.socket(fileno=int(fd)) for fd in args.worker_fds.split(",")]
        else:
            sockets = [listen_on(settings.host, settings.port, args.reuse_port, "serve.port")]
            if args.admin_port:
                sockets.append(listen_on(settings.host, args.admin_port, False, "--admin-port"))
    except (ServerError, ValueError) as error:
        sys.exit(f"error: {error}")
    cache = args.cache_dir or settings.cache_dir or default_cache_dir()
    try:
        served = load_served(args.tracking_uri, args.model, args.alias, args.version, cache, settings)
    except Exception as error:  # noqa: BLE001 - report why the model cannot be served, then exit
        sys.exit(f"error: cannot load {args.model} ({args.alias or args.version}): {type(error).__name__}: {error}")
    if args.instance_id:
        served = dataclasses.replace(served, instance=args.instance_id)
    challenger = None
    if args.challenger_version:
        try:
            second = load_served(args.tracking_uri, args.model, None, args.challenger_version, cache, settings)
            challenger = Challenger(second, Role(args.challenger_role), args.challenger_share)
        except Exception as error:  # noqa: BLE001 - report why, then exit
            sys.exit(f"error: cannot load challenger {args.model} ({args.challenger_version}): {type(error).__name__}: {error}")
    records = None
    if records_config is not None:
        try:
            records = RecordWriter(records_config.dir, records_config.max_mb, records_config.max_age_days,
                                   upload_url=records_config.url, upload_s=records_config.upload_s)
        except ValueError as error:
            sys.exit(f"error: {error}")
    capture = CaptureWriter.from_config(settings.capture)
    try:
        app = create_app(served, settings, token, records, capture, challenger)
    except ValueError as error:
        sys.exit(f"error: {error}")
    config = uvicorn_config(app, settings)
    scheme = "https" if config.is_ssl else "http"
    if args.worker_of:
        log.info("worker of pid %d serving %s v%s", args.worker_of, served.name, served.version)
        return uvicorn.Server(config).run(sockets=sockets)
    log.info("serving %s v%s on %s://%s:%s (%d process%s)", served.name, served.version, scheme, settings.host,
             settings.port, settings.workers, "es" if settings.workers > 1 else "")
    if challenger:
        log.info("with v%s as %s on %.0f%% of requests", challenger.served.version, challenger.role, challenger.share * 100)
    workers = start_workers(argv, sockets, settings.workers - 1)
    grace_s = config.timeout_graceful_shutdown + 5
    try:
        supervising(workers, grace_s)(config).run(sockets=sockets)
    finally:  # an error in the server itself
        stop_workers(workers, grace_s)
