"""`train=ddp` for real: Lightning DDP on 2 CPU processes (gloo), one model registered."""

from __future__ import annotations

import pytest
from conftest import copy_built
from mlflow import MlflowClient

from flows.build import build

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

MODEL = "digits"


def test_ddp_on_two_processes_passes_the_same_gate_and_registers_one_model(built, tmp_path):
    workspace = copy_built(built, tmp_path / "ws")
    uri = f"sqlite:///{workspace}/mlflow.db"
    mlflow = MlflowClient(uri, uri)
    experiment = mlflow.get_experiment_by_name(MODEL).experiment_id
    runs_before = {r.info.run_id for r in mlflow.search_runs([experiment])}
    versions_before = len(mlflow.search_model_versions(f"name = '{MODEL}'"))

    state = build(env="test", overrides=[
        f"paths.workspace={workspace}", "train=ddp", "train.accelerator=cpu", "train.devices=2",
        "train.precision=32-true", "train.num_workers=0", "train.max_epochs=3", "train.progress_bar=false",
    ], return_state=True)
    assert state.is_completed(), state.message  # the gate of env=test, as the single-process build
    result = state.result()

    new_runs = [r for r in mlflow.search_runs([experiment]) if r.info.run_id not in runs_before]
    trained = [r for r in new_runs if "val_accuracy_final" in r.data.metrics]
    assert len(trained) == 1  # rank 0 alone logged: one training run, not one per process
    (run,) = trained
    assert run.data.params["train.strategy"] == "ddp_spawn" and run.data.params["train.devices"] == "2"
    assert run.data.metrics["val_accuracy_final"] >= 0.5
    assert len(mlflow.search_model_versions(f"name = '{MODEL}'")) == versions_before + 1  # one model registered
    assert result.version == str(versions_before + 1)
