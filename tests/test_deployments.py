"""Every deployment in prefect.yaml points at an existing flow and its parameters are valid."""

from __future__ import annotations

import importlib
from pathlib import Path

import jsonschema
import pytest
import yaml
from prefect import Flow
from prefect.utilities.callables import parameter_schema

from flows.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def load_flow(entrypoint: str) -> Flow:
    path, name = entrypoint.split(":")
    assert (ROOT / path).is_file()
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_deployment_targets_a_flow_with_valid_parameters(deployment, monkeypatch, tmp_path):
    flow = load_flow(deployment["entrypoint"])
    assert isinstance(flow, Flow)
    parameters = deployment["parameters"]
    schema = parameter_schema(flow.fn).model_dump_for_openapi()
    jsonschema.validate(parameters, schema | {"additionalProperties": False})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    config = load_config(flow.name, parameters["env"], parameters["overrides"])
    assert config.environment == parameters["env"]


def test_pools_and_schedules_are_defined_once_and_reused():
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = document["definitions"]["work_pools"]
    for deployment in DEPLOYMENTS:
        assert deployment["work_pool"] in pools.values()
        assert deployment.get("enforce_parameter_schema") is True
    monitors = [d for d in DEPLOYMENTS if d["entrypoint"].startswith("flows/monitor.py")]
    assert monitors and all(d["schedules"] == [document["definitions"]["schedules"]["monitor_daily"]] for d in monitors)
    assert {d["entrypoint"] for d in DEPLOYMENTS} == {"flows/build.py:build", "flows/deploy.py:deploy", "flows/monitor.py:monitor"}
