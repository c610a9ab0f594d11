"""The deploy flow's schema: the server, where it runs, the application tests and the action."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator

from mlops.config.common import CommonConfig, Section
from mlops.config.serve import ServeConfig

Action = Literal["validate", "release", "rollback", "stop", "approve", "reject", "shadow"]


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


class CanaryStep(Section):
    share: float = Field(gt=0.0, lt=1.0)  # of requests sent to the new version during this bake
    bake_s: float = Field(gt=0.0)  # watched this long (and until min_requests reached the new version)


class CanarySettings(Section):
    """`deploy.strategy: canary`: the new version takes each step's share of requests, in the same
    server process as the old one, and is judged against it before the next (`mlops.deploy.canary`)."""

    steps: list[CanaryStep] = Field(min_length=1)  # then 100%: the alias moves
    min_requests: int = Field(ge=1)  # per bake, on the new version, before it is judged
    max_wait_s: float = Field(gt=0.0)  # a bake that never sees min_requests is rolled back after this
    poll_s: float = Field(gt=0.0)
    max_error_rate_increase: float = Field(ge=0.0, le=1.0)  # new minus old error rate
    max_p95_ratio: float = Field(ge=1.0)  # new p95 latency over old
    max_prediction_shift: float = Field(ge=0.0, le=1.0)  # total variation between the class shares
    max_accuracy_drop: float = Field(ge=0.0, le=1.0)  # where /feedback labelled requests of both
    min_labelled: int = Field(ge=1)  # labelled requests per version before accuracy is judged
    alpha: float = Field(gt=0.0, lt=1.0)  # a shift or drop over its bound must be this unlikely by chance

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        shares = [step.share for step in steps]
        if shares != sorted(set(shares)):
            raise ValueError(f"canary shares must increase step by step: {shares}")
        return steps


class ShadowSettings(Section):
    """`action=shadow version=N`: N answers a sampled copy of production requests, never returned."""

    sample_rate: float = Field(gt=0.0, le=1.0)


class DeploySettings(Section):
    target: Literal["local", "kubernetes"]
    actions: list[Action] = Field(min_length=1)  # what this environment may do
    ready_timeout_s: float = Field(gt=0.0)
    keep_test_server: bool
    approval: Literal["auto", "manual"]  # manual: a person approves each release (mlops.deploy.approval)
    approval_timeout_s: float = Field(gt=0.0)  # a paused release waits this long for the decision
    strategy: Literal["blue_green", "canary"]
    canary: CanarySettings
    shadow: ShadowSettings
    app_tests: AppTests
    manifests_dir: Path
    kubernetes: KubernetesConfig


class DeployConfig(CommonConfig):
    serve: ServeConfig
    deploy: DeploySettings
    action: Action
    version: Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) else v)] | None = Field(
        default=None, pattern=r"^[1-9][0-9]*$")  # approve, reject, shadow: which version (a number)
    reviewer: str | None = None  # approve, reject: who decides (default: the user running the command)
    comment: str | None = None  # approve, reject: why

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
