"""The monitor flow's schema: the window, the bounds per section, alerts and retraining."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlops.config.common import DEPLOYMENT, DURATION, ENV_NAME, WINDOW, CommonConfig, Section

BLOCK_NAME = re.compile(r"[a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*")  # Prefect's block slugs and names
MonitorSection = Literal["integrity", "drift", "performance", "telemetry", "bias"]


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


class OutputDriftRule(Section):
    alpha: float = Field(gt=0.0, lt=1.0)  # BBSD: drift when the Bonferroni-adjusted p-value < alpha


class EmbeddingDriftRule(Section):
    method: Literal["mmd", "classifier"]
    alpha: float = Field(gt=0.0, lt=1.0)  # drift when the p-value < alpha
    permutations: int = Field(ge=20, le=10000)  # mmd only


class DriftRules(Section):
    min_requests: int = Field(ge=1)
    default_algorithm: Literal["ks", "hellinger"]
    default_threshold: float = Field(gt=0.0, le=1.0)
    features: dict[str, FeatureDriftRule]
    max_drift_share: float = Field(ge=0.0, le=1.0)
    outputs: OutputDriftRule
    embedding: EmbeddingDriftRule

    @field_validator("features")
    @classmethod
    def _known_features(cls, value: dict[str, FeatureDriftRule]) -> dict[str, FeatureDriftRule]:
        from mlops.serve.features import FEATURES

        known = {*FEATURES, "prediction"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown features {unknown}; known: {sorted(known)}")
        return value


class PerformanceRules(Section):
    min_labels: int = Field(ge=1)
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_precision: float = Field(ge=0.0, le=1.0)
    min_macro_recall: float = Field(ge=0.0, le=1.0)
    estimate: bool  # judge the accuracy estimated from calibrated confidences (CBPE) against min_accuracy


class TelemetryRules(Section):
    max_error_rate: float = Field(ge=0.0, le=1.0)
    min_request_rate_per_min: float = Field(ge=0.0)


class BiasRules(Section):
    max_recall_gap: float = Field(ge=0.0, le=1.0)
    class_recall_confidence: float = Field(default=0.0, ge=0.0, lt=1.0)  # as the build gate's
    max_prediction_shift: float = Field(ge=0.0, le=1.0)


class AlertPolicy(Section):
    sections: list[MonitorSection]
    sinks: list[Literal["log", "webhook", "slack", "prefect"]]
    webhook_url_env: str = Field(pattern=ENV_NAME)
    slack_url_env: str = Field(pattern=ENV_NAME)
    # sink `prefect`: Prefect notification blocks (Slack, Teams, email, PagerDuty, a webhook...),
    # made in the Prefect UI (Blocks) and named here as <block type slug>/<block name>
    prefect_blocks: list[str] = Field(default_factory=list)
    quiet_period: str = Field(pattern=DURATION)
    report_base_url: str | None = None

    @field_validator("prefect_blocks")
    @classmethod
    def _block_names(cls, blocks: list[str]) -> list[str]:
        bad = [b for b in blocks if not BLOCK_NAME.fullmatch(b)]
        if bad:
            raise ValueError(f"{bad}: name each block as <block type slug>/<block name>, e.g. slack-webhook/ops-alerts")
        return blocks

    @model_validator(mode="after")
    def _blocks_for_the_prefect_sink(self) -> AlertPolicy:
        if "prefect" in self.sinks and not self.prefect_blocks:
            raise ValueError("sink 'prefect' needs prefect_blocks: the notification blocks to send through")
        return self


class RetrainPolicy(Section):
    sections: list[MonitorSection]
    mode: Literal["deployment", "in_process", "auto"]
    deployment: str = Field(pattern=DEPLOYMENT)
    overrides: list[str]
    cooldown: str = Field(pattern=DURATION)
    production: str | None = Field(default=None, pattern=WINDOW)  # the build's data.production
    min_labelled: int = Field(default=0, ge=0)


class LabellingPolicy(Section):
    """Active labelling: the least confident unlabelled captures, exported for a person."""

    export: int = Field(ge=0)  # per monitor run; 0: none
    format: Literal["folder", "label_studio"]
    dir: Path


class MonitorSettings(Section):
    window: str = Field(pattern=DURATION)
    version: int | None = Field(default=None, ge=1)
    integrity: IntegrityRules
    drift: DriftRules
    performance: PerformanceRules
    telemetry: TelemetryRules
    bias: BiasRules
    alerts: AlertPolicy
    retrain: RetrainPolicy
    labelling: LabellingPolicy


class MonitorConfig(CommonConfig):
    monitor: MonitorSettings
