"""The traffic replay tool against a real model server on 127.0.0.1: drift, class mix, feedback, auth, CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import LiveApp, write_image
from PIL import Image

from mlops.serve.features import image_features
from mlops.serve.inference import OnnxClassifier
from mlops.serve.records import RecordWriter, read_window
from mlops.serve.app import ServedModel, create_app
from mlops.traffic import DRIFTS, corrupt, load_images, pick_images, replay

REPO = Path(__file__).resolve().parents[1]
TOKEN = "traffic-token"
CLASSES = ("cat", "dog", "fox")


@pytest.fixture
def pets(tmp_path) -> Path:
    """Six 20 px RGB PNGs per class of the tiny model, plus files that are not images."""
    root = tmp_path / "pets"
    for number, label in enumerate(CLASSES):
        for index in range(6):
            write_image(root / label / f"{index:02d}.png", size=(20, 20), seed=100 * number + index)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"")
    return root


@pytest.fixture
def records_dir(tmp_path) -> Path:
    return tmp_path / "records"


@pytest.fixture
def server(tiny_onnx, records_dir):
    writer = RecordWriter(records_dir, max_mb=10, max_age_days=1, flush_s=0.1)
    with LiveApp(create_app(ServedModel("pets", "3", OnnxClassifier(tiny_onnx)), records=writer)) as url:
        yield url


@pytest.fixture
def token_server(tiny_onnx):
    with LiveApp(create_app(ServedModel("pets", "3", OnnxClassifier(tiny_onnx)), token=TOKEN)) as url:
        yield url


def wait_for_records(root: Path, kind: str, count: int, timeout_s: float = 10.0) -> list[dict]:
    """The records of `kind` written in the last minutes, once there are at least `count`."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = datetime.now(UTC)
        window = read_window(root, kind, now - timedelta(minutes=10), now + timedelta(minutes=1))
        assert window.unreadable == []
        if len(window.records) >= count or time.monotonic() > deadline:
            return window.records
        time.sleep(0.1)


def dark_digit() -> Image.Image:
    """A digits-like image: 8x8 grayscale, black background, a bright stroke."""
    pixels = np.zeros((8, 8), np.uint8)
    pixels[1:7, 3:5] = 240
    return Image.fromarray(pixels, mode="L")


# -- corruption ----------------------------------------------------------------------------


def random_rgb(folder: Path, size: int, seed: int) -> Image.Image:
    with Image.open(write_image(folder / f"random-{seed}.png", (size, size), seed=seed)) as image:
        image.load()
        return image


@pytest.mark.parametrize("kind", ["random-rgb", "dark-digit", "large-rgb"])
def test_brightness_raises_brightness_and_blur_lowers_sharpness(kind, tmp_path):
    image = {"random-rgb": lambda: random_rgb(tmp_path, 32, 1), "dark-digit": dark_digit,
             "large-rgb": lambda: random_rgb(tmp_path, 300, 2)}[kind]()
    original = image_features(image)
    rng = np.random.default_rng(0)

    bright = corrupt(image, "brightness", 0.8, rng)
    assert bright.size == image.size
    assert image_features(bright)["brightness"] > original["brightness"] + 0.2

    blurred = corrupt(image, "blur", 0.8, rng)
    assert blurred.size == image.size
    assert image_features(blurred)["sharpness"] < 0.6 * original["sharpness"]

    weak = corrupt(image, "brightness", 0.2, rng)
    assert original["brightness"] < image_features(weak)["brightness"] < image_features(bright)["brightness"]


def test_noise_changes_pixels_reproducibly_and_strength_zero_changes_nothing(tmp_path):
    image = random_rgb(tmp_path, 24, 2)
    pixels = np.asarray(image, np.int16)
    noisy = np.asarray(corrupt(image, "noise", 0.8, np.random.default_rng(5)), np.int16)
    assert noisy.shape == pixels.shape and np.abs(noisy - pixels).mean() > 10
    again = np.asarray(corrupt(image, "noise", 0.8, np.random.default_rng(5)), np.int16)
    other = np.asarray(corrupt(image, "noise", 0.8, np.random.default_rng(6)), np.int16)
    assert np.array_equal(noisy, again) and not np.array_equal(noisy, other)
    for drift in DRIFTS:
        assert np.array_equal(np.asarray(corrupt(image, drift, 0.0, np.random.default_rng(0)), np.int16), pixels), drift
    for drift in ("none", "class_mix"):
        assert np.array_equal(np.asarray(corrupt(image, drift, 1.0, np.random.default_rng(0)), np.int16), pixels)


def test_unknown_drift_and_bad_strength_are_refused():
    image = dark_digit()
    with pytest.raises(ValueError, match="unknown drift 'fog'.*brightness.*noise.*blur.*class_mix"):
        corrupt(image, "fog", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="strength"):
        corrupt(image, "noise", 1.5, np.random.default_rng(0))


# -- picking images ------------------------------------------------------------------------


def test_load_images_lists_class_folders_sorted_and_refuses_empty_ones(pets, tmp_path):
    images = load_images(pets)
    assert len(images) == 18 and images == sorted(images, key=lambda item: (item[1], item[0]))
    assert Counter(label for _, label in images) == {"cat": 6, "dog": 6, "fox": 6}
    assert all(path.suffix == ".png" and not path.name.startswith(".") for path, _ in images)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        load_images(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        load_images(tmp_path / "flat")
    with pytest.raises(ValueError, match="not a directory"):
        load_images(tmp_path / "missing")


def test_picking_is_deterministic_and_covers_every_image(pets):
    images = load_images(pets)
    once = pick_images(images, seed=3)
    assert sorted(once) == images and once != images  # each once, shuffled
    assert pick_images(images, 40, seed=3) == pick_images(images, 40, seed=3)
    assert pick_images(images, 40, seed=3) != pick_images(images, 40, seed=4)
    assert max(Counter(pick_images(images, 36, seed=3)).values()) == 2  # two full passes
    mixed = Counter(label for _, label in pick_images(images, 50, "class_mix", seed=1))
    assert mixed["cat"] == 40 and mixed["dog"] > 0 and mixed["fox"] > 0  # default target: the first class
    with pytest.raises(ValueError, match="'cow' is not one of the classes"):
        pick_images(images, 10, "class_mix", class_mix_target="cow")


# -- replay against a live server ------------------------------------------------------------


def test_replay_sends_requests_and_feedback_that_the_server_records(server, pets, records_dir):
    result = replay(server, load_images(pets), requests=30, feedback_share=0.3, concurrency=4, seed=7)
    assert (result.sent, result.ok, result.errors) == (30, 30, 0)
    assert result.feedback_sent == 9 and result.feedback_errors == 0
    assert sum(result.predictions.values()) == 30 and set(result.predictions) <= set(CLASSES)
    answers = result.answers
    assert [a.status for a in answers] == [200] * 30
    assert result.accuracy == pytest.approx(sum(a.prediction == a.label for a in answers) / 30)
    assert Counter(a.prediction for a in answers) == result.predictions

    requests = wait_for_records(records_dir, "requests", 30)
    assert sorted(r["request_id"] for r in requests) == sorted(a.request_id for a in answers)
    by_id = {a.request_id: a for a in answers}
    assert all(r["status"] == "ok" and r["prediction"] == by_id[r["request_id"]].prediction for r in requests)
    assert all(r["content_type"] == "image/png" and r["width"] == 20 for r in requests)
    feedback = wait_for_records(records_dir, "feedback", 9)
    assert sorted((r["request_id"], r["label"]) for r in feedback) == sorted(
        (a.request_id, a.label) for a in answers if a.feedback
    )


def test_replay_defaults_to_each_image_once_and_no_feedback(server, pets, records_dir):
    images = load_images(pets)
    result = replay(server, images, concurrency=2)
    assert result.sent == result.ok == 18 and result.feedback_sent == 0
    assert sorted((a.path, a.label) for a in result.answers) == images
    assert wait_for_records(records_dir, "feedback", 1, timeout_s=0.5) == []


def test_drift_shows_in_the_features_the_server_records(server, pets, records_dir):
    images = load_images(pets)
    runs = {drift: replay(server, images, drift=drift, strength=0.8, seed=1) for drift in ("none", "brightness", "blur")}
    records = {r["request_id"]: r for r in wait_for_records(records_dir, "requests", 54)}
    assert len(records) == 54

    def mean(drift: str, feature: str) -> float:
        return float(np.mean([records[a.request_id][feature] for a in runs[drift].answers]))

    assert mean("brightness", "brightness") > mean("none", "brightness") + 0.2
    assert mean("blur", "sharpness") < 0.6 * mean("none", "sharpness")
    assert mean("none", "brightness") == pytest.approx(
        np.mean([image_features(Image.open(path))["brightness"] for path, _ in images]), abs=1e-6
    )


def test_class_mix_sends_about_80_percent_from_the_target_class(server, pets):
    result = replay(server, load_images(pets), requests=50, drift="class_mix", class_mix_target="dog", seed=2)
    assert result.ok == 50
    sent = Counter(a.label for a in result.answers)
    assert sent["dog"] == 40 and sent["cat"] + sent["fox"] == 10 and sent["cat"] > 0 and sent["fox"] > 0
    plain = Counter(a.label for a in replay(server, load_images(pets), requests=36, seed=2).answers)
    assert plain == {"cat": 12, "dog": 12, "fox": 12}  # two full passes


def test_wrong_or_missing_token_counts_errors_without_crashing(token_server, pets):
    images = load_images(pets)
    for token in ("wrong", None):
        result = replay(token_server, images, requests=8, feedback_share=0.5, token=token)
        assert (result.sent, result.ok, result.errors, result.feedback_sent) == (8, 0, 8, 0)
        assert {a.status for a in result.answers} == {401} and result.predictions == {} and result.accuracy == 0.0
    right = replay(token_server, images, requests=8, feedback_share=0.5, token=TOKEN)
    assert (right.ok, right.errors, right.feedback_sent, right.feedback_errors) == (8, 0, 4, 0)


def test_unreachable_server_counts_connection_errors(pets):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = replay(f"http://127.0.0.1:{port}", load_images(pets), requests=5, feedback_share=1.0, timeout_s=2)
    assert (result.sent, result.ok, result.errors, result.feedback_sent) == (5, 0, 5, 0)
    assert {a.status for a in result.answers} == {0} and time.monotonic() - started < 30


def test_replay_refuses_bad_arguments(pets):
    images = load_images(pets)
    with pytest.raises(ValueError, match="unknown drift"):
        replay("http://127.0.0.1:9", images, drift="fog")
    with pytest.raises(ValueError, match="feedback_share"):
        replay("http://127.0.0.1:9", images, feedback_share=1.5)
    with pytest.raises(ValueError, match="only applies to drift 'class_mix'"):
        replay("http://127.0.0.1:9", images, class_mix_target="dog")


# -- command line --------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlops.traffic", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=os.environ | (env or {}),
    )


def test_cli_replays_against_the_live_server(token_server, pets):
    env = {"TRAFFIC_TEST_TOKEN": TOKEN}
    done = run_cli("--url", token_server, "--images", str(pets), "--requests", "10", "--drift", "noise",
                   "--feedback-share", "0.3", "--concurrency", "2", "--token-env", "TRAFFIC_TEST_TOKEN", env=env)
    assert done.returncode == 0, done.stderr
    assert "10 ok, 0 errors, 3 feedback labels" in done.stdout and "drift=noise" in done.stdout
    as_json = run_cli("--url", token_server, "--images", str(pets), "--drift", "class_mix", "--class-mix-target", "fox",
                      "--token-env", "TRAFFIC_TEST_TOKEN", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert (summary["sent"], summary["ok"], summary["errors"]) == (18, 18, 0)
    assert sum(summary["predictions"].values()) == 18


def test_cli_fails_clearly(token_server, pets, tmp_path):
    missing = run_cli("--url", token_server, "--images", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and f"error: {tmp_path / 'nowhere'}: not a directory" in missing.stderr
    unset = run_cli("--url", token_server, "--images", str(pets), "--token-env", "TRAFFIC_UNSET_VARIABLE",
                    env={"TRAFFIC_UNSET_VARIABLE": ""})
    assert unset.returncode != 0 and "--token-env TRAFFIC_UNSET_VARIABLE: the variable is not set" in unset.stderr
    refused = run_cli("--url", token_server, "--images", str(pets), "--requests", "3")  # no token
    assert refused.returncode == 1 and "3 errors" in refused.stdout and "no request" in refused.stderr
    bad_drift = run_cli("--url", token_server, "--images", str(pets), "--drift", "fog")
    assert bad_drift.returncode == 2 and "invalid choice: 'fog'" in bad_drift.stderr


def test_the_module_imports_neither_prefect_nor_hydra():
    code = "import sys, mlops.traffic; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'hydra')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
