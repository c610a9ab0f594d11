"""The model server on a real HTTP socket on 127.0.0.1: bad input, auth, metrics, records, feedback."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import LiveApp
from PIL import Image

from mlops.serve.inference import OnnxClassifier
from mlops.serve.records import RecordWriter, read_window
from mlops.config.serve import default_serve_config
from mlops.serve.app import ServedModel, create_app

TOKEN = "s3cret-token"


def png(size=(20, 20), color=(200, 30, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def records_dir(tmp_path) -> Path:
    return tmp_path / "records"


@pytest.fixture
def server(tiny_onnx, records_dir, tmp_path):
    served = ServedModel("pets", "7", OnnxClassifier(tiny_onnx))
    writer = RecordWriter(records_dir, max_mb=10, max_age_days=1, flush_s=0.1)
    app = create_app(served, default_serve_config().model_copy(update={"max_body_mb": 50_000 / 2**20, "max_pixels": 500 * 500, "max_batch_images": 4}), None, writer)
    with LiveApp(app) as url:
        yield url


def test_predict_multipart_and_raw_bytes(server):
    by_form = httpx.post(server + "/predict", files={"file": ("a.png", png(), "image/png")})
    assert by_form.status_code == 200, by_form.text
    body = by_form.json()
    assert body["model"] == {"name": "pets", "version": "7"}
    assert body["prediction"] in ("cat", "dog", "fox") and len(body["request_id"]) == 32
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    raw = httpx.post(server + "/predict", content=png(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["probabilities"] == pytest.approx(body["probabilities"])


def test_batch_endpoint_answers_each_image_and_flags_bad_ones(server):
    files = [("files", ("a.png", png(), "image/png")), ("files", ("b.jpg", png(fmt="JPEG"), "image/jpeg")),
             ("files", ("c.png", b"junk", "image/png"))]
    response = httpx.post(server + "/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [("prediction" in r, r.get("error")) for r in results] == [(True, None), (True, None), (False, "not_an_image")]
    too_many = [("files", (f"{i}.png", png(), "image/png")) for i in range(5)]
    assert httpx.post(server + "/predict/batch", files=too_many).json()["error"] == "too_many_images"


@pytest.mark.parametrize(
    ("kwargs", "status", "kind"),
    [
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ({"json": {"image": "x"}}, 415, "unsupported_media_type"),
        ({"content": b"\x89PNG not really", "headers": {"content-type": "image/png"}}, 422, "not_an_image"),
        ({"content": png((40, 40))[:60], "headers": {"content-type": "image/png"}}, 422, "corrupt_image"),
        ({"content": png((600, 600), fmt="JPEG"), "headers": {"content-type": "image/jpeg"}}, 413, "image_too_large"),
        ({"content": b"\x00" * 60_000, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
        ({"files": {"file": ("empty.png", b"", "image/png")}}, 400, "empty_image"),
        ({"files": {"file": ("a.txt", b"text", "text/plain")}}, 422, "not_an_image"),
        ({"files": {"other": ("a.png", png(), "image/png")}}, 400, "no_file"),
        ({"data": {"file": "not a file"}, "files": {"x": ("a.png", png(), "image/png")}}, 400, "no_file"),
        ({"data": {"x": "1"}, "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, "bad_multipart"),
    ],
)
def test_bad_input_gets_a_4xx_json_error_and_the_server_stays_up(server, kwargs, status, kind):
    response = httpx.post(server + "/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.json()["error"] == kind and response.json()["detail"]
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    assert f'mlops_errors_total{{kind="{kind}"}} 1.0' in httpx.get(server + "/metrics").text


def test_ready_reports_the_model_and_metrics_count_requests(server):
    ready = httpx.get(server + "/ready").json()
    assert len(ready.pop("instance")) == 32
    assert ready == {"ready": True, "model": "pets", "version": "7", "classes": ["cat", "dog", "fox"], "pid": os.getpid(),
                     "challenger": None}
    for _ in range(3):
        httpx.post(server + "/predict", content=png(), headers={"content-type": "image/png"})
    text = httpx.get(server + "/metrics").text
    assert 'mlops_model_info{model="pets",version="7"} 1.0' in text
    assert 'mlops_requests_total{endpoint="/predict",status="200"} 3.0' in text
    assert 'mlops_request_latency_seconds_count{endpoint="/predict"} 3.0' in text
    assert sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("mlops_predictions_total{")) == 3
    assert "/predict" in httpx.get(server + "/openapi.json").json()["paths"]


def test_records_and_feedback_are_written_for_the_monitor(server, records_dir):
    ok = httpx.post(server + "/predict", content=png(color=(10, 10, 10)), headers={"content-type": "image/png"}).json()
    httpx.post(server + "/predict", content=b"junk", headers={"content-type": "image/png"})
    accepted = httpx.post(server + "/feedback", json={"request_id": ok["request_id"], "label": "dog"})
    assert accepted.status_code == 202
    unknown = httpx.post(server + "/feedback", json={"request_id": ok["request_id"], "label": "cow"})
    assert unknown.status_code == 422 and unknown.json()["error"] == "unknown_label"
    malformed = httpx.post(server + "/feedback", json={"request_id": "nope"})
    assert malformed.status_code == 422 and "label" in malformed.json()["detail"]
    time.sleep(0.5)  # the writer flushes every 0.1 s

    now = datetime.now(UTC)
    window = read_window(records_dir, "requests", now - timedelta(minutes=5), now + timedelta(minutes=1))
    by_status = {r["status"]: r for r in window.records}
    assert by_status["ok"]["request_id"] == ok["request_id"]
    assert by_status["ok"]["model_version"] == "7" and by_status["ok"]["brightness"] < 0.1
    assert {"width", "height", "contrast", "confidence", "latency_ms", "prediction"} <= set(by_status["ok"])
    assert by_status["rejected"]["error"] == "not_an_image"
    labels = read_window(records_dir, "feedback", now - timedelta(minutes=5), now + timedelta(minutes=1)).records
    assert [(r["request_id"], r["label"]) for r in labels] == [(ok["request_id"], "dog")]


def test_concurrent_requests_are_batched(server):
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda _: httpx.post(server + "/predict", content=png(), headers={"content-type": "image/png"}).status_code,
            range(64),
        ))
    assert answers == [200] * 64
    text = httpx.get(server + "/metrics").text
    count = float(next(l for l in text.splitlines() if l.startswith("mlops_batch_size_count")).split()[-1])
    assert count < 64  # fewer model calls than requests


def test_bearer_token_is_required_when_configured(tiny_onnx, tmp_path):
    app = create_app(ServedModel("pets", "1", OnnxClassifier(tiny_onnx)), token=TOKEN)
    with LiveApp(app) as url:
        image = {"content": png(), "headers": {"content-type": "image/png"}}
        missing = httpx.post(url + "/predict", **image)
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(url + "/predict", content=png(), headers={"content-type": "image/png", "authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = httpx.post(url + "/predict", content=png(), headers={"content-type": "image/png", "authorization": f"Bearer {TOKEN}"})
        assert right.status_code == 200
        assert httpx.get(url + "/ready").status_code == 200  # probes stay open


def test_one_app_can_be_served_twice_in_turn(tiny_onnx):
    """Its queues and budgets bind to the event loop serving it, not to the one it was created near."""
    app = create_app(ServedModel("pets", "7", OnnxClassifier(tiny_onnx)))
    for _ in range(2):
        with LiveApp(app) as url:
            assert httpx.post(url + "/predict", content=png(), headers={"content-type": "image/png"}).status_code == 200


def test_onnx_runtime_threads_and_spinning_follow_the_settings(tiny_onnx):
    options = OnnxClassifier(tiny_onnx, threads=1, spinning=False).session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    default = OnnxClassifier(tiny_onnx).session.get_session_options()  # ONNX Runtime's own defaults
    assert default.intra_op_num_threads == 0


def test_the_batcher_survives_a_batch_it_cannot_stack(tiny_onnx):
    """Arrays of two shapes in one batch: both requests get the error, the next ones an answer."""
    import asyncio

    import numpy as np

    from mlops.serve.batching import MicroBatcher

    model = OnnxClassifier(tiny_onnx)
    size = model.spec.input_size

    async def scenario():
        batcher = MicroBatcher(model, max_size=8, max_wait_s=0.05)
        batcher.start()
        try:
            mixed = await asyncio.wait_for(asyncio.gather(
                batcher.predict(np.zeros((3, size, size), np.float32)),
                batcher.predict(np.zeros((3, size + 1, size + 1), np.float32)),
                return_exceptions=True,
            ), 5)
            after = await asyncio.wait_for(batcher.predict(np.zeros((3, size, size), np.float32)), 5)
        finally:
            await batcher.stop()
        return mixed, after

    mixed, (logits, _) = asyncio.run(scenario())
    assert all(isinstance(outcome, ValueError) for outcome in mixed)
    assert logits.shape == (len(model.spec.classes),)
