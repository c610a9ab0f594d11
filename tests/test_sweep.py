"""Sweeps that choose: the pure rules of `mlops.sweep`, and an Optuna search run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from mlops.sweep import Job, best, objective, table, varying

ROOT = Path(__file__).resolve().parents[1]


def job(number, overrides, gate="passed", **metrics):
    return Job(number, overrides, metrics=metrics, gate=gate, run_id=f"run{number}", data_version="d1")


JOBS = [
    job(0, ["model=resnet18", "train.max_epochs=1"], val_accuracy_final=0.80, val_loss=0.5, test_accuracy=0.79),
    job(1, ["model=resnet18", "train.max_epochs=2"], val_accuracy_final=0.90, val_loss=0.3, test_accuracy=0.85),
    job(2, ["model=mobilenet_v3_small", "train.max_epochs=1"], "failed", val_accuracy_final=0.95, val_loss=0.2, test_accuracy=0.4),
    job(3, ["model=mobilenet_v3_small", "train.max_epochs=2"], val_accuracy_final=0.90, val_loss=0.1, test_accuracy=0.9),
]


def test_best_is_the_best_passing_job_in_the_configured_direction():
    assert best(JOBS, "val_accuracy_final", "maximize").number == 1  # job 2 is better but failed; 3 ties, later
    assert best(JOBS, "val_loss", "minimize").number == 3
    assert best(JOBS, "val_loss", "maximize").number == 0


def test_no_passing_job_chooses_none_and_the_table_says_so():
    failed = [job(0, ["a=1"], "failed", m=1.0), Job(1, ["a=2"], error="RuntimeError: boom")]
    assert best(failed, "m", "maximize") is None
    text = table(failed, "m", "maximize", None)
    assert "No job passed the gate: no alias moved." in text
    assert "| 1 | 2 | - | - | error: RuntimeError: boom | - |" in text


def test_table_shows_the_varying_overrides_the_metrics_and_marks_the_best():
    chosen = best(JOBS, "val_accuracy_final", "maximize")
    text = table(JOBS, "val_accuracy_final", "maximize", chosen)
    assert "| job | model | train.max_epochs | val_accuracy_final | test_accuracy | gate | run |" in text
    assert "| 1 (best) | resnet18 | 2 | 0.9 | 0.85 | passed | `run1` |" in text
    assert "| 2 | mobilenet_v3_small | 1 | 0.95 | 0.4 | failed | `run2` |" in text
    assert "Best: job 1 (model=resnet18 train.max_epochs=2), val_accuracy_final 0.9." in text


def test_only_overrides_that_vary_are_columns():
    jobs = [job(0, ["env=test", "x=1", "y=a"]), job(1, ["env=test", "x=2", "y=a"]), job(2, ["env=test", "x=3"])]
    assert varying(jobs) == ["x", "y"]  # y is missing from job 2


def test_a_sampled_float_is_shown_short():
    jobs = [job(0, ["train.learning_rate=0.0011155792840695788"], m=1.0), job(1, ["train.learning_rate=0.01"], m=2.0)]
    assert "| 0 | 0.001116 | 1 |" in table(jobs, "m", "maximize", None)


def test_objective_names_the_metrics_there_are():
    assert objective({"val_loss": 0.2}, "val_loss") == 0.2
    with pytest.raises(KeyError, match=r"sweep.metric=val_acc: the build logged no such metric \(it logged test_accuracy, val_loss\)"):
        objective({"val_loss": 0.2, "test_accuracy": 0.9}, "val_acc")
    with pytest.raises(KeyError):
        objective({"val_loss": float("nan")}, "val_loss")


@pytest.mark.slow
def test_optuna_search_of_three_trials_ingests_once_and_registers_the_best_trial(tmp_path):
    env = os.environ | {"MLOPS_WORKSPACE": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    process = subprocess.run(
        [sys.executable, "-m", "flows.build", "search=optuna", "hydra.sweeper.n_trials=3", "train.max_epochs=1",
         "train.progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("mlops.flow") == "build-sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if "mlops.train_key" in r.data.tags]  # trained: the 3 trials, not the final build
    assert len(trials) == 3 and len(children) == 4
    assert len({r.data.tags["mlops.data_version"] for r in children}) == 1
    assert process.stderr.count("checked out pinned data version") == 3  # trials 1 and 2, and the registration
    assert len({r.data.params["train.learning_rate"] for r in trials}) == 3  # Optuna chose three points

    passing = [r for r in trials if r.data.tags["mlops.gate"] == "passed"]
    winner = max(passing, key=lambda r: (r.data.metrics["val_accuracy_final"], -r.info.start_time))
    results = yaml.safe_load((tmp_path / "sweeps" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(r.data.metrics["val_accuracy_final"] for r in trials))
    (model,) = client.search_registered_models()
    candidate = client.get_model_version_by_alias(model.name, "candidate")
    assert candidate.run_id == winner.info.run_id  # the final build reused the winning trial's model
    assert parent.data.tags["mlops.sweep.best_run_id"] == winner.info.run_id
    assert "(best)" in process.stdout and f"`{winner.info.run_id}`" in process.stdout
