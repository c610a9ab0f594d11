"""Capture: the bytes of a sampled share of answered images, kept off the request path within a
budget, and read back (`mlops.serve.capture`); its settings and where the deploy flow puts it."""

from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import fsspec
import httpx
import numpy as np
import pytest
from conftest import LiveApp
from PIL import Image
from pydantic import ValidationError

from mlops.config.serve import CaptureConfig, default_serve_config
from mlops.serve.app import ServedModel, create_app
from mlops.serve.capture import (
    CaptureWriter,
    Stored,
    capture_key,
    expired,
    image_suffix,
    index_of,
    read_captures,
    redact,
    sampled,
    to_free,
)
from mlops.serve.inference import OnnxClassifier

MB = 2**20


def image(seed: int = 0, size: int = 20, fmt: str = "PNG") -> bytes:
    """A small noisy image (about 1.3 KB as PNG): each seed gives other bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def post(url: str, data: bytes, content_type: str = "image/png") -> httpx.Response:
    return httpx.post(url + "/predict", content=data, headers={"content-type": content_type})


def captures_metric(url: str) -> dict[str, float]:
    """mlops_captures_total by outcome, from /metrics."""
    found = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("mlops_captures_total{"):
            found[line.split('outcome="')[1].split('"')[0]] = float(line.split()[-1])
    return found


def files_under(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def served(tiny_onnx) -> ServedModel:
    return ServedModel("pets", "7", OnnxClassifier(tiny_onnx))


def serve(served: ServedModel, writer: CaptureWriter) -> LiveApp:
    return LiveApp(create_app(served, default_serve_config(), None, None, writer))


# -- the rules ------------------------------------------------------------------------------


def test_sampling_is_a_fixed_share_of_request_ids():
    ids = [uuid.UUID(int=i * 7919 + 12345).hex for i in range(20_000)]
    assert not any(sampled(i, 0.0) for i in ids) and all(sampled(i, 1.0) for i in ids)
    kept = [i for i in ids if sampled(i, 0.3)]
    assert len(kept) / len(ids) == pytest.approx(0.3, abs=0.015)
    assert kept == [i for i in ids if sampled(i, 0.3)]  # the same ids every time
    assert set(kept) <= {i for i in ids if sampled(i, 0.5)}  # a higher rate keeps what a lower one kept
    assert sampled("3f0c9a", 0.5) == sampled("3f0c9a", 0.5)


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("GIF", ".gif"),
                                             ("BMP", ".bmp"), ("TIFF", ".tif")])
def test_an_image_is_named_by_its_first_bytes(fmt, suffix):
    assert image_suffix(image(fmt=fmt)) == suffix


def test_unknown_bytes_get_a_neutral_suffix():
    assert image_suffix(b"junk") == image_suffix(b"") == ".bin"


def test_to_free_deletes_the_fewest_oldest_captures():
    assert to_free([10, 10, 10], total=30, incoming=5, max_bytes=40) == 0
    assert to_free([10, 10, 10], total=30, incoming=15, max_bytes=40) == 1
    assert to_free([10, 10, 10], total=30, incoming=40, max_bytes=40) == 3
    assert to_free([10, 10, 10], total=30, incoming=41, max_bytes=40) is None  # never fits
    assert to_free([10], total=50, incoming=5, max_bytes=40) is None  # what is known cannot free enough


def test_expired_counts_the_captures_of_hours_past_the_age_limit():
    now = datetime(2025, 5, 10, 12, 30, tzinfo=UTC)
    index = [Stored(capture_key(now - timedelta(hours=h), f"r{h}"), (), 1) for h in (50, 49, 48, 47, 2)]
    assert expired(index, now, timedelta(days=2)) == 2  # hour 10:00 two days ago is still kept
    assert expired(index, now, timedelta(days=30)) == 0


def test_the_index_keeps_only_what_is_laid_out_as_captures():
    listing = {
        "/s/2025-05-01/10/bbb.png": {"size": 100, "type": "file"},
        "/s/2025-05-01/10/bbb.json": {"size": 20, "type": "file"},
        "/s/2025-04-30/23/aaa.jpg": {"size": 50, "type": "file"},  # an image alone: an interrupted write
        "/s/notes.txt": {"size": 5, "type": "file"},
        "/s/2025-05-01/10/x y.png": {"size": 5, "type": "file"},
        "/other/2025-05-01/10/ccc.png": {"size": 5, "type": "file"},
    }
    index = index_of("/s", listing)
    assert [(s.key, s.size) for s in index] == [("2025-04-30/23/aaa", 50), ("2025-05-01/10/bbb", 120)]
    assert index[1].paths == ("/s/2025-05-01/10/bbb.json", "/s/2025-05-01/10/bbb.png")


def test_logs_never_show_credentials_of_a_url():
    assert redact("cannot write to ftp://joe:pa55@host/x and s3://b/p") == "cannot write to ftp://***@host/x and s3://b/p"


# -- settings -------------------------------------------------------------------------------


def capture_config(**changes) -> CaptureConfig:
    return CaptureConfig.model_validate(default_serve_config().capture.model_dump() | changes)


def test_a_server_started_by_hand_captures_nothing_and_says_why(caplog):
    default = default_serve_config().capture
    assert default.enabled and default.sample_rate == 0.1 and default.url is None
    with caplog.at_level(logging.INFO, "mlops.serve.capture"):
        assert CaptureWriter.from_config(default) is None
        assert CaptureWriter.from_config(capture_config(enabled=False, url="/tmp/x")) is None
    assert "serve.capture.url is not set" in caplog.text and "serve.capture.enabled is false" in caplog.text


def test_a_capture_url_is_checked_where_it_is_set(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="credentials go in the environment"):
        capture_config(url="ftp://joe:secret@host/captures")
    with pytest.raises(ValidationError, match="not a protocol fsspec knows"):
        capture_config(url="nosuch://bucket/x")
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        capture_config(sample_rate=1.5)
    monkeypatch.chdir(tmp_path)
    assert capture_config(url="caps").url == str(tmp_path.resolve() / "caps")  # found from any folder
    assert capture_config(url="s3://bucket/prefix").url == "s3://bucket/prefix"
    with pytest.raises(ValueError, match=r"serve\.capture\.url nosuch://x"):
        CaptureWriter("nosuch://x", 1.0, 1, 1)


def test_the_deploy_flow_captures_under_the_workspace_per_environment(tmp_path, monkeypatch):
    from flows.config import load_config
    from mlops.deploy import processes

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path / "remote"))
    monkeypatch.delenv("MLOPS_CAPTURE_URL", raising=False)
    test = load_config("deploy", "test", [f"paths.workspace={tmp_path}"])
    assert test.serve.capture.url == str(tmp_path.resolve() / "captures" / "test")
    production = load_config("deploy", "production", [f"paths.workspace={tmp_path}"])
    assert production.serve.capture.url == str(tmp_path.resolve() / "captures" / "production")
    monkeypatch.setenv("MLOPS_CAPTURE_URL", "s3://captures/pets")
    production = load_config("deploy", "production", [f"paths.workspace={tmp_path}", "serve.capture.sample_rate=0.5"])
    assert production.serve.capture.url == "s3://captures/pets"
    command = processes.server_command(production.serve, production.records, "sqlite:///x.db", "pets", "3")
    settings = json.loads(command[command.index("--settings") + 1])
    assert settings["capture"] | {} == production.serve.capture.model_dump() | {"sample_rate": 0.5}


@pytest.mark.parametrize(("url", "in_pod", "volume"), [
    (None, "/var/lib/mlops/captures", True),  # the workspace default: a path on this machine
    ("s3://captures/pets", "s3://captures/pets", False),
])
def test_kubernetes_pods_capture_to_a_volume_or_the_remote_url(url, in_pod, volume, tmp_path, monkeypatch):
    import kubernetes_validate

    from flows.config import load_config
    from mlops.deploy import kubernetes

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    monkeypatch.delenv("MLOPS_CAPTURE_URL", raising=False)
    if url:
        monkeypatch.setenv("MLOPS_CAPTURE_URL", url)
    config = load_config("deploy", "production", ["deploy=kubernetes", f"paths.workspace={tmp_path}"])
    deployment = kubernetes.render_manifests(config, "5")[0]
    kubernetes_validate.validate(deployment, "1.31", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert json.loads(command[command.index("--settings") + 1])["capture"]["url"] == in_pod
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert ("captures" in mounts) == volume == ("captures" in {v["name"] for v in pod["volumes"]})
    assert mounts.get("captures", in_pod) == in_pod and str(tmp_path) not in " ".join(command)


# -- a live server --------------------------------------------------------------------------


def test_a_server_keeps_the_bytes_sent_and_what_answered_them(served, tmp_path):
    store = tmp_path / "captures"
    writer = CaptureWriter(str(store), sample_rate=1.0, max_mb=10, max_age_days=1)
    sent = {0: image(0), 1: image(1, fmt="JPEG")}
    with serve(served, writer) as url:
        raw = post(url, sent[0]).json()
        form = httpx.post(url + "/predict", files={"file": ("a.jpg", sent[1], "image/jpeg")}).json()
        batch = httpx.post(url + "/predict/batch", files=[
            ("files", ("b.png", image(2), "image/png")), ("files", ("c.png", b"not an image", "image/png")),
        ]).json()["results"]
        rejected = post(url, b"\x89PNG not really")
        assert rejected.status_code == 422
        assert writer.flush()
        metrics = captures_metric(url)
    assert metrics == {"stored": 3, "sampled_out": 0, "dropped_queue_full": 0, "dropped_budget": 0, "failed": 0}

    captures = read_captures(str(store))
    assert captures.unreadable == []
    by_id = {c.request_id: c for c in captures}
    answered = {raw["request_id"]: (raw, sent[0]), form["request_id"]: (form, sent[1]), batch[0]["request_id"]: (batch[0], image(2))}
    assert set(by_id) == set(answered)  # neither the rejected request nor the bad image of the batch
    assert rejected.json()["request_id"] not in by_id and batch[1]["request_id"] not in by_id
    for request_id, (answer, data) in answered.items():
        captured = by_id[request_id]
        assert captured.read_bytes() == data and captured.bytes == len(data)
        assert (captured.model, captured.model_version) == ("pets", "7")
        assert (captured.prediction, captured.confidence) == (answer["prediction"], pytest.approx(answer["confidence"]))
        assert abs(captured.time - datetime.now(UTC)) < timedelta(minutes=5)
    assert by_id[form["request_id"]].endpoint == "/predict" and by_id[form["request_id"]].content_type == "image/jpeg"
    assert by_id[batch[0]["request_id"]].endpoint == "/predict/batch"

    # the layout the module documents: <day>/<hour>/<request id>.<ext> and its .json sidecar
    key = capture_key(by_id[raw["request_id"]].time, raw["request_id"])
    assert (store / f"{key}.png").read_bytes() == sent[0]
    sidecar = json.loads((store / f"{key}.json").read_text())
    assert sidecar["request_id"] == raw["request_id"] and sidecar["image"] == f"{raw['request_id']}.png"
    assert (store / f"{capture_key(by_id[form['request_id']].time, form['request_id'])}.jpg").exists()


def test_a_server_keeps_exactly_the_sampled_requests(served, tmp_path):
    writer = CaptureWriter(str(tmp_path / "captures"), sample_rate=0.5, max_mb=10, max_age_days=1)
    with serve(served, writer) as url:
        ids = [post(url, image(i)).json()["request_id"] for i in range(30)]
        assert writer.flush()
        metrics = captures_metric(url)
    expected = {i for i in ids if sampled(i, 0.5)}
    assert {c.request_id for c in read_captures(str(tmp_path / "captures"))} == expected
    assert (metrics["stored"], metrics["sampled_out"]) == (len(expected), len(ids) - len(expected))


def test_the_store_stays_within_its_budget(served, tmp_path):
    store = tmp_path / "captures"
    budget = 12_000  # about 7 captures of ~1.7 KB (image and sidecar)
    writer = CaptureWriter(str(store), sample_rate=1.0, max_mb=budget / MB, max_age_days=1)
    with serve(served, writer) as url:
        ids = [post(url, image(i)).json()["request_id"] for i in range(40)]
        assert writer.flush()
        stored_gauge = next(float(l.split()[-1]) for l in httpx.get(url + "/metrics").text.splitlines()
                            if l.startswith("mlops_capture_stored_bytes"))
    on_disk = files_under(store)
    assert sum(on_disk.values()) <= budget and stored_gauge == sum(on_disk.values())
    kept = [c.request_id for c in read_captures(str(store))]
    assert 4 <= len(kept) < 10 and kept == ids[-len(kept):]  # the newest, the oldest went first
    assert len(on_disk) == 2 * len(kept)  # no image without its sidecar left behind
    assert writer.counts()["stored"] == 40


def test_an_unwritable_store_never_fails_a_request(served, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    writer = CaptureWriter(f"{blocker}/captures", sample_rate=1.0, max_mb=10, max_age_days=1)
    payloads = [image(i) for i in range(8)]
    with caplog.at_level(logging.WARNING, "mlops.serve.capture"), serve(served, writer) as url:
        statuses = [post(url, data).status_code for data in payloads]
        assert writer.flush()
        metrics = captures_metric(url)
    assert statuses == [200] * 8
    assert metrics["failed"] == 8 and metrics["stored"] == 0
    warnings = [r for r in caplog.records if "cannot write a capture" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: once a minute
    assert str(blocker) in warnings[0].getMessage() and "PNG" not in caplog.text


def test_a_full_queue_drops_captures_and_counts_them(served, tmp_path):
    payloads = [image(i) for i in range(6)]
    room = sum(len(p) for p in payloads[:3])  # the queue holds three of them
    writer = CaptureWriter(str(tmp_path / "captures"), 1.0, 10, 1, max_queue_mb=room / MB, start=False)  # nothing drains it
    with serve(served, writer) as url:
        assert [post(url, data).status_code for data in payloads] == [200] * 6
        metrics = captures_metric(url)
    assert metrics["dropped_queue_full"] == 3 and metrics["stored"] == 0


def test_a_new_writer_prunes_what_is_past_the_age_and_budget(tmp_path):
    store, now = tmp_path / "captures", datetime.now(UTC)
    for age_h, request_id in ((24 * 40, "old"), (5, "a"), (4, "b"), (3, "c")):
        key = capture_key(now - timedelta(hours=age_h), request_id)
        (store / key).parent.mkdir(parents=True, exist_ok=True)
        (store / f"{key}.png").write_bytes(b"x" * 1000)
        (store / f"{key}.json").write_bytes(b"{}")
    (store / "README").write_text("not a capture")
    writer = CaptureWriter(str(store), 1.0, max_mb=2100 / MB, max_age_days=30)  # room for two of the three recent
    assert writer.flush()
    writer.close()
    left = files_under(store)
    assert sorted(left) == sorted(["README", f"{capture_key(now - timedelta(hours=4), 'b')}.png",
                                   f"{capture_key(now - timedelta(hours=4), 'b')}.json",
                                   f"{capture_key(now - timedelta(hours=3), 'c')}.png",
                                   f"{capture_key(now - timedelta(hours=3), 'c')}.json"])
    assert writer.stored_bytes == 2 * 1002
    assert len(list(store.iterdir())) <= 3  # the old day's folders went too (README, one or two days)


# -- reading --------------------------------------------------------------------------------


def offer(writer: CaptureWriter, seed: int, prediction: str = "cat") -> str:
    request_id = uuid.uuid4().hex
    writer.offer(request_id, image(seed), model="pets", model_version="7", endpoint="/predict",
                 content_type="image/png", prediction=prediction, confidence=0.75)
    return request_id


def test_the_reader_reports_broken_captures_and_reads_a_window(tmp_path):
    store = tmp_path / "captures"
    writer = CaptureWriter(str(store), 1.0, 10, 1)
    good, garbled, no_image, no_sidecar = (offer(writer, seed) for seed in range(4))
    assert writer.flush()
    writer.close()
    by_id = {c.request_id: c for c in read_captures(str(store))}
    assert set(by_id) == {good, garbled, no_image, no_sidecar}

    def local(request_id: str, suffix: str) -> Path:
        return Path(by_id[request_id].image_url.removeprefix("file://")).with_suffix(suffix)

    local(garbled, ".json").write_text('{"request_id": "' + garbled + '", "time": "yesterday"')
    local(no_image, ".png").unlink()
    local(no_sidecar, ".json").unlink()  # an interrupted write: skipped, not reported

    captures = read_captures(str(store))
    assert [c.request_id for c in captures] == [good]
    assert len(captures.unreadable) == 2
    garbled_problem, = (p for p in captures.unreadable if str(local(garbled, ".json")) in p)
    assert "invalid capture record" in garbled_problem
    no_image_problem, = (p for p in captures.unreadable if str(local(no_image, ".json")) in p)
    assert "is not beside it" in no_image_problem

    when = by_id[good].time
    assert [c.request_id for c in read_captures(str(store), when, when + timedelta(seconds=1))] == [good]
    assert len(read_captures(str(store), when + timedelta(seconds=1))) == 0
    assert len(read_captures(str(store), None, when)) == 0
    assert len(read_captures(str(tmp_path / "nothing-yet"))) == 0


def test_any_fsspec_url_is_a_store():
    url = f"memory://captures-{uuid.uuid4().hex}/pets"
    writer = CaptureWriter(url, 1.0, 10, 1)
    try:
        request_ids = [offer(writer, seed, prediction) for seed, prediction in ((0, "cat"), (1, "dog"))]
        assert writer.flush()
        writer.close()
        captures = read_captures(url)
        assert [c.request_id for c in captures] == request_ids
        assert [c.read_bytes() for c in captures] == [image(0), image(1)]
        assert [c.prediction for c in captures] == ["cat", "dog"]
        assert all(c.image_url.startswith("memory://") for c in captures)
        assert writer.counts()["stored"] == 2 and writer.stored_bytes > 2 * len(image(0))
    finally:
        fs = fsspec.filesystem("memory")
        fs.rm(url.removeprefix("memory:/").split("/pets")[0], recursive=True)


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_a_server_whose_store_needs_a_missing_package_stops_with_one_line(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("s3fs"):
        pytest.skip("s3fs is installed here")
    settings = default_serve_config().model_copy(update={"capture": capture_config(url="s3://captures/pets")})
    done = subprocess.run(
        [sys.executable, "-m", "mlops.serve", "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--model", "m",
         "--version", "1", "--settings", settings.model_dump_json()],
        check=False, capture_output=True, text=True, timeout=120, env=os.environ | {"MLOPS_API_TOKEN": "x"},
    )
    assert done.returncode != 0
    assert done.stderr.strip() == "error: serve.capture.url s3://captures/pets: Install s3fs to access S3"
