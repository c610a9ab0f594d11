"""What every flow's config shares (names, stores, records, the service level) and how a config
is validated: `validate_config` turns a composed dict into a flow's schema or raises
`ConfigError` listing every problem by its dotted key path.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DURATION = r"^\d+(\.\d+)?[smhd]$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
DEPLOYMENT = r"^[^/]+/[^/]+$"
WINDOW = r"^(\d+(\.\d+)?[smhd]|all)$"  # a duration back from now, or all that is stored

# Keys that moved, so that an old override or YAML file gets the new name instead of "extra inputs".
RENAMED = {
    "thresholds.application.max_p95_latency_ms": "slo.max_p95_latency_ms",
    "thresholds.application": "deploy.app_tests",
    "thresholds": "gate",
    "deploy.mode": "action (validate | release | rollback | stop)",
    "deploy.state_dir": "paths.deploy",
    "deploy.app_test_concurrency": "deploy.app_tests.concurrency",
    "monitor.state_dir": "paths.monitor",
    "monitor.telemetry.max_p95_latency_ms": "slo.max_p95_latency_ms",
    "serve.records": "records",
}


def renamed(key: str) -> str | None:
    """The new name of an old dotted key (or of the section it lies in), None if it never moved."""
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            tail = key[len(old):]
            return new if " " in new else new + tail
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    workspace: Path  # every local store lives under here
    deploy: Path  # live servers, their logs, deploy reports
    monitor: Path  # alert and retrain memory, the monitored version's model

    @field_validator("workspace", "deploy", "monitor")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class MlflowConfig(Section):
    tracking_uri: str = Field(min_length=1)
    artifact_location: str | None = None
    experiment: str = Field(min_length=1)
    monitor_experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)
    candidate_alias: str = Field(min_length=1)
    approved_alias: str = Field(min_length=1)
    production_alias: str = Field(min_length=1)
    previous_alias: str = Field(min_length=1)


class DvcConfig(Section):
    repo: Path
    remote: str = Field(min_length=1)


def url_problem(url: str) -> str | None:
    """What is wrong with a store URL (a local path or an fsspec URL such as s3://bucket/prefix), or None."""
    from urllib.parse import urlsplit

    from fsspec.core import split_protocol
    from fsspec.registry import known_implementations, registry

    protocol, _ = split_protocol(url)
    if protocol is not None and protocol not in known_implementations and protocol not in registry:
        return f"'{protocol}://' is not a protocol fsspec knows (a local path, file://, s3://, gcs://, ...)"
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        return "the URL holds a password: credentials go in the environment (s3: the usual AWS_* variables), never in a config"
    return None


def store_url(url: str) -> str:
    """`url` checked (`url_problem`), a local path made absolute so a process finds it from any
    directory. Raises ValueError naming what is wrong."""
    problem = url_problem(url)
    if problem:
        raise ValueError(problem)
    return str(Path(url).expanduser().resolve()) if "://" not in url else url


class CapturesConfig(Section):
    """Where the model servers keep sampled inputs (`serve.capture`) and builds read them back."""

    url: str = Field(min_length=1)
    on_conflict: Literal["last", "drop"]  # two different labels for one request

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str) -> str:
        return store_url(url)


class RecordsConfig(Section):
    """What model servers record and the monitor reads: each server appends to its local `dir`
    and, with `url` (a store on another machine, e.g. s3://bucket/records), ships it there every
    `upload_s` seconds (`mlops.serve.records`)."""

    dir: Path
    max_mb: float = Field(gt=0.0)
    max_age_days: float = Field(gt=0.0)
    url: str | None = Field(default=None, min_length=1)
    upload_s: float = Field(default=30.0, gt=0.0)

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str | None) -> str | None:
        return None if url is None else store_url(url)

    @property
    def store(self) -> str | Path:
        """Where readers read: the store the servers ship to, else the local folder."""
        return self.url or self.dir


class SloConfig(Section):
    """The service level a served version must hold: tested before release, watched after."""

    max_p95_latency_ms: float = Field(gt=0.0)


class ChainConfig(Section):
    after_build: str | None = Field(default=None, pattern=DEPLOYMENT)
    after_validate: str | None = Field(default=None, pattern=DEPLOYMENT)


class CommonConfig(Section):
    """The part of `conf/base.yaml` every flow reads."""

    environment: str = Field(min_length=1)
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(ge=0)
    paths: PathsConfig
    mlflow: MlflowConfig
    dvc: DvcConfig
    records: RecordsConfig
    captures: CapturesConfig
    slo: SloConfig
    chain: ChainConfig


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


def schema_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of `schema`: its fields, and those of the sections inside it (a field
    holding a free mapping, such as `monitor.drift.features`, is one key: what is under it is
    checked by its own validator)."""
    keys = []
    for name, field in schema.model_fields.items():
        key = prefix + name
        keys.append(key)
        if typing.get_origin(field.annotation) is dict:
            continue
        options = typing.get_args(field.annotation) or (field.annotation,)  # X, or X | None
        nested = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            keys += schema_keys(nested[0], key + ".")
    return keys


def did_you_mean(key: str, known: Iterable[str]) -> str | None:
    """The known name closest to a mistyped one (`train.max_epoch` -> `train.max_epochs`,
    `modle` -> `model`), or None when nothing is close."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close and "." in key:  # the last part mistyped under a right parent: compare it alone
        parent, last = key.rsplit(".", 1)
        siblings = {k.rsplit(".", 1)[1]: k for k in known if k.startswith(parent + ".") and "." not in k[len(parent) + 1:]}
        close = [siblings[m] for m in difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.6)]
    return close[0] if close else None


def unknown_key(key: str, known: Iterable[str], what: str) -> str:
    """The problem line for a key that is not in `known`: renamed, a close name, or neither."""
    if renamed(key):
        return f"{key}: renamed to {renamed(key)}"
    close = did_you_mean(key, known)
    return f"{key}: not a key of {what}" + (f"; did you mean `{close}`?" if close else "")


def validate_config(raw: dict[str, Any], schema: type[Section]) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        keys = schema_keys(schema)
        raise ConfigError([_describe(e, keys) for e in error.errors()]) from None


def _describe(error: Any, keys: list[str]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return unknown_key(path, keys, "this config")
    elif error["type"] not in ("missing", "extra_forbidden") and "input" in error:
        message += f" (got {error['input']!r})"
    return f"{path}: {message}"
