"""Register: MLflow runs, the ONNX model flavour, model versions, their lineage and aliases.

Run ids are passed explicitly and every call goes through `MlflowClient`, so nothing depends on
MLflow's thread-local "active run" (Prefect runs tasks in threads).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from mlops.config import MlflowConfig
from mlops.inference import OnnxClassifier

MODEL_ARTIFACT = "model"
REFERENCE_ARTIFACT = "reference"
ONNX_FILE = "model.onnx"
TRAIN_KEY_TAG = "mlops.train_key"
PACKAGED_TAG = "mlops.packaged"


def connect(settings: MlflowConfig) -> tuple[MlflowClient, str]:
    """A client for the configured store, and the experiment id (created on first use)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    location = settings.artifact_location
    if location is None and settings.tracking_uri.startswith("sqlite:///"):
        # a local database keeps its artifacts beside it, never in the working directory
        location = str(Path(settings.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    if location and "://" not in location:
        location = Path(location).resolve().as_uri()
    return client, client.create_experiment(settings.experiment, artifact_location=location)


def start_run(client: MlflowClient, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


def log_flat(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, object] | None = None,
    tags: dict[str, object] | None = None,
) -> None:
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def find_reusable_run(client: MlflowClient, experiment_id: str, train_key: str) -> str | None:
    """The newest run that trained and packaged a model under the same train key, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{train_key}' and tags.`{PACKAGED_TAG}` = 'true'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def log_onnx_model(client: MlflowClient, run_id: str, onnx_path: Path, example: np.ndarray) -> None:
    """Log the ONNX file in MLflow's ONNX flavour under the run's `model/` artifact path."""
    model = onnx.load(str(onnx_path))
    signature = infer_signature(example, OnnxClassifier(onnx_path).logits(example))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / MODEL_ARTIFACT
        mlflow.onnx.save_model(model, str(target), signature=signature, save_as_external_data=False)
        client.log_artifacts(run_id, str(target), MODEL_ARTIFACT)
    client.set_tag(run_id, PACKAGED_TAG, "true")


def download_model(client: MlflowClient, run_id: str, dest: Path) -> Path:
    """The ONNX file logged by `run_id`, downloaded under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    local = client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/{ONNX_FILE}", str(dest))
    return Path(local)


def download_reference(client: MlflowClient, run_id: str, dest: Path) -> Path | None:
    """The run's monitoring reference folder, or None if it has none (an older version)."""
    if not any(a.path == REFERENCE_ARTIFACT for a in client.list_artifacts(run_id)):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(dest)))


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str


def get_alias(client: MlflowClient, name: str, alias: str) -> VersionRef | None:
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return VersionRef(name, str(version.version), version.run_id)


def register(
    client: MlflowClient,
    name: str,
    source_run_id: str,
    tags: dict[str, object],
    description: str,
) -> tuple[VersionRef, bool]:
    """Register the model of `source_run_id` (or reuse its existing version); returns (version, created)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Image classifier built by the build flow")
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{source_run_id}'")
    if existing:
        version, created = existing[0], False
    else:
        source = f"{client.get_run(source_run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
        version = client.create_model_version(name, source, run_id=source_run_id)
        created = True
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    client.update_model_version(name, version.version, description=description)
    return VersionRef(name, str(version.version), source_run_id), created


def model_card(
    name: str,
    data_version: str,
    data_counts: dict[str, dict[str, int]],
    evaluation: dict,
    gate_markdown: str,
    lineage: dict[str, str],
    reproduce: str,
) -> str:
    per_class = "\n".join(
        f"| {cls} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
        for cls, s in evaluation["per_class"].items()
    )
    splits = ", ".join(f"{split} {sum(c.values())}" for split, c in data_counts.items())
    lines = "\n".join(f"- {key}: `{value}`" for key, value in lineage.items())
    return f"""# Model card: {name}

## Data
Data version (DVC): `{data_version}`; images per split: {splits}; classes: {len(evaluation['per_class'])}.

## Test metrics
Accuracy {evaluation['accuracy']:.4f}, macro F1 {evaluation['macro_f1']:.4f}, p95 latency {evaluation['latency_p95_ms']:.2f} ms (ONNX Runtime, one image per call).

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

## Gate
{gate_markdown}

## Lineage
{lines}

## Reproduce
```
{reproduce}
```
"""


def to_json(payload: object) -> str:
    return json.dumps(payload, indent=2, sort_keys=True, default=str)
