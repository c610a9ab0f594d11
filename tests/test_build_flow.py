"""End-to-end: the real build flow with the real Prefect engine, a sqlite MLflow store and DVC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import copy_built
from mlflow import MlflowClient

from flows.build import build
from mlops.data.ingest import load_prepared
from mlops.data.layout import dataset_dir
from mlops.serve.inference import OnnxClassifier
from mlops.train import evaluation

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

MODEL = "digits"  # the registered model is named after the dataset


@pytest.fixture(scope="module")
def workspace(built, tmp_path_factory) -> Path:
    return copy_built(built, tmp_path_factory.mktemp("build-ws") / "ws")


def client_for(workspace: Path) -> MlflowClient:
    uri = f"sqlite:///{workspace}/mlflow.db"
    return MlflowClient(uri, uri)


def run_build(workspace: Path, *overrides: str):
    return build(env="test", overrides=[f"paths.workspace={workspace}", "train.progress_bar=false", *overrides], return_state=True)


def gate_report(client: MlflowClient, run_id: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "gate/report.json")).read_text())


@pytest.fixture(scope="module")
def first_build(built):
    return built[1]


def test_build_registers_a_candidate_with_its_lineage(first_build, workspace):
    client = client_for(workspace)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert str(version.version) == first_build.version == "1"
    tags = version.tags
    assert tags["data_version"] == first_build.data_version and len(tags["data_version"]) == 32
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"
    assert tags["git_dirty"] in ("True", "False")
    assert tags["gate"] == "passed" and tags["build_run_id"] == first_build.run_id
    assert f"data.version={first_build.data_version}" in version.description  # the model card
    assert "| check | value | bound | verdict |" in version.description
    # build never touches production
    assert "production" not in client.get_registered_model(MODEL).aliases

    run = client.get_run(first_build.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlops.data_version"] == first_build.data_version
    assert run.data.metrics["test_accuracy"] >= 0.5
    assert "val_accuracy" in run.data.metrics  # per-epoch metrics from Lightning
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "data", "evaluation", "gate", "model", "weights"} <= artifacts
    resolved = Path(client.download_artifacts(run.info.run_id, "config/resolved.yaml")).read_text()
    assert "max_epochs: 3" in resolved and "environment: test" in resolved
    assert gate_report(client, run.info.run_id)["sections"]["gate"][-1]["verdict"] == "skipped"


def test_registered_model_loads_with_mlflow_onnx_flavour(first_build, workspace, monkeypatch):
    import mlflow.onnx

    uri = f"sqlite:///{workspace}/mlflow.db"
    # set_tracking_uri also exports MLFLOW_TRACKING_URI: monkeypatch takes it back after the test
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.onnx.load_model(f"models:/{MODEL}@candidate")
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    keys = {p.key for p in model.metadata_props}
    assert "mlops.spec" in keys


def test_second_identical_build_reuses_the_trained_model(first_build, workspace):
    client = client_for(workspace)
    state = run_build(workspace)
    assert state.is_completed(), state.message
    again = state.result()
    assert again.reused_run_id == first_build.run_id
    assert again.version == first_build.version  # no duplicate registry version
    assert "mlops.train_key" not in client.get_run(again.run_id).data.tags  # nothing was trained
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1


def test_impossible_threshold_fails_the_flow_without_candidate(first_build, workspace):
    client = client_for(workspace)
    state = run_build(workspace, "gate.max_p95_latency_ms=0.0001", "train.learning_rate=0.002")
    assert state.is_failed()
    assert "p95_latency_ms" in state.message
    failed = client.search_runs(
        [client.get_experiment_by_name(MODEL).experiment_id], "tags.`mlops.gate` = 'failed'"
    )[0]
    assert failed.info.status == "FAILED"
    assert gate_report(client, failed.info.run_id)["passed"] is False
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == first_build.version
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 1


def test_gate_compares_with_the_production_model_on_the_same_split(first_build, workspace):
    client = client_for(workspace)
    client.set_registered_model_alias(MODEL, "production", first_build.version)
    state = run_build(
        workspace, "train.learning_rate=0.003", "gate.max_accuracy_drop=0.5", "gate.max_macro_f1_drop=0.5",
        "train.num_workers=1",  # data loader worker processes inside a Prefect task
    )
    assert state.is_completed(), state.message
    result = state.result()
    checks = {c["name"]: c for c in gate_report(client, result.run_id)["sections"]["gate"]}

    # evaluate production independently on the test split of the same data version
    prepared = load_prepared(dataset_dir(workspace / "dvc", "digits"))
    onnx_path = Path(client.download_artifacts(first_build.run_id, "model/model.onnx", str(workspace / "check")))
    production = evaluation.evaluate(OnnxClassifier(onnx_path), prepared.files("test"), 1)
    assert checks["accuracy_vs_production"]["bound"] == pytest.approx(production.accuracy - 0.5, abs=1e-6)
    assert checks["accuracy_vs_production"]["verdict"] == "pass"
    assert checks["macro_f1_vs_production"]["bound"] == pytest.approx(production.macro_f1 - 0.5, abs=1e-6)
    assert "production v1" in checks["accuracy_vs_production"]["note"]
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == result.version == "2"
    assert str(client.get_model_version_by_alias(MODEL, "production").version) == "1"


def test_pinned_data_version_reproduces_the_dataset(first_build, workspace):
    # a new data version, gated to fail: only the data it versioned is looked at here
    state = run_build(workspace, "data.max_per_class=20", "gate.min_accuracy=1.0", "gate.max_accuracy_drop=0.0")
    assert state.is_failed() and "accuracy" in state.message
    assert load_prepared(dataset_dir(workspace / "dvc", "digits")).counts["test"]["0"] == 3

    pinned = run_build(workspace, f"data.version={first_build.data_version}")
    assert pinned.is_completed(), pinned.message
    result = pinned.result()
    assert result.data_version == first_build.data_version
    assert result.reused_run_id == first_build.run_id  # same data, config and code: same model
    prepared = load_prepared(dataset_dir(workspace / "dvc", "digits"))
    assert sum(prepared.counts["test"].values()) == 60


def test_asking_for_production_images_where_none_are_labelled_is_a_clear_error(first_build, workspace, tmp_path):
    state = run_build(workspace, "data.production=24h", f"captures.url={tmp_path / 'no-captures'}")
    assert state.is_failed()
    assert "data.production=24h" in state.message and "no labelled production image" in state.message
    assert "python -m flows.label import" in state.message  # and how to get some


def test_the_validation_figure_after_batchnorm_re_estimation_is_logged(first_build, workspace):
    """The progress bar's val_accuracy is taken before BatchNorm statistics are re-estimated;
    the figure after it is the one the gate's numbers agree with."""
    metrics = client_for(workspace).get_run(first_build.run_id).data.metrics
    assert 0.0 <= metrics["val_accuracy_final"] <= 1.0 and "val_accuracy" in metrics
