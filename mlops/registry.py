"""The MLflow store and model registry behind one object, opened once with explicit settings.

`Registry(settings)` holds a `MlflowClient` for the configured tracking and registry URI; it never
sets MLflow's process-wide URIs, and it creates an experiment only when a run is started in it.
Run ids are passed explicitly, so nothing depends on MLflow's thread-local "active run" (Prefect
runs tasks in threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mlops.config import MlflowConfig

MODEL_ARTIFACT = "model"
REFERENCE_ARTIFACT = "reference"
ONNX_FILE = "model.onnx"
TRAIN_KEY_TAG = "mlops.train_key"
PACKAGED_TAG = "mlops.packaged"
ONNX_SHA256_TAG = "mlops.onnx_sha256"  # on a packaging run and on its model versions: the ONNX file's sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str
    run_id: str


class ChecksumMismatch(RuntimeError):
    """A model file whose sha256 is not the one recorded when its version was registered."""


def download_model(client: MlflowClient, run_id: str, dest: Path) -> Path:
    """The ONNX file logged by `run_id`, downloaded under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/{ONNX_FILE}", str(dest)))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_model(client: MlflowClient, tracking_uri: str, version: ModelVersion, cache: Path) -> Path:
    """The ONNX file of a registered `version`, downloaded once into `cache` and verified.

    An entry is keyed by the registry (tracking URI), name, version, run and recorded checksum,
    so two registries' "v1" never share one. A download goes to a temporary folder beside it
    and is renamed into place: servers starting at once never read a partial file. Before the
    file is used its sha256 must equal the one recorded at registration (`mlops.onnx_sha256`):
    a stored or cached file changed since then raises `ChecksumMismatch`. A version registered
    before checksums were recorded has none: it is served unverified, with a warning (refusing
    it would make every older version, and so any rollback to one, unservable).
    """
    expected = version.tags.get(ONNX_SHA256_TAG)
    label = f"{version.name} v{version.version}"
    if expected is None:
        log.warning("%s has no recorded checksum (%s; registered before checksums were recorded):"
                    " serving it unverified", label, ONNX_SHA256_TAG)
    identity = "\n".join([tracking_uri, version.name, str(version.version), version.run_id, expected or ""])
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    folder = cache / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', version.name)}-v{version.version}-{key}"
    path = folder / ONNX_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as temporary:
            downloaded = download_model(client, version.run_id, Path(temporary))
            _verify(downloaded, expected, f"the stored model file of {label} (run {version.run_id})")
            folder.mkdir(exist_ok=True)
            os.replace(downloaded, path)
    _verify(path, expected, f"the cached model file of {label}", f"; delete {folder} to download it again")
    return path


def _verify(path: Path, expected: str | None, what: str, hint: str = "") -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatch(
            f"checksum mismatch: {what} ({path}) has sha256 {actual}, but {expected} was recorded at"
            f" registration ({ONNX_SHA256_TAG}): the file changed after approval, refusing to serve it{hint}"
        )


def pip_requirements() -> list[str]:
    """What a logged ONNX model needs, pinned to this environment: what MLflow would infer, without
    its inference (which maps every installed package to its modules: ~2.7 s in a fresh process)."""
    import mlflow
    import mlflow.onnx

    return sorted([f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}", *mlflow.onnx.get_default_pip_requirements()])


def store_template_dir() -> Path:
    """Where empty sqlite MLflow stores are kept, one per MLflow version: the user's cache folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlops"


def seed_sqlite_store(uri: str, templates: Path) -> bool:
    """Give a new sqlite MLflow database its tables by copying an empty one made for this MLflow
    version, instead of MLflow running its schema migrations one by one (about 2 s in every new
    workspace, and in every test that makes one). MLflow then adds its default experiment, with
    this store's artifact location, as it does in a database it created. An existing file is never
    touched, and anything unusual (a query string, no such folder, a cache that cannot be written,
    an MLflow without `_initialize_tables`) leaves the database to MLflow as before. Returns whether
    it seeded."""
    import mlflow

    if not uri.startswith("sqlite:///") or "?" in uri:
        return False
    target = Path(uri.removeprefix("sqlite:///"))
    if target.exists() or not target.parent.is_dir():
        return False
    template = templates / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            import sqlalchemy
            from mlflow.store.db.utils import _initialize_tables

            templates.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=templates) as scratch:
                made = Path(scratch) / "empty.db"
                engine = sqlalchemy.create_engine(f"sqlite:///{made}")
                _initialize_tables(engine)
                engine.dispose()
                os.replace(made, template)  # whole or not at all, for another process making it too
        copy = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}")
        copy.write_bytes(template.read_bytes())  # the permissions MLflow's own file would get
        try:
            os.link(copy, target)  # fails if the database appeared meanwhile: that one is kept
        finally:
            copy.unlink()
    except (ImportError, OSError) as error:
        log.debug("MLflow creates %s itself (no empty store to copy: %s)", target, error)
        return False
    return True


class Registry:
    def __init__(self, settings: MlflowConfig):
        self.settings = settings
        seed_sqlite_store(settings.tracking_uri, store_template_dir())
        self.client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
        self.model = settings.registered_model

    # -- experiments and runs ------------------------------------------------------------

    def experiment_id(self, name: str | None = None, create: bool = True) -> str | None:
        """The id of experiment `name` (default: the build experiment), created on first use."""
        name = name or self.settings.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None or not create:
            return experiment.experiment_id if experiment else None
        location = self.settings.artifact_location
        uri = self.settings.tracking_uri
        if location is None and uri.startswith("sqlite:///"):
            # a local database keeps its artifacts beside it, never in the working directory
            location = str(Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts")
        if location and "://" not in location:
            location = Path(location).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    @contextmanager
    def run(self, name: str, tags: dict[str, str], experiment: str | None = None) -> Iterator[str]:
        """A run that always ends: FINISHED when the block completes, FAILED (with the error as
        the tag `mlops.error`) when it raises; the exception goes on."""
        run_id = self.start_run(name, tags, experiment)
        try:
            yield run_id
        except BaseException as error:
            self.client.set_tag(run_id, "mlops.error", f"{type(error).__name__}: {error}"[:5000])
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def start_run(self, name: str, tags: dict[str, str], experiment: str | None = None) -> str:
        """A run left open: the caller ends it with `end_run` (a sweep's parent run)."""
        return self.client.create_run(self.experiment_id(experiment), run_name=name, tags=tags).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def log(
        self,
        run_id: str,
        metrics: dict[str, float] | None = None,
        params: dict[str, object] | None = None,
        tags: dict[str, object] | None = None,
    ) -> None:
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), 0, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_artifact(self, run_id: str, local: Path, path: str | None = None) -> None:
        (self.client.log_artifacts if Path(local).is_dir() else self.client.log_artifact)(run_id, str(local), path)

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    def find_reusable_run(self, train_key: str) -> str | None:
        """The newest run that trained and packaged a model under the same train key, if any."""
        experiment = self.experiment_id(create=False)
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment],
            filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{train_key}' and tags.`{PACKAGED_TAG}` = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    # -- models ----------------------------------------------------------------------------

    def log_onnx_model(self, run_id: str, onnx_path: Path, example: np.ndarray, outputs: np.ndarray | dict) -> str:
        """Log the ONNX file in MLflow's ONNX flavour under the run's `model/` artifact path;
        returns the logged file's sha256 (also the run's tag `mlops.onnx_sha256`)."""
        import mlflow.onnx
        import onnx
        from mlflow.models import infer_signature

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / MODEL_ARTIFACT
            mlflow.onnx.save_model(
                onnx.load(str(onnx_path)), str(target), signature=infer_signature(example, outputs),
                save_as_external_data=False, pip_requirements=pip_requirements(),
            )
            checksum = sha256_file(target / ONNX_FILE)  # of the file as logged (save_model rewrites it)
            self.client.log_artifacts(run_id, str(target), MODEL_ARTIFACT)
        self.client.set_tag(run_id, ONNX_SHA256_TAG, checksum)
        self.client.set_tag(run_id, PACKAGED_TAG, "true")
        return checksum

    def download_model(self, run_id: str, dest: Path) -> Path:
        """The ONNX file logged by `run_id`, downloaded under `dest`."""
        return download_model(self.client, run_id, dest)

    def onnx_sha256(self, run_id: str) -> str:
        """The sha256 of the ONNX file `run_id` logged: its tag, or (a run packaged before
        checksums were recorded) computed from the stored file now."""
        tagged = self.client.get_run(run_id).data.tags.get(ONNX_SHA256_TAG)
        if tagged:
            return tagged
        with tempfile.TemporaryDirectory() as tmp:
            return sha256_file(self.download_model(run_id, Path(tmp)))

    def download_reference(self, run_id: str, dest: Path) -> Path | None:
        """The run's monitoring reference folder, or None if it has none (an older version)."""
        if not any(a.path == REFERENCE_ARTIFACT for a in self.client.list_artifacts(run_id)):
            return None
        dest.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(dest)))

    # -- versions and aliases ------------------------------------------------------------

    def alias(self, alias: str) -> VersionRef | None:
        try:
            version = self.client.get_model_version_by_alias(self.model, alias)
        except MlflowException:
            return None
        return VersionRef(self.model, str(version.version), version.run_id)

    def aliases(self) -> dict[str, str]:
        """alias -> version number of the registered model ({} before the first version)."""
        try:
            return {alias: str(v) for alias, v in self.client.get_registered_model(self.model).aliases.items()}
        except MlflowException:
            return {}

    def set_alias(self, alias: str, version: str | None) -> None:
        """Point `alias` at `version`; None removes it."""
        if version is None:
            if alias in self.aliases():
                self.client.delete_registered_model_alias(self.model, alias)
        else:
            self.client.set_registered_model_alias(self.model, alias, version)

    def version(self, number: str | int) -> VersionRef:
        found = self.client.get_model_version(self.model, str(number))
        return VersionRef(self.model, str(found.version), found.run_id)

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model, version).tags)

    def tag_version(self, version: str, tags: dict[str, object]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model, version, key, str(value))

    def add_to_card(self, version: str, section: str) -> None:
        """Append `section` to the version's model card (its description): what came before stays."""
        card = self.client.get_model_version(self.model, version).description or ""
        self.client.update_model_version(self.model, version, description=card.rstrip("\n") + "\n" + section)

    def register(self, source_run_id: str, tags: dict[str, object], description: str) -> tuple[VersionRef, bool]:
        """Register the model of `source_run_id` (or reuse its existing version); returns (version, created).

        The version is tagged with the ONNX file's sha256 (`mlops.onnx_sha256`): a server
        refuses a file that no longer matches it."""
        try:
            self.client.get_registered_model(self.model)
        except MlflowException:
            self.client.create_registered_model(self.model, description="Image classifier built by the build flow")
        existing = self.client.search_model_versions(f"name = '{self.model}' and run_id = '{source_run_id}'")
        if existing:
            version, created = existing[0], False
        else:
            source = f"{self.artifact_uri(source_run_id)}/{MODEL_ARTIFACT}"
            version, created = self.client.create_model_version(self.model, source, run_id=source_run_id), True
        self.tag_version(str(version.version), tags | {ONNX_SHA256_TAG: self.onnx_sha256(source_run_id)})
        self.client.update_model_version(self.model, version.version, description=description)
        return VersionRef(self.model, str(version.version), source_run_id), created


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def model_card(
    name: str,
    data_version: str,
    data_counts: dict[str, dict[str, int]],
    evaluation: dict,
    gate_markdown: str,
    lineage: dict[str, str],
    reproduce: str,
    production: dict | None = None,
) -> str:
    """The version's card: its data, test metrics, gate, lineage and the command that rebuilds
    it; `production` is the manifest's section on the production images it was trained on."""
    per_class = "\n".join(
        f"| {cls} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
        for cls, s in evaluation["per_class"].items()
    )
    splits = ", ".join(f"{split} {sum(c.values())}" for split, c in data_counts.items())
    lines = "\n".join(f"- {key}: `{value}`" for key, value in lineage.items())
    added = ""
    if production:
        per_split = "; ".join(f"{split}: {dict(c)}" for split, c in production["counts"].items())
        added = (f"\nProduction images added: window `{production['window']}` ({production['first']} to"
                 f" {production['last']}), on base data version `{production['base_version']}`; per split and"
                 f" class: {per_split}; {len(production['rejected'])} rejected. Each file's request id, capture"
                 " time and serving version are in the data version's `manifest.json`.\n")
    return f"""# Model card: {name}

## Data
Data version (DVC): `{data_version}`; images per split: {splits}; classes: {len(evaluation['per_class'])}.
{added}
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
