"""Typed config: the sections every flow shares and one schema per flow.

Hydra composes `conf/<flow>.yaml` into a plain dict; `validate_config(raw, SCHEMAS[flow])` turns
it into that flow's typed config or raises `ConfigError` naming every problem by its dotted key.
A flow's schema holds only the sections it reads, so deploy and monitor never validate (or
import what validates) training settings.
"""

from mlops.config.build import BuildConfig, DataConfig, ExportConfig, GateThresholds, ModelConfig, SweepConfig, TrainConfig, ValidationPolicy
from mlops.config.common import (
    CommonConfig,
    ConfigError,
    DvcConfig,
    MlflowConfig,
    RecordsConfig,
    renamed,
    secret,
    validate_config,
)
from mlops.config.deploy import AppTests, DeployConfig, KubernetesConfig, TrafficConfig
from mlops.config.monitor import MonitorConfig, MonitorSettings
from mlops.config.serve import ServeConfig

SCHEMAS: dict[str, type[CommonConfig]] = {
    "build": BuildConfig, "deploy": DeployConfig, "monitor": MonitorConfig, "traffic": TrafficConfig,
}

__all__ = [
    "SCHEMAS", "AppTests", "BuildConfig", "CommonConfig", "ConfigError", "DataConfig", "DeployConfig", "DvcConfig",
    "ExportConfig", "GateThresholds", "SweepConfig", "KubernetesConfig", "MlflowConfig", "ModelConfig", "MonitorConfig", "MonitorSettings",
    "RecordsConfig", "ServeConfig", "TrafficConfig", "TrainConfig", "ValidationPolicy", "renamed", "secret", "validate_config",
]
