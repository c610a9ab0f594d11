"""Active labelling by hand: the captured images the served model was least sure about, out to a
person, and what they labelled back in as feedback.

    python -m flows.label export env=production                    # monitor.labelling.export of them (else 50)
    python -m flows.label export env=production n=100 format=label_studio window=all
    python -m flows.label import env=production from=workspace/monitor/production/labelling/20261122-070000
    python -m flows.label import env=production from=project-3-at-2026-11-22.json   # Label Studio's JSON export

export: the `n` least confident captures of the window (default `monitor.retrain.production`,
the window a retraining build reads, else `monitor.window`) that have no usable label and went
out in no export kept under `monitor.labelling.dir`, written as `format` (folder or
label_studio, default `monitor.labelling.format`) to `dest` (default
`monitor.labelling.dir/<UTC time>`; never an existing non-empty folder).

import: `from` is a labelled folder (an export, or its `labelled/` folder) or a Label Studio JSON
export; each label of a class of the served version becomes a feedback record (`source`:
"import:<path>") beside those of `/feedback`; what cannot be used is listed on stderr. Exit 2
for bad input (no such path, not one usable label), else 0.

Options (n, format, window, dest, from) are key=value like Hydra overrides; everything else is
a Hydra override of the monitor config (stores, `monitor.version`). The monitor flow exports
each run through `export_for_monitor` when `monitor.labelling.export` is above 0.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from flows.config import load_config
from mlops.config import ConfigError, MonitorConfig
from mlops.config.common import WINDOW
from mlops.data import labelling, production
from mlops.monitor.window import window_start

DEFAULT_N = 50  # an export by hand when monitor.labelling.export is 0
FORMATS = ("folder", "label_studio")
EXPORT_OPTIONS = {"n", "format", "window", "dest"}
IMPORT_OPTIONS = {"from"}


@dataclass
class Exported:
    dest: Path | None  # None: nothing to export
    chosen: list = field(default_factory=list)  # the captures exported, least confident first
    unlabelled: int = 0  # captured in the window without a usable label
    earlier: int = 0  # of those, left out: in an export kept under monitor.labelling.dir
    unreadable: list[str] = field(default_factory=list)


def served_classes(config: MonitorConfig) -> list[str]:
    """The classes of the version being served (as the monitor finds it: monitor.version, the
    live server, the production alias), from its ONNX file."""
    from flows.monitor import fetch_model, served_version
    from mlops.registry import Registry

    registry = Registry(config.mlflow)
    ref = served_version.fn(config, registry)  # .fn: the plain function, no task run outside a flow
    return fetch_model.fn(registry, ref, config.paths.monitor / "cache" / f"v{ref.version}")[1]


def default_window(config: MonitorConfig) -> str:
    """The labels that matter most are those a retraining build reads."""
    return config.monitor.retrain.production or config.monitor.window


def gather(config: MonitorConfig, classes: list[str], window: str, now: datetime) -> production.Collected:
    """Captures of the window (`all`: every one kept) joined with their feedback."""
    return production.collect(config.captures.url, config.records.store, classes, config.captures.on_conflict,
                              window_start(window, now))


def export_unlabelled(
    config: MonitorConfig, classes: list[str], now: datetime, n: int, fmt: str, window: str, dest: Path | None = None,
    import_command: str | None = None,
) -> Exported:
    """Export the `n` least confident unlabelled captures of `window` as `fmt` (folder or
    label_studio) to `dest` (default: `monitor.labelling.dir/<UTC time>`)."""
    collected = gather(config, classes, window, now)
    unlabelled = collected.joined.unlabelled
    earlier = labelling.exported_ids(config.monitor.labelling.dir)
    fresh = [capture for capture in unlabelled if capture.request_id not in earlier]
    chosen = labelling.least_confident(fresh, n)
    result = Exported(None, chosen, len(unlabelled), len(unlabelled) - len(fresh), collected.unreadable)
    if not chosen:
        return result
    dest = dest or config.monitor.labelling.dir / now.astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    command = import_command or f"python -m flows.label import env={config.environment} from={{dest}}"
    if fmt == "label_studio":
        result.dest = labelling.export_label_studio(chosen, classes, dest, import_command=command)
    else:
        result.dest = labelling.export_folder(chosen, classes, dest, import_command=command)
    return result


def export_for_monitor(config: MonitorConfig, classes: list[str], now: datetime) -> Path | None:
    """The monitor's export: `monitor.labelling.export` of the least confident unlabelled
    captures as `monitor.labelling.format` under `monitor.labelling.dir`; None when it exports
    none (export is 0, or nothing unlabelled that went out in no earlier export)."""
    policy = config.monitor.labelling
    if policy.export <= 0:
        return None
    command = (f"python -m flows.label import env={config.environment} paths.workspace={config.paths.workspace}"
               " from={dest}")
    return export_unlabelled(config, classes, now, policy.export, policy.format, default_window(config),
                             import_command=command).dest


# -- the command line -----------------------------------------------------------------------


class Usage(Exception):
    """Bad input: exit 2 with its message."""


def parse(argv: list[str]) -> tuple[str, str, dict[str, str], list[str]]:
    """(command, env, options, Hydra overrides)."""
    if not argv or argv[0] not in ("export", "import"):
        raise Usage("the first word is export or import (python -m flows.label --help)")
    command, env, options, overrides = argv[0], "test", {}, []
    allowed = EXPORT_OPTIONS if command == "export" else IMPORT_OPTIONS
    for item in argv[1:]:
        key, equals, value = item.partition("=")
        if not equals:
            raise Usage(f"'{item}': expected key=value")
        if key == "env":
            env = value
        elif key in EXPORT_OPTIONS | IMPORT_OPTIONS:
            if key not in allowed:
                raise Usage(f"{key}= is an option of {'export' if command == 'import' else 'import'}, not of {command}")
            options[key] = value
        else:
            overrides.append(item)
    return command, env, options, overrides


def run_export(config: MonitorConfig, options: dict[str, str], env: str, overrides: list[str]) -> int:
    policy = config.monitor.labelling
    try:
        n = int(options.get("n", policy.export or DEFAULT_N))
    except ValueError:
        raise Usage(f"n={options['n']}: expected a whole number") from None
    fmt, window = options.get("format", policy.format), options.get("window", default_window(config))
    if n < 1:
        raise Usage(f"n={n}: export at least one image")
    if fmt not in FORMATS:
        raise Usage(f"format={fmt}: one of {', '.join(FORMATS)}")
    if not re.fullmatch(WINDOW, window):
        raise Usage(f"window={window}: a duration like 24h or 7d, or all")
    dest = Path(options["dest"]).expanduser() if "dest" in options else None
    if dest is not None and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Usage(f"dest={dest} already exists and is not empty: an export never overwrites earlier work")
    classes = served_classes(config)
    command = " ".join(["python -m flows.label import", f"env={env}", *overrides, "from={dest}"])
    try:
        result = export_unlabelled(config, classes, datetime.now(UTC), n, fmt, window, dest, command)
    except (FileExistsError, ValueError) as error:
        raise Usage(str(error)) from None
    for problem in result.unreadable:
        print(f"unreadable capture or record skipped: {problem}", file=sys.stderr)
    earlier = f" ({result.earlier} more went out in earlier exports under {policy.dir})" if result.earlier else ""
    if result.dest is None:
        print(f"nothing to export: {result.unlabelled} captures of window={window} without a usable label{earlier}")
        return 0
    confidence = [c.confidence for c in result.chosen]
    print(f"exported {len(result.chosen)} of {result.unlabelled} unlabelled captures of window={window}{earlier}, "
          f"least confident first (confidence {min(confidence):.2f} to {max(confidence):.2f}), as {fmt} to {result.dest}")
    print(f"next: follow {result.dest / labelling.README}")
    if fmt == "folder":
        print(f"  move each image of {result.dest / labelling.UNLABELLED} into {result.dest / labelling.LABELLED}/<class>/, then")
        print(f"  {command.replace('{dest}', shlex.quote(str(result.dest)))}")
    else:
        print(f"  label {result.dest / labelling.TASKS_JSON} in Label Studio, export the project as JSON, then")
        print(f"  {command.replace('{dest}', '<that JSON file>')}")
    return 0


def run_import(config: MonitorConfig, options: dict[str, str]) -> int:
    if "from" not in options:
        raise Usage("import needs from=PATH: a labelled folder or a Label Studio JSON export")
    source = Path(options["from"]).expanduser()
    if not source.exists():
        raise Usage(f"from={source}: no such file or folder")
    classes = served_classes(config)
    try:
        if source.is_dir():
            labels, problems = labelling.read_labelled_folder(source, classes)
        else:
            labels, problems = labelling.read_label_studio_export(source, classes)
    except (OSError, ValueError) as error:
        raise Usage(str(error)) from None
    for problem in problems:
        print(problem, file=sys.stderr)
    if not labels:
        raise Usage(f"from={source}: not one usable label ({len(problems)} problem(s) above; classes: {', '.join(classes)})")
    records = config.records
    written = labelling.import_labels(labels, records.dir, records.max_mb, records.max_age_days, f"import:{source.resolve()}",
                                     records.url)
    counts: dict[str, int] = {}
    for label in labels:
        counts[label.label] = counts.get(label.label, 0) + 1
    per_class = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    print(f"imported {written} labels as feedback into {records.url or records.dir} ({per_class}); {len(problems)} not used")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    try:
        command, env, options, overrides = parse(argv)
        try:
            config: MonitorConfig = load_config("monitor", env, overrides)
        except ConfigError as error:
            raise Usage(str(error)) from None
        if command == "export":
            return run_export(config, options, env, overrides)
        return run_import(config, options)
    except Usage as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - a store or the registry failing: one line, exit 1
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
