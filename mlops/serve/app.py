"""The model server's HTTP API: one ONNX model version behind FastAPI.

It needs nothing but the model (class names, input size and normalisation travel in the ONNX
file) and never unpickles anything. Concurrent requests are batched into one ONNX Runtime call
(`mlops.serve.batching`). Every request is recorded for monitoring (`mlops.serve.records`), and
a sampled share of the images answered is kept for labelling and retraining (`mlops.serve.capture`).

Every input is hostile until read: bodies are bounded in size and in memory held at once
(`serve.max_body_mb`, `serve.max_bodies_mb`), images in pixels, formats and decoded bytes
(`mlops.serve.decoding`), and no error quotes more than a short prefix of what it was sent.
The OpenAPI document says exactly what the server takes and answers.

A second version, the challenger, may sit beside the served one (`Challenger`): as a canary it
answers the share of requests `mlops.deploy.canary.routes_to_canary` sends it (sticky by the
client's `X-Route-Key` header); as a shadow it answers a sampled copy of requests off the
response path, and its answers are recorded under the same request id, never returned.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles

from mlops.config import ServeConfig
from mlops.config.serve import default_serve_config
from mlops.deploy.canary import ROUTE_HEADER, Role, routes_to_canary, sampled
from mlops.serve.batching import MicroBatcher
from mlops.serve.capture import CaptureMetrics, CaptureWriter
from mlops.serve.decoding import BadInput, ByteBudget, configure_allocator, decode, small
from mlops.serve.features import THUMBNAIL, image_features
from mlops.serve.inference import OnnxClassifier, image_to_array, softmax
from mlops.serve.records import RecordWriter

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")
QUOTE = 60  # characters of a client's input an error message may quote back
DOCS_ASSETS = "/docs/assets"
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    model: OnnxClassifier
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # told on /ready: who answers


@dataclass(frozen=True)
class Challenger:
    """A second version in the same process: a canary taking `share` of requests, or a shadow
    answering a `share` sample of them unseen."""

    served: ServedModel
    role: Role
    share: float

    def __post_init__(self):
        if self.role not in (Role.CANARY, Role.SHADOW) or not 0.0 < self.share <= 1.0:
            raise ValueError(f"challenger: role canary|shadow with a share in (0, 1], not {self.role} {self.share}")
        object.__setattr__(self, "role", Role(self.role))


def quote(text: str) -> str:
    return text if len(text) <= QUOTE else f"{text[:QUOTE]}... ({len(text)} characters)"


# -- what the API takes and answers (the OpenAPI document) ---------------------------------


class ErrorBody(BaseModel):
    error: str = Field(description="a short kind, also the `kind` label of mlops_errors_total")
    detail: str
    request_id: str | None = Field(default=None, description="set when the request was recorded")


class ModelRef(BaseModel):
    name: str
    version: str


class Prediction(BaseModel):
    request_id: str
    model: ModelRef
    prediction: str
    confidence: float
    probabilities: dict[str, float]
    latency_ms: float


class ImageError(BaseModel):
    request_id: str
    error: str
    detail: str


class BatchResult(BaseModel):
    results: list[Prediction | ImageError] = Field(description="one entry per image, in order")


class Feedback(BaseModel):
    model_config = {"extra": "forbid"}
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="as returned by /predict")
    label: str = Field(min_length=1, max_length=200, description="the true class: one of the model's classes")


class Accepted(BaseModel):
    accepted: Literal[True]
    request_id: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: Literal[True]
    model: str
    version: str
    classes: list[str]
    pid: int
    instance: str = Field(description="this process's id: tells two servers of one version apart")
    challenger: dict | None = Field(default=None, description="the canary or shadow version beside it: version, role, share")


ERRORS = {
    400: "Malformed request: empty body, broken multipart, no file part",
    401: "Missing or wrong bearer token",
    413: "Over a limit: body size, image pixels, decoded size or images per request",
    415: "Content type not accepted",
    422: "Not an image the server reads, or an invalid field",
    503: "Busy: too much in memory at once; retry",
}


def responses(*statuses: int, ok: type[BaseModel] | None = None) -> dict:
    documented = {status: {"model": ErrorBody, "description": ERRORS[status]} for status in statuses}
    return documented | ({200: {"model": ok}} if ok else {})


BINARY = {"type": "string", "format": "binary"}
IMAGE = BINARY | {"minLength": 1}  # an empty body is refused; an empty part of a batch is one error
RAW_IMAGE = {kind: {"schema": IMAGE} for kind in ("image/jpeg", "image/png", "application/octet-stream")}
ONE_IMAGE = {"content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": IMAGE}, "required": ["file"],
}}} | RAW_IMAGE, "required": True}
IMAGES = {"content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": BINARY, "minItems": 1}},
    "required": ["files"],
}}}, "required": True}


# -- input ---------------------------------------------------------------------------------


class BodyBudget:
    """Request-body bytes held in memory at once; a request waits up to `wait_s` for room."""

    def __init__(self, limit: int, wait_s: float):
        self.limit, self.wait_s, self.used = limit, wait_s, 0
        self._changed: asyncio.Condition | None = None

    def start(self) -> None:
        """Bind to the running event loop (an app may be served by more than one, in turn)."""
        self._changed, self.used = asyncio.Condition(), 0

    @asynccontextmanager
    async def hold(self, nbytes: int):
        nbytes = min(nbytes, self.limit)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + nbytes <= self.limit), self.wait_s)
            except TimeoutError:
                raise BadInput(503, "busy", "the server holds too many request bodies: retry later") from None
            self.used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def body_cost(request: Request, limit: int) -> int:
    """Memory a request may take while it is read: its declared length (or the limit), twice for
    multipart (the body and its parts)."""
    declared = request.headers.get("content-length", "")
    size = min(int(declared), limit) if declared.isdigit() else limit
    return size * (2 if request.headers.get("content-type", "").lower().startswith("multipart/") else 1)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadInput(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or cut off by serve.timeout_request_s: no one reads the answer
        raise BadInput(400, "client_disconnect", "the client went away before the body was complete") from None
    return b"".join(chunks)


async def read_images(request: Request, settings: ServeConfig, part: str, max_files: int) -> list[tuple[bytes, str]]:
    """(bytes, content type) of each uploaded image: the multipart files named `part`, or one raw
    image body."""
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith(("multipart/form-data", *IMAGE_TYPES)):
        raise BadInput(
            415, "unsupported_media_type",
            f"content type '{quote(content_type) or 'none'}': send multipart/form-data, image/* or application/octet-stream",
        )
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise BadInput(400, "empty_body", "the request body is empty: send an image")
    if not content_type.startswith("multipart/form-data"):
        return [(body, content_type)]

    async def stream():
        yield body

    try:
        parser = MultiPartParser(request.headers, stream(), max_files=max_files, max_part_size=settings.max_body_bytes)
        form = await parser.parse()
    except MultiPartException as error:
        if str(error).startswith("Too many files"):
            raise BadInput(413, "too_many_images", f"more than {max_files} image(s) in one request") from None
        raise BadInput(400, "bad_multipart", quote(str(error))) from None
    uploads = form.getlist(part)  # other fields are ignored, as the OpenAPI schema allows
    if not uploads:
        raise BadInput(400, "no_file", f"multipart body has no part named '{part}' (use -F {part}=@image.jpg)")
    if not all(isinstance(upload, UploadFile) for upload in uploads):
        raise BadInput(400, "no_file", f"multipart part '{part}' must be a file (use -F {part}=@image.jpg)")
    return [(await upload.read(), upload.content_type or "") for upload in uploads]


def problems(errors: list[dict]) -> str:
    """Pydantic's errors as `field: what is wrong`; field names are the client's, so quoted short."""
    return "; ".join(f"{quote('.'.join(map(str, e['loc'])) or 'body')}: {e['msg']}" for e in errors[:5])


def parse_feedback(body: bytes, content_type: str, classes: tuple[str, ...]) -> Feedback:
    if not content_type.lower().startswith("application/json"):
        raise BadInput(415, "unsupported_media_type", f"content type '{quote(content_type) or 'none'}': send application/json")
    try:
        item = Feedback.model_validate_json(body)
    except ValidationError as error:
        raise BadInput(422, "invalid_request", problems(error.errors())) from None
    if item.label not in classes:
        raise BadInput(422, "unknown_label", f"label '{quote(item.label)}' is not one of the model's classes {list(classes)}")
    return item


# -- the app -------------------------------------------------------------------------------


class Metrics:
    def __init__(self, served: ServedModel):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlops_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "mlops_request_latency_seconds", "Request latency", ["endpoint"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.errors = Counter("mlops_errors", "Rejected or failed requests by kind", ["kind"], registry=r)
        self.predictions = Counter("mlops_predictions", "Predictions by class", ["class_name"], registry=r)
        self.batch_size = Histogram("mlops_batch_size", "Images per model call", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.feedback = Counter("mlops_feedback", "Feedback labels received", registry=r)
        info = Gauge("mlops_model_info", "The model version being served", ["model", "version"], registry=r)
        info.labels(served.name, served.version).set(1)


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The credentials of an `Authorization: Bearer ...` header (the scheme in any case), or b""."""
    value = dict(headers).get(b"authorization", b"")
    scheme, _, credentials = value.partition(b" ")
    return credentials.strip() if scheme.lower() == b"bearer" else b""


class Observe:
    """ASGI middleware: the bearer token check, and request counts and latency per endpoint.

    Endpoints are labelled by route: any other path counts as `other`, so no client can grow
    /metrics. Plain ASGI rather than `@app.middleware("http")`, which costs a task and a stream
    per request.
    """

    def __init__(self, app, metrics: Metrics, token: str | None, routes: frozenset[str]):
        self.app, self.metrics, self.routes = app, metrics, routes
        self.token = token.encode() if token is not None else None

    def endpoint(self, path: str) -> str:
        if path in self.routes:
            return path
        return DOCS_ASSETS if path.startswith(DOCS_ASSETS + "/") else "other"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, endpoint = time.perf_counter(), self.endpoint(scope["path"])
        if self.token is not None and endpoint not in OPEN_PATHS and endpoint != DOCS_ASSETS:
            if not hmac.compare_digest(bearer(scope["headers"]), self.token):
                self.metrics.errors.labels("unauthorized").inc()
                self.metrics.requests.labels(endpoint, "401").inc()
                response = JSONResponse(
                    {"error": "unauthorized", "detail": "missing or wrong bearer token"},
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        status = 500

        async def observed(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, observed)
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(
    served: ServedModel, settings: ServeConfig | None = None, token: str | None = None, records: RecordWriter | None = None,
    capture: CaptureWriter | None = None, challenger: Challenger | None = None,
) -> FastAPI:
    """The API for `served`, with the limits and batching of `settings` (the `serve` section;
    default: conf/serve/default.yaml); `records` and `capture` (closed at shutdown): where
    requests are recorded and sampled images kept, if anywhere; `challenger`: a canary or
    shadow version beside `served` (same classes and input size)."""
    settings = settings or default_serve_config()
    model, classes = served.model, served.model.spec.classes
    if challenger and challenger.served.model.spec.classes != classes:
        raise ValueError(f"challenger version {challenger.served.version} has other classes than version {served.version}")
    metrics = Metrics(served)
    if capture:
        metrics.registry.register(CaptureMetrics(capture))

    def batcher_of(runner: OnnxClassifier) -> MicroBatcher:
        return MicroBatcher(runner, settings.batch_max_size, settings.batch_max_wait_ms / 1000.0, metrics.batch_size.observe)

    batcher = batcher_of(model)
    second = batcher_of(challenger.served.model) if challenger else None
    shadow_calls: set[asyncio.Task] = set()  # running copies (a task needs a reference until done)
    bodies = BodyBudget(settings.max_bodies_bytes, settings.timeout_request_s)
    decodes = ByteBudget(settings.max_decode_bytes, settings.timeout_request_s)
    decode_size = max(model.spec.input_size, THUMBNAIL)
    secured = {"security": [{"bearer": []}]} if token is not None else {}
    auth = (401,) if token is not None else ()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        configure_allocator()
        bodies.start()
        batcher.start()
        if second:
            second.start()
        yield
        if shadow_calls:
            await asyncio.wait(shadow_calls, timeout=settings.timeout_request_s)
        await batcher.stop()
        if second:
            await second.stop()
        if records:
            records.close()
        if capture:
            await run_in_threadpool(capture.close)

    app = FastAPI(
        title="mlops model server",
        version=served.version,
        description=f"Serves {served.name} version {served.version} ({len(classes)} classes).",
        lifespan=lifespan, docs_url=None, redoc_url=None,
    )

    def error(status: int, kind: str, detail: str, request_id: str | None = None, headers=None) -> JSONResponse:
        body = {"error": kind, "detail": detail} | ({"request_id": request_id} if request_id else {})
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, kind, quote(str(exc.detail)), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        return error(422, "invalid_request", problems(exc.errors()))

    def record(request_id: str, endpoint: str, content_type: str, size: int, version: str = served.version,
               **fields) -> None:
        if records:
            records.write(
                "requests",
                {
                    "request_id": request_id,
                    "time": datetime.now(UTC).isoformat(),
                    "model": served.name,
                    "model_version": version,
                    "endpoint": endpoint,
                    "content_type": quote(content_type),
                    "bytes": size,
                }
                | fields,
            )

    def prepare(data: bytes, budget: ByteBudget | None) -> tuple[np.ndarray, dict[str, float]]:
        decoded = decode(data, settings.formats, settings.max_pixels, budget, decode_size)
        features = image_features(decoded.image, (decoded.width, decoded.height)) if records else {}  # for the record
        return image_to_array(decoded.image, model.spec), features

    def answer(logits: np.ndarray) -> tuple[np.ndarray, int]:
        probabilities = softmax(logits[None])[0]
        return probabilities, int(np.argmax(probabilities))

    async def shadow(array: np.ndarray, request_id: str, endpoint: str, content_type: str, size: int) -> None:
        """The challenger's answer to a copy of a request, recorded beside the served one."""
        start, version = time.perf_counter(), challenger.served.version
        try:
            logits, _ = await second.predict(array)
        except Exception:  # noqa: BLE001 - the client has its answer; the failure is recorded
            record(request_id, endpoint, content_type, size, version, role=Role.SHADOW.value, status="error",
                   error="inference", latency_ms=(time.perf_counter() - start) * 1000.0)
            return
        probabilities, best = answer(logits)
        record(request_id, endpoint, content_type, size, version, role=Role.SHADOW.value, status="ok", error=None,
               prediction=classes[best], confidence=float(probabilities[best]),
               latency_ms=(time.perf_counter() - start) * 1000.0, logits=[round(float(v), 4) for v in logits])

    def route(request_id: str, key: str | None) -> tuple[ServedModel, MicroBatcher, Role]:
        """Who answers: the canary for its share of routing keys, else the served version."""
        if challenger and challenger.role is Role.CANARY and routes_to_canary(key or request_id, challenger.share):
            return challenger.served, second, Role.CANARY
        return served, batcher, Role.CHAMPION

    def prepared(data: bytes, budget: ByteBudget | None = decodes) -> tuple[np.ndarray, dict[str, float]] | BadInput:
        try:
            return prepare(data, budget)
        except BadInput as bad:
            return bad

    async def prepare_all(images: list[bytes]) -> list[tuple[np.ndarray, dict[str, float]] | BadInput]:
        """Decode a request's images: on the event loop when they are small (`serve.inline_decode_kb`
        and INLINE_PIXELS: a hop to a thread costs more than decoding them), else all of them in one
        thread hop."""
        if sum(len(data) for data in images) <= settings.inline_decode_bytes and all(map(small, images)):
            return [prepared(data, None) for data in images]
        return await run_in_threadpool(lambda: [prepared(data) for data in images])

    async def classify(data: bytes, content_type: str, endpoint: str, start: float, key: str | None = None,
                       ready: tuple[np.ndarray, dict[str, float]] | BadInput | None = None) -> dict:
        """Answer one image; `ready`: what `prepare_all` made of it, if it was called already."""
        request_id = uuid.uuid4().hex
        answering, runner, role = route(request_id, key)
        if ready is None:
            (ready,) = await prepare_all([data])
        if isinstance(ready, BadInput):
            metrics.errors.labels(ready.kind).inc()
            record(request_id, endpoint, content_type, len(data), status="rejected", error=ready.kind)
            ready.request_id = request_id
            raise ready
        array, features = ready
        try:
            logits, projection = await runner.predict(array)
        except Exception:
            record(request_id, endpoint, content_type, len(data), answering.version, role=role.value, status="error",
                   error="inference", latency_ms=(time.perf_counter() - start) * 1000.0)
            raise
        probabilities, best = answer(logits)
        latency_ms = (time.perf_counter() - start) * 1000.0
        metrics.predictions.labels(classes[best]).inc()
        vectors = {"logits": [round(float(v), 4) for v in logits]}  # for output drift and estimated accuracy
        if projection is not None:
            vectors["embedding"] = [round(float(v), 4) for v in projection]  # for embedding drift
        record(
            request_id, endpoint, content_type, len(data), answering.version, role=role.value, status="ok", error=None,
            prediction=classes[best], confidence=float(probabilities[best]), latency_ms=latency_ms, **features, **vectors,
        )
        if challenger and challenger.role is Role.SHADOW and sampled(request_id, challenger.share):
            task = asyncio.create_task(shadow(array, request_id, endpoint, content_type, len(data)))
            shadow_calls.add(task)
            task.add_done_callback(shadow_calls.discard)
        if capture:  # only queued here: written by its own thread
            capture.offer(
                request_id, data, model=served.name, model_version=answering.version, endpoint=endpoint,
                content_type=quote(content_type), prediction=classes[best], confidence=float(probabilities[best]),
            )
        return {
            "request_id": request_id,
            "model": {"name": served.name, "version": answering.version},
            "prediction": classes[best],
            "confidence": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities)},
            "latency_ms": round(latency_ms, 3),
        }

    def rejected(request: Request, endpoint: str, bad: BadInput) -> JSONResponse:
        if bad.request_id is None:  # rejected before any image was read
            bad.request_id = uuid.uuid4().hex
            metrics.errors.labels(bad.kind).inc()
            record(bad.request_id, endpoint, request.headers.get("content-type", ""), 0, status="rejected", error=bad.kind)
        headers = {"Retry-After": "1"} if bad.status == 503 else None
        return error(bad.status, bad.kind, bad.detail, bad.request_id, headers)

    @app.post(
        "/predict", summary="Classify one image (multipart `file` or a raw image body)",
        responses=responses(400, *auth, 413, 415, 422, 503, ok=Prediction),
        openapi_extra={"requestBody": ONE_IMAGE} | secured,
    )
    async def predict(request: Request):
        start = time.perf_counter()
        try:
            async with bodies.hold(body_cost(request, settings.max_body_bytes)):
                ((data, content_type),) = await read_images(request, settings, "file", max_files=1)
                answer = await classify(data, content_type, "/predict", start, request.headers.get(ROUTE_HEADER))
                return JSONResponse(answer)  # as it is: FastAPI's encoder would walk it again
        except BadInput as bad:
            return rejected(request, "/predict", bad)

    @app.post(
        "/predict/batch", summary="Classify several images (multipart, one `files` part per image)",
        responses=responses(400, *auth, 413, 415, 503, ok=BatchResult),
        openapi_extra={"requestBody": IMAGES} | secured,
    )
    async def predict_batch(request: Request):
        start = time.perf_counter()

        key = request.headers.get(ROUTE_HEADER)

        async def one(data: bytes, content_type: str, ready) -> dict:
            try:
                return await classify(data, content_type, "/predict/batch", start, key, ready)
            except BadInput as bad:
                return {"request_id": bad.request_id, "error": bad.kind, "detail": bad.detail}

        try:
            async with bodies.hold(body_cost(request, settings.max_body_bytes)):
                images = await read_images(request, settings, "files", settings.max_batch_images)
                ready = await prepare_all([data for data, _ in images])
                return JSONResponse({"results": await asyncio.gather(*(one(d, t, r) for (d, t), r in zip(images, ready)))})
        except BadInput as bad:
            return rejected(request, "/predict/batch", bad)

    feedback_schema = Feedback.model_json_schema()
    feedback_schema["properties"]["label"]["enum"] = list(classes)

    @app.post(
        "/feedback", status_code=202, summary="The true label of an earlier request",
        responses=responses(*auth, 413, 415, 422) | {202: {"model": Accepted, "description": "Recorded"}},
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": feedback_schema}}, "required": True}}
        | secured,
    )
    async def feedback(request: Request):
        try:
            body = await read_body(request, settings.max_feedback_bytes)
            item = parse_feedback(body, request.headers.get("content-type", ""), classes)
        except BadInput as bad:
            metrics.errors.labels(bad.kind).inc()
            return error(bad.status, bad.kind, bad.detail)
        if records:
            records.write(
                "feedback",
                {"request_id": item.request_id, "label": item.label, "time": datetime.now(UTC).isoformat(),
                 "model": served.name, "model_version": served.version},
            )
        metrics.feedback.inc()
        return JSONResponse({"accepted": True, "request_id": item.request_id}, status_code=202)

    @app.get("/health", summary="The process is alive", response_model=Health)
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded", response_model=Ready)
    async def ready():
        beside = ({"version": challenger.served.version, "role": challenger.role.value, "share": challenger.share}
                  if challenger else None)
        return {"ready": True, "model": served.name, "version": served.version, "classes": list(classes), "pid": os.getpid(),
                "instance": served.instance, "challenger": beside}

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    mount_docs(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            if token is not None:
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(Observe, metrics=metrics, token=token, routes=frozenset(r.path for r in app.routes))
    return app


def mount_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's files served from this process (production networks have no CDN)."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title}: API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )
