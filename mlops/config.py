"""The typed schema every composed config is validated against before anything runs.

Hydra composes YAML into a plain dict; `validate_config` turns it into `Config` or raises
`ConfigError` listing every problem by its dotted key path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    workspace: Path

    @field_validator("workspace")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class MlflowConfig(Section):
    tracking_uri: str = Field(min_length=1)
    artifact_location: str | None = None
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)
    candidate_alias: str = Field(min_length=1)
    approved_alias: str = Field(min_length=1)
    production_alias: str = Field(min_length=1)
    previous_alias: str = Field(min_length=1)


class DvcConfig(Section):
    repo: Path
    remote: str = Field(min_length=1)


class ValidationPolicy(Section):
    policy: Literal["fail", "quarantine"]
    allowed_modes: list[str] = Field(min_length=1)
    min_image_size: int = Field(ge=1)
    min_images_per_class: int = Field(ge=3)
    max_class_imbalance: float = Field(ge=1.0)


class DataConfig(Section):
    source: Literal["digits", "imagefolder"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: Path | None = None
    version: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    input_size: int = Field(ge=8, le=1024)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)
    max_per_class: int | None = Field(default=None, ge=3)
    validation: ValidationPolicy

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std value must be > 0")
        return value

    @model_validator(mode="after")
    def _source_path(self) -> DataConfig:
        if self.source == "imagefolder" and self.path is None:
            raise ValueError("source 'imagefolder' needs data.path")
        return self


class ModelConfig(Section):
    name: str = Field(min_length=1)
    weights_path: Path | None = None

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from torchvision.models import list_models

        known = list_models()
        if value not in known:
            close = [m for m in known if value.split("_")[0] in m][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"'{value}' is not in torchvision's model registry{hint}")
        return value

    @field_validator("weights_path")
    @classmethod
    def _weights_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


class TrainConfig(Section):
    max_epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0.0)
    weight_decay: float = Field(ge=0.0)
    optimizer: Literal["adam", "adamw", "sgd"]
    num_workers: int = Field(ge=0)
    hflip: bool
    update_bn: bool
    accelerator: str
    devices: int | str | list[int]
    strategy: str
    num_nodes: int = Field(ge=1)
    precision: str
    deterministic: bool
    progress_bar: bool


class ExportConfig(Section):
    opset: int = Field(ge=13, le=23)
    parity_atol: float = Field(gt=0.0)
    parity_rtol: float = Field(ge=0.0)
    parity_images: int = Field(ge=1)
    latency_images: int = Field(ge=1)


class ApplicationThresholds(Section):
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_precision: float = Field(ge=0.0, le=1.0)
    min_macro_recall: float = Field(ge=0.0, le=1.0)
    max_p95_latency_ms: float = Field(gt=0.0)
    max_error_rate: float = Field(ge=0.0, le=1.0)


class Thresholds(Section):
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_class_recall: float = Field(ge=0.0, le=1.0)
    max_recall_gap: float = Field(ge=0.0, le=1.0)
    max_p95_latency_ms: float = Field(gt=0.0)
    max_accuracy_drop: float = Field(ge=0.0, le=1.0)
    max_macro_f1_drop: float = Field(ge=0.0, le=1.0)
    application: ApplicationThresholds


class RecordsConfig(Section):
    dir: Path
    max_mb: float = Field(gt=0.0)
    max_age_days: float = Field(gt=0.0)


class ServeConfig(Section):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_body_mb: float = Field(gt=0.0)
    max_pixels: int = Field(ge=1)
    max_batch_images: int = Field(ge=1)
    batch_max_size: int = Field(ge=1, le=1024)
    batch_max_wait_ms: float = Field(ge=0.0, le=1000.0)
    records: RecordsConfig


class KubernetesConfig(Section):
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field(min_length=1)
    replicas: int = Field(ge=1)
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    token_secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class DeployConfig(Section):
    mode: Literal["validate", "release"]
    target: Literal["local", "kubernetes"]
    ready_timeout_s: float = Field(gt=0.0)
    keep_test_server: bool
    app_test_concurrency: int = Field(ge=1, le=64)
    state_dir: Path
    manifests_dir: Path
    kubernetes: KubernetesConfig


class IntegrityRules(Section):
    min_width: int = Field(ge=1)
    max_width: int = Field(ge=1)
    min_height: int = Field(ge=1)
    max_height: int = Field(ge=1)
    allowed_content_types: list[str] = Field(min_length=1)
    max_rejected_share: float = Field(ge=0.0, le=1.0)


class FeatureDriftRule(Section):
    algorithm: Literal["ks", "hellinger", "chi-square"]
    threshold: float = Field(gt=0.0, le=1.0)


class DriftRules(Section):
    min_requests: int = Field(ge=1)
    default_algorithm: Literal["ks", "hellinger"]
    default_threshold: float = Field(gt=0.0, le=1.0)
    features: dict[str, FeatureDriftRule]
    max_drift_share: float = Field(ge=0.0, le=1.0)

    @field_validator("features")
    @classmethod
    def _known_features(cls, value: dict[str, FeatureDriftRule]) -> dict[str, FeatureDriftRule]:
        from mlops.features import FEATURES

        known = {*FEATURES, "prediction", "confidence"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {sorted(known)}")
        return value


class PerformanceRules(Section):
    min_labels: int = Field(ge=1)
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_precision: float = Field(ge=0.0, le=1.0)
    min_macro_recall: float = Field(ge=0.0, le=1.0)


class TelemetryRules(Section):
    max_p95_latency_ms: float = Field(gt=0.0)
    max_error_rate: float = Field(ge=0.0, le=1.0)
    min_request_rate_per_min: float = Field(ge=0.0)


class BiasRules(Section):
    max_recall_gap: float = Field(ge=0.0, le=1.0)
    max_prediction_shift: float = Field(ge=0.0, le=1.0)


MonitorSection = Literal["integrity", "drift", "performance", "telemetry", "bias"]
DURATION = r"^\d+(\.\d+)?[smhd]$"


class AlertPolicy(Section):
    sections: list[MonitorSection]
    sinks: list[Literal["log", "webhook", "slack"]]
    webhook_url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    slack_url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    quiet_period: str = Field(pattern=DURATION)
    report_base_url: str | None = None


class RetrainPolicy(Section):
    sections: list[MonitorSection]
    mode: Literal["deployment", "in_process", "auto"]
    deployment: str = Field(pattern=r"^[^/]+/[^/]+$")
    overrides: list[str]
    cooldown: str = Field(pattern=DURATION)


class MonitorConfig(Section):
    window: str = Field(pattern=DURATION)
    version: int | None = Field(default=None, ge=1)
    state_dir: Path
    integrity: IntegrityRules
    drift: DriftRules
    performance: PerformanceRules
    telemetry: TelemetryRules
    bias: BiasRules
    alerts: AlertPolicy
    retrain: RetrainPolicy


class ChainConfig(Section):
    after_build: str | None = Field(default=None, pattern=r"^[^/]+/[^/]+$")
    after_validate: str | None = Field(default=None, pattern=r"^[^/]+/[^/]+$")


class Config(Section):
    environment: str = Field(min_length=1)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(ge=0)
    paths: PathsConfig
    mlflow: MlflowConfig
    dvc: DvcConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig
    thresholds: Thresholds
    serve: ServeConfig
    deploy: DeployConfig
    monitor: MonitorConfig
    chain: ChainConfig


class BuildConfig(Config):
    force: bool
    trigger: str | None = None


class DeployJob(Config):
    action: Literal["release", "rollback", "stop"]


# The schema of each primary config under conf/.
SCHEMAS: dict[str, type[Config]] = {"build": BuildConfig, "deploy": DeployJob, "monitor": Config}


def secret(variable: str | None) -> str | None:
    """The value of the environment variable a config names for a secret (None when it names none).

    Raises ValueError when the variable is named but unset or empty.
    """
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} is not set or empty")
    return value


class ConfigError(ValueError):
    """A config that does not match the schema; `problems` are 'dotted.path: message' lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  {p}" for p in problems))


def validate_config(raw: dict[str, Any], schema: type[Config] = Config) -> Config:
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_describe(e) for e in error.errors()]) from None


def _describe(error: Any) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] not in ("missing", "extra_forbidden") and "input" in error:
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"
