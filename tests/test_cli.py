"""The README's commands, run as a user runs them: a subprocess, Prefect's ephemeral API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sweep_runs_one_flow_per_model_and_registers_each(tmp_path):
    env = os.environ | {"MLOPS_WORKSPACE": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run(
        [sys.executable, "-m", "flows.build", "-m", "model=resnet18,mobilenet_v3_small", "train.progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri, uri)
    versions = client.search_model_versions("name = 'image-classifier'")
    models = sorted(client.get_run(v.run_id).data.params["model.name"] for v in versions)
    assert models == ["mobilenet_v3_small", "resnet18"]
