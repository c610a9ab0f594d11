"""The model server under hostile input: bounded metrics, bodies, decoding and error messages.

Each test here failed before the fix it guards (issue 10): a real uvicorn server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from conftest import LiveApp
from PIL import Image
from pydantic import ValidationError

from mlops.config.serve import ServeConfig, default_serve_config
from mlops.serve.app import ServedModel, create_app
from mlops.serve.decoding import INLINE_PIXELS, BadInput, ByteBudget, decode, small
from mlops.serve.inference import ModelSpec, OnnxClassifier, image_to_array, load_array

TOKEN = "hostile-test-token"


def encoded(size=(20, 20), fmt="PNG", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds one empty row: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(tiny_onnx):
    return ServedModel("pets", "3", OnnxClassifier(tiny_onnx))


@pytest.fixture(scope="module")
def server(served):
    with LiveApp(create_app(served, default_serve_config(), TOKEN)) as url:
        yield url


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


# -- memory and resources ------------------------------------------------------------------


def test_unknown_paths_share_one_metrics_label(client):
    def junk(start: int) -> int:
        for i in range(start, start + 40):
            assert client.get(f"/x{i}{'A' * 200}").status_code == 404
            assert httpx.get(f"{client.base_url}/y{i}{'B' * 200}").status_code == 401  # and without the token
        return len(client.get("/metrics").text)

    client.get("/metrics")  # its own series exist from here on
    first, second = junk(0), junk(40)
    assert second - first < 100, "each unknown path grew /metrics"
    text = client.get("/metrics").text
    assert 'mlops_requests_total{endpoint="other",status="404"} 80.0' in text
    assert 'mlops_requests_total{endpoint="other",status="401"} 80.0' in text


def test_a_decompression_bomb_is_shrunk_within_the_decode_budget():
    bomb = encoded((6300, 6300))  # ~113 KB of PNG, 40 M pixels, 160 MB decoded
    budget = ByteBudget(256 * 2**20, wait_s=1.0)
    decoded = decode(bomb, ("PNG",), 40_000_000, budget, size=64)
    assert (decoded.width, decoded.height) == (6300, 6300)
    assert max(decoded.image.size) <= 4 * 64, "the full-size image outlived the decode"
    assert budget.used == 0
    with pytest.raises(BadInput) as refused:  # could never fit: refused at once, not queued
        decode(bomb, ("PNG",), 40_000_000, ByteBudget(100 * 2**20, wait_s=1.0), size=64)
    assert (refused.value.status, refused.value.kind) == (413, "image_too_large")
    assert "serve.max_decode_mb" in refused.value.detail


def test_only_images_small_in_pixels_are_decoded_on_the_event_loop(served):
    assert small(encoded((32, 32))) and small(encoded((512, 512)))
    bomb = encoded((6300, 6300))  # small in bytes, not in pixels: read by the header
    assert len(bomb) < 200_000 and not small(bomb) and not small(encoded((513, 512)))
    assert not small(b"not an image") and not small(b"")
    # a small body of many pixels still goes through the decode budget: refused, not decoded inline
    tight = default_serve_config().model_copy(update={"max_decode_mb": 1.0, "inline_decode_kb": 1024.0})
    with LiveApp(create_app(served, tight)) as url:
        refused = httpx.post(url + "/predict", content=encoded((2000, 2000)), headers={"content-type": "image/png"})
        assert refused.status_code == 413 and "serve.max_decode_mb" in refused.json()["detail"]
        inline = httpx.post(url + "/predict", content=encoded((INLINE_PIXELS // 512, 512)),
                            headers={"content-type": "image/png"})
        assert inline.status_code == 200, inline.text  # ~1 MB decoded: over the budget, fine inline


def test_a_full_decode_budget_makes_a_decode_wait_then_refuses_it():
    budget = ByteBudget(1000, wait_s=0.2)
    with budget.hold(800, "first"):
        with pytest.raises(BadInput) as busy:
            with budget.hold(300, "second"):
                pass
    assert (busy.value.status, busy.value.kind) == (503, "busy")
    with budget.hold(1000, "alone"):  # room again once the first is done
        assert budget.used == 1000


def test_jpegs_are_decoded_at_reduced_scale_and_training_sees_the_same_pixels(tmp_path):
    photo = encoded((4000, 3000), "JPEG", (10, 200, 30))
    decoded = decode(photo, ("JPEG",), 40_000_000, ByteBudget(2**30, 1.0), size=32)
    assert decoded.image.size[0] <= 500, "the JPEG was decoded at full size"
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo)
    spec = ModelSpec(("a", "b"), 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert np.allclose(image_to_array(decoded.image, spec), load_array(path, spec), atol=0.05)


def test_feedback_body_is_bounded_and_errors_quote_only_a_prefix(client):
    huge = client.post("/feedback", content=b"{" + b" " * 50_000 + b"}", headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"
    label = "x" * 10_000
    unknown = client.post("/feedback", json={"request_id": "0" * 32, "label": label[:190]})
    assert unknown.status_code == 422 and unknown.json()["error"] == "unknown_label"
    assert len(unknown.text) < 400, "the label was echoed back in full"
    long_key = client.post("/feedback", json={"request_id": "0" * 32, "label": "cat", "k" * 5_000: 1})
    assert long_key.status_code == 422 and len(long_key.text) < 400
    nested = client.post("/feedback", content=b"[" * 5_000 + b"]" * 5_000, headers={"content-type": "application/json"})
    assert nested.status_code == 422 and nested.json()["error"] == "invalid_request"
    as_text = client.post("/feedback", content=json.dumps({"request_id": "0" * 32, "label": "cat"}))
    assert as_text.status_code == 415
    ok = client.post("/feedback", json={"request_id": "0" * 32, "label": "cat"})
    assert ok.status_code == 202 and ok.json() == {"accepted": True, "request_id": "0" * 32}


# -- smaller interface items ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "files", "status", "kind"),
    [
        (png_header(20_000, 20_000), None, 413, "image_too_large"),  # over Pillow's own bomb limit
        (png_header(8_000, 8_000), None, 413, "image_too_large"),  # over serve.max_pixels only
        (None, [("file", ("a.png", encoded(), "image/png"))] * 2, 413, "too_many_images"),
        (None, [("file", ("a.png", encoded(), "image/png"))] * 3, 413, "too_many_images"),
        (encoded(fmt="ICO"), None, 422, "not_an_image"),  # Pillow reads it; the allow-list does not
    ],
)
def test_limits_answer_with_the_right_status(client, body, files, status, kind):
    if files:
        response = client.post("/predict", files=files)
    else:
        response = client.post("/predict", content=body, headers={"content-type": "image/png"})
    assert (response.status_code, response.json()["error"]) == (status, kind), response.text


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        answer = httpx.post(server + "/predict", content=encoded(), headers={
            "content-type": "image/png", "authorization": f"{scheme} {TOKEN}"})
        assert answer.status_code == 200, scheme
    wrong = httpx.post(server + "/predict", content=encoded(), headers={"authorization": "Basic " + TOKEN})
    assert wrong.status_code == 401


def test_errors_outside_the_routes_keep_the_servers_format(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == "method_not_allowed"


def test_docs_need_no_network(server):
    page = httpx.get(server + "/docs").text
    assert "swagger-ui" in page and "http://" not in page and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert httpx.get(f"{server}/docs/assets/{asset}").status_code == 200, asset


def test_the_format_allow_list_is_checked_when_the_config_loads(served):
    with pytest.raises(ValidationError, match="unknown image format"):
        ServeConfig.model_validate(default_serve_config().model_dump() | {"formats": ["PNG", "NOPE"]})
    only_png = ServeConfig.model_validate(default_serve_config().model_dump() | {"formats": ["png"]})
    with LiveApp(create_app(served, only_png)) as url:
        assert httpx.post(url + "/predict", content=encoded(), headers={"content-type": "image/png"}).status_code == 200
        jpeg = httpx.post(url + "/predict", content=encoded(fmt="JPEG"), headers={"content-type": "image/jpeg"})
        assert jpeg.status_code == 422 and "PNG" in jpeg.json()["detail"]


SERVE_FILE = """
import sys, uvicorn
from mlops.config.serve import ServeConfig
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier
settings = ServeConfig.model_validate_json(sys.argv[2])
app = create_app(ServedModel("pets", "1", OnnxClassifier(sys.argv[1])), settings)
uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
"""


@pytest.mark.slow
def test_decompression_bombs_stay_under_the_memory_ceiling(tiny_onnx, tmp_path):
    """Sixteen 40 M-pixel PNGs in two concurrent batches: before the decode budget RSS rose by 2.3 GB
    and 2.2 GB stayed; now the peak stays under `max_decode_mb` above rest and the memory goes back."""
    import subprocess
    import sys
    import threading
    import time

    import psutil

    from mlops.deploy.processes import free_port

    port = free_port("127.0.0.1")
    settings = default_serve_config().model_copy(update={"port": port})
    server = subprocess.Popen([sys.executable, "-c", SERVE_FILE, str(tiny_onnx), settings.model_dump_json()])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        process = psutil.Process(server.pid)
        httpx.post(url + "/predict", content=encoded(), headers={"content-type": "image/png"})  # warm
        rest = process.memory_info().rss
        peak, done = rest, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.005)

        files = [("files", (f"{i}.png", encoded((6300, 6300), color=(0, 0, 0)), "image/png")) for i in range(8)]
        results = []
        sampler = threading.Thread(target=sample)
        sampler.start()
        senders = [threading.Thread(target=lambda: results.append(httpx.post(url + "/predict/batch", files=files, timeout=120)))
                   for _ in range(2)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        done.set()
        sampler.join()
        time.sleep(1)
        after = process.memory_info().rss
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert [len(r.json()["results"]) for r in results] == [8, 8]
    assert all("prediction" in item for r in results for item in r.json()["results"])
    assert (peak - rest) / 2**20 < settings.max_decode_mb + 32, f"peak {peak / 2**20:.0f} MB, at rest {rest / 2**20:.0f} MB"
    assert (after - rest) / 2**20 < 64, f"{(after - rest) / 2**20:.0f} MB stayed after the attack"
