"""The model server's HTTP API: one ONNX model version behind FastAPI.

It needs nothing but the model (class names, input size and normalisation travel in the ONNX
file) and never unpickles anything. Concurrent requests are batched into one ONNX Runtime call
(`mlops.serve.batching`). Every request is recorded for monitoring (`mlops.serve.records`).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mlops.config import ServeConfig
from mlops.config.serve import default_serve_config
from mlops.serve.batching import MicroBatcher
from mlops.serve.features import image_features
from mlops.serve.inference import OnnxClassifier, image_to_array
from mlops.serve.records import RecordWriter

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    model: OnnxClassifier
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)  # told on /ready: who answers


class BadInput(Exception):
    """A client error: HTTP status, a short kind for metrics and records, and what is wrong."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Feedback(BaseModel):
    request_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    label: str


# -- input ---------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadInput(413, "body_too_large", f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, settings: ServeConfig, max_files: int) -> list[tuple[bytes, str]]:
    """(bytes, content type) of each uploaded image: multipart files or one raw image body."""
    content_type = request.headers.get("content-type", "").lower()
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise BadInput(400, "empty_body", "the request body is empty: send an image")
    if content_type.startswith("multipart/form-data"):
        async def stream():
            yield body

        try:
            parser = MultiPartParser(request.headers, stream(), max_files=max_files + 1, max_part_size=settings.max_body_bytes)
            form = await parser.parse()
        except MultiPartException as error:
            raise BadInput(400, "bad_multipart", str(error)) from None
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise BadInput(400, "no_file", "multipart body has no file part (use -F file=@image.jpg)")
        if len(uploads) > max_files:
            raise BadInput(413, "too_many_images", f"{len(uploads)} images, at most {max_files} per request")
        return [(await upload.read(), upload.content_type or "") for upload in uploads]
    if content_type.startswith(IMAGE_TYPES):
        return [(body, content_type)]
    raise BadInput(
        415, "unsupported_media_type",
        f"content type '{content_type or 'none'}': send multipart/form-data, image/* or application/octet-stream",
    )


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadInput(400, "empty_image", "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadInput(422, "not_an_image", "the bytes are not an image format the server reads") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure is the input's fault
        raise BadInput(422, "corrupt_image", f"cannot read the image: {error}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInput(413, "image_too_large", f"{width}x{height} pixels exceeds the limit of {max_pixels}")
    try:
        image.load()
    except Exception as error:  # noqa: BLE001
        raise BadInput(422, "corrupt_image", f"truncated or corrupt image: {error}") from None
    return image


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


OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")


class Observe:
    """ASGI middleware: the bearer token check, and request counts and latency per endpoint.

    Plain ASGI rather than `@app.middleware("http")`, which costs a task and a stream per request.
    """

    def __init__(self, app, metrics: Metrics, token: str | None):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {token}".encode() if token is not None else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        if self.expected is not None and path not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.errors.labels("unauthorized").inc()
                self.metrics.requests.labels(path, "401").inc()
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
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(time.perf_counter() - start)


def create_app(
    served: ServedModel, settings: ServeConfig | None = None, token: str | None = None, records: RecordWriter | None = None
) -> FastAPI:
    """The API for `served`, with the limits and batching of `settings` (the `serve` section;
    default: conf/serve/default.yaml)."""
    settings = settings or default_serve_config()
    model, classes = served.model, served.model.spec.classes
    metrics = Metrics(served)
    batcher = MicroBatcher(model, settings.batch_max_size, settings.batch_max_wait_ms / 1000.0, metrics.batch_size.observe)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        if records:
            records.close()

    app = FastAPI(
        title="mlops model server",
        description=f"Serves {served.name} version {served.version} ({len(classes)} classes).",
        lifespan=lifespan,
    )

    def error(status: int, kind: str, detail: str, request_id: str | None = None) -> JSONResponse:
        body = {"error": kind, "detail": detail} | ({"request_id": request_id} if request_id else {})
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("invalid_request").inc()
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error(422, "invalid_request", problems)

    app.add_middleware(Observe, metrics=metrics, token=token)

    def record(request_id: str, endpoint: str, content_type: str, size: int, **fields) -> None:
        if records:
            records.write(
                "requests",
                {
                    "request_id": request_id,
                    "time": datetime.now(UTC).isoformat(),
                    "model": served.name,
                    "model_version": served.version,
                    "endpoint": endpoint,
                    "content_type": content_type,
                    "bytes": size,
                }
                | fields,
            )

    def prepare(data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        image = decode_image(data, settings.max_pixels)
        return image_to_array(image, model.spec), image_features(image)

    async def classify(data: bytes, content_type: str, endpoint: str, start: float) -> dict:
        request_id = uuid.uuid4().hex
        try:
            array, features = await run_in_threadpool(prepare, data)
        except BadInput as bad:
            metrics.errors.labels(bad.kind).inc()
            record(request_id, endpoint, content_type, len(data), status="rejected", error=bad.kind)
            bad.request_id = request_id
            raise
        probabilities = await batcher.predict(array)
        best = int(np.argmax(probabilities))
        latency_ms = (time.perf_counter() - start) * 1000.0
        metrics.predictions.labels(classes[best]).inc()
        record(
            request_id, endpoint, content_type, len(data), status="ok", error=None,
            prediction=classes[best], confidence=float(probabilities[best]), latency_ms=latency_ms, **features,
        )
        return {
            "request_id": request_id,
            "model": {"name": served.name, "version": served.version},
            "prediction": classes[best],
            "confidence": float(probabilities[best]),
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities)},
            "latency_ms": round(latency_ms, 3),
        }

    async def rejected(request: Request, endpoint: str, bad: BadInput) -> JSONResponse:
        if not hasattr(bad, "request_id"):  # rejected before any image was read
            bad.request_id = uuid.uuid4().hex
            metrics.errors.labels(bad.kind).inc()
            record(bad.request_id, endpoint, request.headers.get("content-type", ""), 0, status="rejected", error=bad.kind)
        return error(bad.status, bad.kind, bad.detail, bad.request_id)

    @app.post("/predict", summary="Classify one image (multipart `file` or a raw image body)")
    async def predict(request: Request):
        start = time.perf_counter()
        try:
            ((data, content_type),) = await read_images(request, settings, max_files=1)
            return await classify(data, content_type, "/predict", start)
        except BadInput as bad:
            return await rejected(request, "/predict", bad)

    @app.post("/predict/batch", summary="Classify several images (multipart, one part per image)")
    async def predict_batch(request: Request):
        start = time.perf_counter()
        try:
            images = await read_images(request, settings, max_files=settings.max_batch_images)
        except BadInput as bad:
            return await rejected(request, "/predict/batch", bad)

        async def one(data: bytes, content_type: str) -> dict:
            try:
                return await classify(data, content_type, "/predict/batch", start)
            except BadInput as bad:
                return {"request_id": bad.request_id, "error": bad.kind, "detail": bad.detail}

        return {"results": await asyncio.gather(*(one(d, t) for d, t in images))}

    @app.post("/feedback", status_code=202, summary="The true label of an earlier request")
    async def feedback(item: Feedback):
        if item.label not in classes:
            metrics.errors.labels("unknown_label").inc()
            return error(422, "unknown_label", f"label '{item.label}' is not one of {list(classes)}")
        if records:
            records.write(
                "feedback",
                {"request_id": item.request_id, "label": item.label, "time": datetime.now(UTC).isoformat(),
                 "model": served.name, "model_version": served.version},
            )
        metrics.feedback.inc()
        return {"accepted": True, "request_id": item.request_id}

    @app.get("/health", summary="The process is alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded")
    async def ready():
        return {"ready": True, "model": served.name, "version": served.version, "classes": list(classes), "pid": os.getpid(),
                "instance": served.instance}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


