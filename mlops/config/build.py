"""The build flow's schema: data, model, training, export and the gate, over the common sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mlops.config.common import WINDOW, CommonConfig, Section


class ValidationPolicy(Section):
    policy: Literal["fail", "quarantine"]
    allowed_modes: list[str] = Field(min_length=1)
    min_image_size: int = Field(ge=1)
    min_images_per_class: int = Field(ge=3)
    max_class_imbalance: float = Field(ge=1.0)


class HoldoutConfig(Section):
    """How the production holdout is taken from the labelled production images."""

    split: Literal["time", "stratified"]  # the newest share, or a seeded share of each class
    share: float = Field(gt=0.0, lt=1.0)


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
    max_per_class: int | None = Field(default=None, ge=3)  # caps the source, never production images
    classes: list[str] | None = Field(default=None, min_length=2)  # these class folders only (null: all)
    validation: ValidationPolicy
    production: str | None = Field(default=None, pattern=WINDOW)  # labelled production images to add
    holdout: HoldoutConfig

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, value):
        # digit folders are named 0..9: data.classes=[0,1,2] from the command line means those names
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value] if isinstance(value, list) else value

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
        if self.production is not None and self.version is not None:
            raise ValueError(
                f"data.production={self.production} with data.version: a pinned version already holds its"
                " production images; drop one of them"
            )
        return self


class ModelConfig(Section):
    name: str = Field(min_length=1)
    weights_path: Path | None = None

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from torchvision.models import list_models  # only the build flow pays for this import

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
    lr_schedule: Literal["cosine", "constant"]
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
    embedding_dims: int = Field(ge=2, le=256)
    projection_images: int = Field(ge=2)


class GateThresholds(Section):
    """The build gate: absolute bounds on the test split, then change bounds against production."""

    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_class_recall: float = Field(ge=0.0, le=1.0)
    max_recall_gap: float = Field(ge=0.0, le=1.0)
    # both judged on what each class's test images can show: the bounds of its recall's interval
    # at this confidence (Wilson score); 0 judges the recalls themselves
    class_recall_confidence: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_p95_latency_ms: float = Field(gt=0.0)
    max_accuracy_drop: float = Field(ge=0.0, le=1.0)
    max_macro_f1_drop: float = Field(ge=0.0, le=1.0)
    # on the production holdout (labelled production images, newest share), when there is one
    min_holdout_gain: float = Field(default=0.05, ge=-1.0, le=1.0)
    min_holdout_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    # a version whose classes differ from the production version's is refused unless this is true
    allow_other_classes: bool = False


class SweepConfig(Section):
    """A `-m` run (a grid or `search=optuna`): the metric that chooses the job the candidate
    alias goes to, among the jobs that pass the gate."""

    metric: str = Field(min_length=1)
    direction: Literal["maximize", "minimize"]


class BuildConfig(CommonConfig):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig
    gate: GateThresholds
    sweep: SweepConfig
    force: bool
    trigger: str | None = None
