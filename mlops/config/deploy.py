"""The deploy flow's schema: the server, where it runs, the application tests and the action."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from mlops.config.common import CommonConfig, Section
from mlops.config.serve import ServeConfig

Action = Literal["validate", "release", "rollback", "stop"]


class KubernetesConfig(Section):
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field(min_length=1)
    replicas: int = Field(ge=1)
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    token_secret: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    tls_secret: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    ingress_host: str | None = Field(default=None, pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    ingress_class: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class AppTests(Section):
    """The served model over HTTP on its own test split (latency: `slo.max_p95_latency_ms`)."""

    concurrency: int = Field(ge=1, le=64)
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_precision: float = Field(ge=0.0, le=1.0)
    min_macro_recall: float = Field(ge=0.0, le=1.0)
    max_error_rate: float = Field(ge=0.0, le=1.0)


class DeploySettings(Section):
    target: Literal["local", "kubernetes"]
    actions: list[Action] = Field(min_length=1)  # what this environment may do
    ready_timeout_s: float = Field(gt=0.0)
    keep_test_server: bool
    app_tests: AppTests
    manifests_dir: Path
    kubernetes: KubernetesConfig


class DeployConfig(CommonConfig):
    serve: ServeConfig
    deploy: DeploySettings
    action: Action

    @field_validator("action")
    @classmethod
    def _allowed(cls, action: str, info: ValidationInfo) -> str:
        deploy, environment = info.data.get("deploy"), info.data.get("environment")
        if deploy is not None and action not in deploy.actions:
            raise ValueError(
                f"'{action}' is not an action of environment '{environment}'"
                f" (deploy.actions: {', '.join(deploy.actions)})"
            )
        return action


class TrafficSettings(Section):
    """What `python -m flows.traffic` replays against an environment's live server."""

    drift: Literal["none", "brightness", "noise", "blur", "jpeg", "rotation", "class_mix"]
    strength: float = Field(ge=0.0, le=1.0)
    requests: int | None = Field(ge=1)  # None: each test image once
    feedback: float = Field(ge=0.0, le=1.0)  # share of answered requests labelled through /feedback
    concurrency: int = Field(ge=1, le=64)
    seed: int = Field(ge=0)
    target: str | None = None  # class_mix: the class sent most


class TrafficConfig(DeployConfig):
    """The environment's deploy config (its live server, token variable and stores), plus the replay."""

    traffic: TrafficSettings
