"""Composes a flow's config with Hydra and validates it against that flow's schema.

Besides the CLI shims, this is the only module that knows about Hydra: flows take JSON-friendly
parameters (an environment and a list of overrides) and call `load_config` themselves.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Protocol
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from mlops.config import SCHEMAS, ConfigError, validate_config
from mlops.config.common import did_you_mean, schema_keys, unknown_key

from flows.startup import CONF_DIR, api_ready  # noqa: E402  (light enough for startup)


def groups_of(config_name: str) -> dict[str, list[str]]:
    """The config groups a primary config chooses from (its defaults list) and their options."""
    defaults = yaml.safe_load((CONF_DIR / f"{config_name}.yaml").read_text())["defaults"]
    names = [next(iter(entry)).removeprefix("optional ") for entry in defaults if isinstance(entry, dict)]
    return {name: sorted(path.stem for path in (CONF_DIR / name).glob("*.yaml"))
            for name in names if " " not in name and "/" not in name}


def check_overrides(config_name: str, overrides: list[str]) -> None:
    """Every override names a key of the flow's schema or an option of one of its groups; else
    a ConfigError per mistake, with the new name of a renamed key or the closest known name.

    Hydra would say "Key 'max_epoch' is not in struct" or "Could not find 'modle'" and exit 1."""
    groups, keys = groups_of(config_name), schema_keys(SCHEMAS[config_name])
    problems = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~", "hydra.", "hydra/")):
            continue  # Hydra's own syntax for adding and deleting keys, and Hydra's settings
        if key in groups:
            if "(" in value:
                continue  # a sweep function: choice(...), range(...), glob(...)
            for option in value.split(","):
                if option not in groups[key]:
                    close = did_you_mean(option, groups[key])
                    problems.append(f"{key}={option}: no such option in conf/{key}/ ({', '.join(groups[key])})"
                                    + (f"; did you mean `{key}={close}`?" if close else ""))
        elif key not in keys and not _inside_a_leaf(key, keys):
            problems.append(unknown_key(key, [*keys, *groups], f"the {config_name} config"))
    if problems:
        raise ConfigError(problems)


def _inside_a_leaf(key: str, keys: list[str]) -> bool:
    """`monitor.drift.features.brightness`: under a key that has no sub-keys (a free mapping),
    which that key's own validator checks."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in keys:
            return not any(k.startswith(prefix + ".") for k in keys)
    return False


def overrides_for(config_name: str, overrides: list[str]) -> list[str]:
    """The overrides that concern flow `config_name`: those whose top-level key its schema has.

    For a run that starts other flows (the demo, the monitor's retraining build), so that
    `model=...` reaches the build and `monitor.window=...` the monitor, and `paths.*` both.
    """
    fields = SCHEMAS[config_name].model_fields
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0] in fields]


def load_config(config_name: str, env: str, overrides: list[str]):
    """Compose `conf/<config_name>.yaml` with `env=<env>` and `overrides`, then validate it."""
    check_overrides(config_name, overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra job (an Optuna trial): Hydra is set up here
            cfg = compose(config_name, overrides=[f"env={env}", *overrides])
        else:
            with initialize_config_dir(str(CONF_DIR), version_base=None):
                cfg = compose(config_name, overrides=[f"env={env}", *overrides])
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError([str(error).strip()]) from None
    return to_config(cfg, config_name, env)


def to_config(cfg: DictConfig, config_name: str, env: str):
    """Name the environment after the env option, resolve interpolations (environment
    variables included) and validate against the flow's schema."""
    try:
        with open_dict(cfg):
            cfg.environment = env
        if OmegaConf.select(cfg, "paths.workspace") is not None:  # one absolute root for every store
            cfg.paths.workspace = str(Path(cfg.paths.workspace).expanduser().resolve())
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", "") or "<config>"
        raise ConfigError([f"{key}: {str(error).splitlines()[0]}"]) from None
    raw.pop("hydra", None)
    return validate_config(raw, SCHEMAS[config_name])


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(config.model_dump(mode="json")))


class NoTraceback(logging.Formatter):
    """The console's formatter, less the tracebacks of failed runs below debug level: a user
    error reads as one line; the traceback stays in the Prefect run's logs (`PREFECT_LOGGING_LEVEL=DEBUG`
    shows it here too)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not record.exc_info or logging.getLogger("prefect").isEnabledFor(logging.DEBUG):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def quiet_console_tracebacks() -> None:
    """Put `NoTraceback` on Prefect's console handler (set up here, as a flow run would)."""
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, NoTraceback):
            handler.setFormatter(NoTraceback(handler.formatter))


class Sweep(Protocol):
    """What a flow's `-m` run does beyond running its jobs (the build's chooses the best)."""

    def run(self, env: str, overrides: list[str]) -> float | None: ...

    def finish(self) -> int: ...


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def run_cli(config_name: str, run: Callable[[str, list[str]], object], sweep: Sweep | None = None) -> None:
    """Hydra's command line (overrides, --cfg, --help, -m sweeps) in front of a flow.

    A run or a grid (`-m a=1,2`): Hydra only parses and composes; every job's config is validated
    first, then the flow runs once per job with that job's overrides, the same call a Prefect
    deployment makes. A sweeper that needs each job's result (Optuna) runs the jobs itself, each
    validated as it comes. With `sweep`, a multirun's jobs go through it and its `finish` ends it.
    """
    api_ready()  # Prefect's temporary API, started by flows.startup while the flow module imported
    jobs: list[tuple[str, list[str]]] = []
    multirun = False
    try:
        check_overrides(config_name, [arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def job(cfg: DictConfig) -> float | None:
        nonlocal multirun
        hydra_config = HydraConfig.get()
        overrides = [o for o in hydra_config.overrides.task if not o.startswith("env=")]
        env = hydra_config.runtime.choices["env"]
        multirun = hydra_config.mode == RunMode.MULTIRUN
        searching = multirun and hydra_config.sweeper._target_ != BASIC_SWEEPER
        try:
            to_config(cfg, config_name, env)
        except ConfigError as error:
            where = f" (job {' '.join(overrides)})" if overrides else ""
            print(f"error: {error}{where}", file=sys.stderr)
            if not searching:
                sys.exit(2)
            return None  # a search's trial: told to the sweeper as failed
        if not searching:
            jobs.append((env, overrides))
            return None
        quiet_console_tracebacks()
        if sweep is not None:
            return sweep.run(env, overrides)
        _run_job(run, env, overrides)
        return None

    try:
        job()
    except SystemExit as stop:  # Hydra's exit on a sweeper error (every Optuna trial failed): the table still
        if multirun and sweep is not None and stop.code != 2:
            sweep.finish()
        raise
    quiet_console_tracebacks()
    if multirun and sweep is not None:
        for env, overrides in jobs:
            sweep.run(env, overrides)
        sys.exit(sweep.finish())
    failed = sum(not _run_job(run, env, overrides) for env, overrides in jobs)
    if failed:
        sys.exit(1)


def _run_job(run: Callable[[str, list[str]], object], env: str, overrides: list[str]) -> bool:
    try:
        run(env, overrides)
    except Exception as error:  # the flow already logged the details
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return False
    return True
