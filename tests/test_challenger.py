"""A second version in the model server: canary routing by share and sticky key, shadow copies
recorded under the same request id and never returned (on a real socket on 127.0.0.1)."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from conftest import LiveApp
from PIL import Image

from mlops.deploy.canary import routes_to_canary
from mlops.serve.app import Challenger, ServedModel, create_app
from mlops.serve.inference import OnnxClassifier
from mlops.serve.records import RecordWriter, read_window


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (shade, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def serve(tiny_onnx, tmp_path, role: str, share: float):
    model = OnnxClassifier(tiny_onnx)
    writer = RecordWriter(tmp_path / "records", max_mb=10, max_age_days=1, flush_s=0.1)
    challenger = Challenger(ServedModel("pets", "8", model), role, share)
    return LiveApp(create_app(ServedModel("pets", "7", model), None, None, writer, challenger=challenger))


def requests_recorded(tmp_path) -> list[dict]:
    time.sleep(0.5)  # the writer flushes every 0.1 s
    now = datetime.now(UTC)
    return read_window(tmp_path / "records", "requests", now - timedelta(minutes=5), now + timedelta(minutes=1)).records


def test_a_canary_answers_its_share_and_a_route_key_sticks(tiny_onnx, tmp_path):
    with serve(tiny_onnx, tmp_path, "canary", 0.3) as url:
        answers = [httpx.post(url + "/predict", content=png(i % 250), headers={"content-type": "image/png"}).json()
                   for i in range(120)]
        keys = [f"user-{i}" for i in range(40)]
        sticky = {key: {httpx.post(url + "/predict", content=png(9), headers={"content-type": "image/png",
                                                                             "x-route-key": key}).json()["model"]["version"]
                        for _ in range(3)} for key in keys}
        ready = httpx.get(url + "/ready").json()
    assert ready["challenger"] == {"version": "8", "role": "canary", "share": 0.3}
    on_canary = [a["request_id"] for a in answers if a["model"]["version"] == "8"]
    assert 15 <= len(on_canary) <= 60  # about 30% of 120
    assert all(routes_to_canary(rid, 0.3) for rid in on_canary)  # routed by the request id without a key
    assert all(len(versions) == 1 for versions in sticky.values())  # one key, one version
    assert sticky == {key: {"8" if routes_to_canary(key, 0.3) else "7"} for key in keys}
    roles = {(r["model_version"], r["role"]) for r in requests_recorded(tmp_path)}
    assert roles == {("7", "champion"), ("8", "canary")}


def test_a_shadow_answers_a_copy_that_is_recorded_never_returned(tiny_onnx, tmp_path):
    with serve(tiny_onnx, tmp_path, "shadow", 1.0) as url:
        answers = [httpx.post(url + "/predict", content=png(i), headers={"content-type": "image/png"}).json()
                   for i in range(20)]
        bad = httpx.post(url + "/predict", content=b"junk", headers={"content-type": "image/png"})
    assert {a["model"]["version"] for a in answers} == {"7"} and bad.status_code == 422
    records = requests_recorded(tmp_path)
    shadow = {r["request_id"]: r for r in records if r.get("role") == "shadow"}
    assert set(shadow) == {a["request_id"] for a in answers}  # rejected input is not copied
    assert all(r["model_version"] == "8" and r["status"] == "ok" and r["logits"] for r in shadow.values())


def test_a_challenger_must_know_the_same_classes_and_a_share(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="share"):
        Challenger(ServedModel("pets", "8", OnnxClassifier(tiny_onnx)), "canary", 0.0)
