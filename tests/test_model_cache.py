"""The servers' model cache: one entry per registry and version, atomic downloads, and the ONNX
file's checksum recorded at registration checked before anything is served."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import register_tiny, tiny_classifier
from mlflow import MlflowClient

from mlops import registry as registry_module
from mlops.registry import ONNX_SHA256_TAG, ChecksumMismatch, cached_model, sha256_file
from mlops.serve.inference import ModelSpec, OnnxClassifier
from mlops.serve.server import load_served

MODEL = "digits"  # the registered model is named after the dataset


def version_of(uri: str, number: str = "1"):
    return MlflowClient(uri, uri).get_model_version(MODEL, number)


def stored_file(uri: str, number: str = "1") -> Path:
    """The ONNX file in the store's artifact folder (a local store keeps it beside the database)."""
    found = version_of(uri, number)
    root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    return next(path for path in root.rglob("model.onnx") if found.run_id in str(path))


@pytest.fixture(scope="module")
def other_onnx(tmp_path_factory) -> Path:
    """Another model with other class names: a different file from `tiny_onnx`."""
    from mlops.train.packaging import export_onnx

    spec = ModelSpec(("ant", "bee", "cow"), 16, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    return export_onnx(tiny_classifier(), spec, tmp_path_factory.mktemp("other") / "other.onnx", opset=18)


@pytest.fixture(scope="module")
def store(tiny_onnx, tmp_path_factory) -> str:
    return register_tiny(tiny_onnx, tmp_path_factory.mktemp("store"))[0]


def test_the_logged_requirements_are_given_not_inferred(tiny_onnx, tmp_path, monkeypatch):
    """MLflow's inference maps every installed package (seconds in a fresh process): never called."""
    import mlflow.models

    def inferred(*args, **kwargs):
        raise AssertionError("MLflow inferred the requirements")

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements", inferred)
    uri, _ = register_tiny(tiny_onnx, tmp_path)
    assert (stored_file(uri).parent / "requirements.txt").read_text().split() == registry_module.pip_requirements()


def test_registration_records_the_checksum_of_the_stored_file(store):
    recorded = version_of(store).tags[ONNX_SHA256_TAG]
    assert recorded == sha256_file(stored_file(store))
    # the requirements are given, not inferred by MLflow, and name what serving the flavour needs
    pins = (stored_file(store).parent / "requirements.txt").read_text().split()
    assert [pin.split("==")[0] for pin in pins] == ["mlflow", "numpy", "onnx", "onnxruntime"]
    assert all("==" in pin and pin.split("==")[1] for pin in pins)
    assert MlflowClient(store, store).get_run(version_of(store).run_id).data.tags[ONNX_SHA256_TAG] == recorded


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_two_registries_v1_of_one_name_get_their_own_cached_files(tiny_onnx, other_onnx, tmp_path):
    first, _ = register_tiny(tiny_onnx, tmp_path / "a")
    second, _ = register_tiny(other_onnx, tmp_path / "b")
    cache = tmp_path / "cache"

    served_first = load_served(first, MODEL, None, "1", cache)
    served_second = load_served(second, MODEL, None, "1", cache)
    assert served_first.model.spec.classes == ("cat", "dog", "fox")
    assert served_second.model.spec.classes == ("ant", "bee", "cow")
    # the first registry's entry is still its own file, and is what it serves on its next start
    assert load_served(first, MODEL, None, "1", cache).model.spec.classes == ("cat", "dog", "fox")
    entries = {sha256_file(path) for path in cache.glob("*/model.onnx")}
    assert entries == {version_of(first).tags[ONNX_SHA256_TAG], version_of(second).tags[ONNX_SHA256_TAG]}


def test_concurrent_downloads_of_one_version_all_get_a_whole_file(store, tmp_path, monkeypatch):
    """Eight servers starting 10 ms apart on an empty cache, each download slow (written in pieces
    over ~40 ms): most start while another is still downloading."""
    real = registry_module.download_model

    def slow_download(client, run_id, dest):
        path = real(client, run_id, dest / "fetch")
        data = path.read_bytes()
        target = dest / "model.onnx"
        with target.open("wb") as out:  # a partial file is visible while it is written
            for start in range(0, len(data), 512):
                out.write(data[start:start + 512])
                out.flush()
                threading.Event().wait(0.002)
        return target

    monkeypatch.setattr(registry_module, "download_model", slow_download)
    version, cache = version_of(store), tmp_path / "cache"
    expected = version.tags[ONNX_SHA256_TAG]

    def start(index):
        threading.Event().wait(index * 0.01)
        path = cached_model(MlflowClient(store, store), store, version, cache)
        return sha256_file(path), OnnxClassifier(path).spec.classes

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(start, range(8)))
    assert results == [(expected, ("cat", "dog", "fox"))] * 8
    assert not [p for p in cache.iterdir() if p.name.startswith(".download-")]  # no temporary left


def test_a_cached_file_changed_after_approval_is_refused(store, tmp_path):
    cache = tmp_path / "cache"
    path = cached_model(MlflowClient(store, store), store, version_of(store), cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="checksum mismatch: the cached model file") as refused:
        load_served(store, MODEL, None, "1", cache)
    assert version_of(store).tags[ONNX_SHA256_TAG] in str(refused.value) and "delete" in str(refused.value)


@pytest.mark.slow  # a real server process
def test_a_stored_file_changed_after_approval_stops_the_server(tiny_onnx, tmp_path):
    uri, _ = register_tiny(tiny_onnx, tmp_path / "store")
    stored = stored_file(uri)
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))

    done = subprocess.run(
        [sys.executable, "-m", "mlops.serve", "--tracking-uri", uri, "--model", MODEL, "--version", "1",
         "--port", "0", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=120, env=os.environ | {"MLOPS_API_TOKEN": "x"},
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load digits (1): ChecksumMismatch: checksum mismatch:"), done.stderr
    assert "the stored model file" in last and "Traceback" not in done.stderr
    assert not list((tmp_path / "cache").glob("*/model.onnx"))  # nothing unverified entered the cache


def test_a_version_registered_without_a_checksum_is_served_with_a_warning(tiny_onnx, tmp_path, caplog):
    uri, _ = register_tiny(tiny_onnx, tmp_path / "store")
    MlflowClient(uri, uri).delete_model_version_tag(MODEL, "1", ONNX_SHA256_TAG)  # as before checksums
    with caplog.at_level(logging.WARNING, logger="mlops.registry"):
        served = load_served(uri, MODEL, None, "1", tmp_path / "cache")
    assert served.model.spec.classes == ("cat", "dog", "fox")
    assert "no recorded checksum" in caplog.text and "unverified" in caplog.text
