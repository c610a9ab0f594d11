"""The build flow: ingest -> train -> package (+ reference profile) -> evaluate -> gate -> register.

    python -m flows.build env=test model=mobilenet_v3_small train.max_epochs=3
    python -m flows.build --cfg job env=production
    python -m flows.build -m model=resnet18,mobilenet_v3_small

`build` is the one flow object both the CLI and a Prefect deployment run; it takes an
environment name and Hydra overrides and composes its config itself. Each task is one library
call; the ones that talk to MLflow or a DVC remote retry.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.chain import start_deployment
from flows.config import load_config, run_cli, to_yaml
from mlops import summary, sweep
from mlops.checks import Report
from mlops.config import BuildConfig, DataConfig, DvcConfig, ExportConfig
from mlops.data import ingest, production, versioning
from mlops.data.layout import dataset_dir
from mlops.monitor.window import window_start
from mlops.registry import ONNX_FILE, REFERENCE_ARTIFACT, TRAIN_KEY_TAG, Registry, VersionRef, flatten, model_card, to_json
from mlops.serve.inference import OnnxClassifier, load_array
from mlops.train import evaluation, lineage, packaging

NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}  # MLflow, DVC remote
LOCAL = {"cache_policy": NO_CACHE}


class GateFailed(RuntimeError):
    pass


@dataclass
class Dataset:
    prepared: ingest.Prepared
    version: str


@dataclass
class BuildResult:
    run_id: str
    data_version: str
    model_name: str
    version: str | None
    reused_run_id: str | None
    chained: str | None = None  # the flow run started by chain.after_build
    gate: str = "passed"  # or "failed" (a sweep's job: sweep_job=True returns instead of raising)
    metrics: dict[str, float] = field(default_factory=dict)  # test_*, val_*, holdout_*: what a sweep chooses by


@task(**LOCAL)
def prepare_data(data: DataConfig, seed: int, workspace: Path, dvc: DvcConfig) -> ingest.Prepared:
    """Materialize, validate and split the dataset into the DVC project."""
    prepared = ingest.prepare_dataset(data, seed, workspace, dataset_dir(dvc.repo, data.name))
    if prepared.capped:
        get_run_logger().warning("%d valid images left out by data.max_per_class=%s (data.max_per_class=null keeps them all)",
                                 prepared.capped, data.max_per_class)
    if prepared.rejected:
        get_run_logger().warning(
            "%d images quarantined under %s:\n%s",
            len(prepared.rejected),
            workspace / "quarantine" / data.name,
            "\n".join(f"  {r.path}: {r.kind} ({r.detail})" for r in prepared.rejected),
        )
    return prepared


@task(**NETWORK)
def add_production_data(config: BuildConfig, prepared: ingest.Prepared, base_version: str) -> ingest.Prepared:
    """The labelled production images of `data.production` added to the prepared dataset."""
    from mlops.serve.capture import redact

    logger, data, url = get_run_logger(), config.data, config.captures.url
    start = window_start(data.production, datetime.now(UTC))
    collected = production.collect(url, config.records.dir, prepared.classes, config.captures.on_conflict, start)
    joined = collected.joined
    for problem in collected.unreadable:
        logger.warning("unreadable capture or feedback record skipped: %s", problem)
    for problem in joined.problems[:20]:
        logger.warning("label not used: request %s: %s (%s)", problem.request_id, problem.kind, problem.detail)
    since = f"since {start.isoformat(timespec='seconds')}" if start else "(all stored)"
    if not joined.labelled:
        raise ingest.DataError(f"data.production={data.production}", [
            f"no labelled production image in {redact(url)} {since}: {len(joined.unlabelled)} captured without a"
            f" usable label, label problems {joined.problem_counts() or 'none'}",
            "labels come from POST /feedback or python -m flows.label import; or drop data.production",
        ])
    times = [sample.capture.time for sample in joined.labelled]
    provenance = {  # what decides the content only, so the same images give the same data version
        "window": data.production, "first": min(times).isoformat(), "last": max(times).isoformat(),
        "base_version": base_version, "holdout": data.holdout.model_dump(), "on_conflict": config.captures.on_conflict,
    }
    added = production.add_production(
        prepared.path, joined.labelled, data.holdout.split, data.holdout.share, data.val_fraction, config.seed,
        data.validation, config.paths.workspace / "quarantine" / data.name / "production", provenance,
    )
    for item in added.rejected:
        logger.warning("production image %s left out: %s (%s)", item["request_id"], item["kind"], item["detail"])
    if not added.total:
        raise ingest.DataError(f"data.production={data.production}", [f"all {len(joined.labelled)} labelled production images were rejected"])
    logger.info("added %d labelled production images from %s %s (%d unlabelled, label problems %s): %s",
                added.total, redact(url), since, len(joined.unlabelled), joined.problem_counts() or "none", added.counts)
    rows = "\n".join(f"| {split} | {sum(c.values())} | {c} |" for split, c in added.counts.items())
    create_markdown_artifact(
        f"Added {added.total} labelled production images ({redact(url)}, {since}) to base data version"
        f" `{base_version}`; {len(added.rejected)} rejected, {len(joined.unlabelled)} captured without a label,"
        f" label problems {joined.problem_counts() or 'none'}.\n\n| split | images | per class |\n|---|---:|---|\n{rows}\n",
        key="production-data", description="Labelled production images in this build")
    return ingest.load_prepared(prepared.path)


@task(**NETWORK)
def version_data(dvc: DvcConfig, name: str) -> str:
    """Add the prepared dataset to DVC and push it to the remote; its hash is the data version."""
    return versioning.commit_dataset(dvc.repo, dvc.remote, name)


@task(**NETWORK)
def checkout_data(dvc: DvcConfig, name: str, version: str) -> ingest.Prepared:
    """A pinned data version, from the DVC cache or the remote."""
    return ingest.load_prepared(versioning.checkout_dataset(dvc.repo, dvc.remote, name, version))


@task(**LOCAL)
def train_model(config: BuildConfig, dataset: Dataset, tracking_uri: str, run_id: str, workdir: Path):
    from pytorch_lightning.loggers import MLFlowLogger

    from mlops.train import training

    logger = MLFlowLogger(tracking_uri=tracking_uri, run_id=run_id)
    return training.train(config, dataset.prepared, workdir, logger=logger)


@task(**LOCAL)
def package_model(export: ExportConfig, trained, dataset: Dataset, workdir: Path, seed: int) -> tuple[Path, packaging.Parity]:
    """Fit the embedding projection on training images, export to ONNX, and check parity
    against PyTorch on test images."""
    train = dataset.prepared.files("train")
    sample = random.Random(seed).sample(train, min(len(train), export.projection_images))
    batches = (np.stack([load_array(path, trained.spec) for path, _ in sample[i : i + 64]]) for i in range(0, len(sample), 64))
    projection = packaging.fit_projection(packaging.embeddings(trained.network, batches), export.embedding_dims, seed)
    onnx_path = packaging.export_onnx(trained.network, trained.spec, workdir / ONNX_FILE, export.opset, projection)
    batch = parity_batch(dataset, trained.spec, export.parity_images)
    return onnx_path, packaging.check_parity(trained.network, onnx_path, batch, export.parity_atol, export.parity_rtol)


def parity_batch(dataset: Dataset, spec, count: int) -> np.ndarray:
    return np.stack([load_array(path, spec) for path, _ in dataset.prepared.files("test")[:count]])


@task(**NETWORK)
def log_model(registry: Registry, run_id: str, weights: Path, onnx_path: Path, parity: packaging.Parity, example: np.ndarray) -> None:
    """The weights, the parity figure and the ONNX file in MLflow's ONNX flavour."""
    registry.log_artifact(run_id, weights, "weights")
    registry.log(run_id, metrics={"onnx_parity_max_abs_diff": parity.max_abs_diff})
    model = OnnxClassifier(onnx_path)
    outputs = model.session.run(None, {model.input_name: example})
    registry.log_onnx_model(run_id, onnx_path, example, dict(zip([o.name for o in model.session.get_outputs()], outputs)))


@task(**LOCAL)
def profile_reference(onnx_path: Path, dataset: Dataset, folder: Path, seed: int) -> tuple[Path, float | None]:
    """The monitor's reference: whylogs profile of train-split image features and of the
    model's outputs on the validation split, its embeddings, and the calibration temperature."""
    from mlops.monitor.profiling import build_reference

    train = [path for path, _ in dataset.prepared.files("train")]
    reference = build_reference(OnnxClassifier(onnx_path), train, dataset.prepared.files("val"), seed)
    return reference.save(folder), reference.temperature


@task(**NETWORK)
def log_artifacts(registry: Registry, run_id: str, local: Path, path: str) -> None:
    registry.log_artifact(run_id, local, path)


@task(**LOCAL)
def evaluate_model(onnx_path: Path, files: list[tuple[Path, int]], latency_images: int) -> evaluation.Evaluation:
    """Metrics, confusion matrix and latency of an ONNX model on the test split."""
    return evaluation.evaluate(OnnxClassifier(onnx_path), files, latency_images)


@task(**NETWORK)
def production_baseline(registry: Registry, classes: list[str], files, holdout_files, latency_images: int,
                        workdir: Path) -> tuple[evaluation.Baseline, evaluation.Evaluation | None]:
    """The production model evaluated on the same test split and production holdout, or why
    there is no comparison."""
    current = registry.alias(registry.settings.production_alias)
    if current is None:
        return evaluation.Baseline("no production model yet: comparison skipped"), None
    label = f"production v{current.version}"
    model = OnnxClassifier(registry.download_model(current.run_id, workdir / "production"))
    if list(model.spec.classes) != classes:
        return evaluation.Baseline(f"{label} has other classes: comparison skipped", other_classes=list(model.spec.classes)), None
    on_holdout = evaluation.evaluate(model, holdout_files, 0) if holdout_files else None
    return evaluation.Baseline(label, evaluation.evaluate(model, files, latency_images)), on_holdout


@task(**NETWORK)
def log_evaluation(registry: Registry, run_id: str, new: evaluation.Evaluation, baseline: evaluation.Baseline,
                   holdout: evaluation.Holdout | None, report: Report, markdown: str, workdir: Path) -> None:
    """Metrics, the confusion matrix and every gate check: MLflow artifacts and tags."""
    registry.log(run_id, metrics=new.metrics())
    if baseline.evaluation is not None:
        registry.log(run_id, metrics=baseline.evaluation.metrics("production_"))
    if holdout is not None:
        registry.log(run_id, metrics=holdout.new.metrics("holdout_"))
        if holdout.production is not None:
            registry.log(run_id, metrics=holdout.production.metrics("production_holdout_"))
    registry.log_artifact(run_id, evaluation.plot_confusion(new, workdir / "confusion_matrix.png"), "evaluation")
    registry.log_text(run_id, to_json(asdict(new)), "evaluation/test_metrics.json")
    registry.log_text(run_id, to_json(report.to_dict()), "gate/report.json")
    registry.log_text(run_id, markdown, "gate/report.md")
    verdicts = {f"mlops.gate.{check.name}": check.verdict for check in report.checks}
    registry.log(run_id, tags={"mlops.gate": "passed" if report.passed else "failed"} | verdicts)


@task(**NETWORK)
def register_model(registry: Registry, source_run_id: str, tags: dict[str, str], card: str) -> tuple[VersionRef, bool]:
    """Register (or reuse) the model version of `source_run_id` and point the candidate alias at it."""
    ref, created = registry.register(source_run_id, tags, card)
    registry.set_alias(registry.settings.candidate_alias, ref.version)
    return ref, created


@flow(name="build", log_prints=True)
def build(env: str = "test", overrides: list[str] | None = None, parent_run_id: str | None = None,
          sweep_job: bool = False) -> BuildResult:
    """Build a model from the `conf/build.yaml` config in environment `env` with Hydra `overrides`.

    A sweep's jobs run with the sweep's MLflow run as `parent_run_id` and `sweep_job=True`: they
    stop after the gate (a failed gate returns rather than raises) and the sweep registers the best.
    """
    overrides = list(overrides or [])
    logger = get_run_logger()
    config: BuildConfig = load_config("build", env, overrides)
    config_yaml = to_yaml(config)
    create_markdown_artifact(f"```yaml\n{config_yaml}```", key="build-config", description="Resolved build config")
    workspace, data = config.paths.workspace, config.data
    workspace.mkdir(parents=True, exist_ok=True)

    if data.version is not None:
        dataset = Dataset(checkout_data(config.dvc, data.name, data.version), data.version)
        logger.info("checked out pinned data version %s", data.version)
    else:
        prepared = prepare_data(data, config.seed, workspace, config.dvc)
        dataset = Dataset(prepared, version_data(config.dvc, data.name))
        if data.production is not None:  # the source's version first, then the one with production images
            prepared = add_production_data(config, prepared, dataset.version)
            dataset = Dataset(prepared, version_data(config.dvc, data.name))
    added = production.production_tags(dataset.prepared.production)
    logger.info("data version %s: %s", dataset.version, {s: sum(c.values()) for s, c in dataset.prepared.counts.items()})

    registry = Registry(config.mlflow)
    trace = lineage.trace(config, dataset.version) | added
    key = lineage.train_key(config, dataset.version, trace["code_hash"])
    reused = None if config.force else registry.find_reusable_run(key)
    run_tags = {f"mlops.{k}": v for k, v in trace.items()} | {
        "mlops.flow": "build",
        "mlops.environment": config.environment,
        "mlops.overrides": " ".join(overrides),
        "mlops.trigger": config.trigger or "manual",
    } | ({"mlops.reused_run_id": reused} if reused else {}) | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
    with registry.run(f"build-{config.model.name}", run_tags) as run_id:
        workdir = workspace / "runs" / run_id
        registry.log_text(run_id, config_yaml, "config/resolved.yaml")
        registry.log_text(run_id, (dataset.prepared.path / ingest.MANIFEST).read_text(), "data/manifest.json")
        registry.log(run_id, params=flatten(config.model_dump(mode="json", exclude={"mlflow", "paths", "dvc"})))
        if reused:
            logger.info("reusing the model of run %s: same data version, config and code (force=true retrains)", reused)
            source_run_id, onnx_path = reused, registry.download_model(reused, workdir)
            trained_metrics = registry.metrics(reused)
        else:
            registry.log(run_id, tags={TRAIN_KEY_TAG: key})
            trained = train_model(config, dataset, config.mlflow.tracking_uri, run_id, workdir)
            trained_metrics = trained.metrics
            onnx_path, parity = package_model(config.export, trained, dataset, workdir, config.seed)
            example = parity_batch(dataset, trained.spec, 1)
            log_model(registry, run_id, trained.weights, onnx_path, parity, example)
            reference, temperature = profile_reference(onnx_path, dataset, workdir / "reference", config.seed)
            log_artifacts(registry, run_id, reference, REFERENCE_ARTIFACT)
            if temperature is not None:
                registry.log(run_id, metrics={"calibration_temperature": temperature})
            source_run_id = run_id

        files, holdout_files = dataset.prepared.files("test"), dataset.prepared.files(production.HOLDOUT)
        new = evaluate_model(onnx_path, files, config.export.latency_images)
        baseline, production_on_holdout = production_baseline(
            registry, new.classes, files, holdout_files, config.export.latency_images, workdir)
        holdout = None
        if holdout_files:
            holdout = evaluation.Holdout(evaluate_model(onnx_path, holdout_files, 0), production_on_holdout,
                                         f"{baseline.label} on {len(holdout_files)} production images")
        report = evaluation.gate(new, config.gate, baseline, holdout)
        markdown = report.to_markdown() + "\n\n" + evaluation.comparison(new, baseline, holdout) + "\n"
        log_evaluation(registry, run_id, new, baseline, holdout, report, markdown, workdir)
        create_markdown_artifact(markdown, key="gate-report", description="Build gate")
        metrics = {k: v for k, v in trained_metrics.items() if k.startswith(("val_", "train_"))} | new.metrics()
        metrics |= holdout.new.metrics("holdout_") if holdout else {}

        def summarize(version: str | None) -> None:
            prepared = dataset.prepared
            text = summary.build_summary(
                model=ref.name if version else config.mlflow.registered_model, data_version=dataset.version,
                counts=prepared.counts, quarantined=len(prepared.rejected),
                quarantine_dir=str(workspace / "quarantine" / data.name), capped=prepared.capped,
                max_per_class=data.max_per_class, production=prepared.production,
                metrics={"accuracy": new.accuracy, "macro_f1": new.macro_f1, "p95_latency_ms": new.latency_p95_ms},
                report=report, version=version, alias=config.mlflow.candidate_alias,
                tracking_uri=config.mlflow.tracking_uri, run_id=run_id,
                note=None if not sweep_job else f"a job of sweep run `{parent_run_id}`: the sweep registers its best passing job",
            )
            logger.info("summary\n%s", text)
            create_markdown_artifact(text, key="build-summary", description="Build summary")

        if sweep_job:
            summarize(None)
            return BuildResult(run_id, dataset.version, config.mlflow.registered_model, None, reused,
                               gate="passed" if report.passed else "failed", metrics=metrics)
        if not report.passed:
            summarize(None)
            raise GateFailed(f"gate failed: {report.describe_failures()}")

        tags = trace | {
            "build_run_id": run_id, "environment": config.environment, "gate": "passed",
            "test_accuracy": f"{new.accuracy:.4f}", "test_macro_f1": f"{new.macro_f1:.4f}",
        }
        reproduce = "python -m flows.build " + shlex.join(
            [f"env={config.environment}", *overrides, f"data.version={dataset.version}"]
        )
        card = model_card(
            config.mlflow.registered_model, dataset.version, dataset.prepared.counts, asdict(new),
            markdown,
            {"build run": run_id, "model run": source_run_id, "ONNX sha256": registry.onnx_sha256(source_run_id), **trace},
            reproduce,
            dataset.prepared.production,
        )
        ref, created = register_model(registry, source_run_id, tags, card)
        logger.info("%s %s version %s, alias '%s'", "registered" if created else "reused", ref.name, ref.version,
                    config.mlflow.candidate_alias)
        chained = start_deployment(config.chain.after_build) if config.chain.after_build else None
        registry.log(run_id, tags={"mlops.model_version": ref.version, "mlops.chained": chained or "none"})
        summarize(ref.version)
    return BuildResult(run_id, dataset.version, ref.name, ref.version, reused, chained, metrics=metrics)


class BuildSweep:
    """A `-m` run of the build (a grid, or `search=optuna`) that chooses.

    Every job is a build with `sweep_job=True`, a child run of the sweep's MLflow run; jobs with the
    same data settings share one data version (ingested by the first of them). At the end, a table
    of the jobs, and the best passing job by `sweep.metric` is built again with its data version
    pinned: that reuses its trained model, registers it and moves the candidate alias.
    """

    def __init__(self) -> None:
        self.jobs: list[sweep.Job] = []
        self.data_versions: dict[str, str] = {}
        self.env, self.config, self.registry, self.parent = "test", None, None, None

    def run(self, env: str, overrides: list[str]) -> float | None:
        """One job; its `sweep.metric` (the value an Optuna trial returns), None when it failed."""
        job = sweep.Job(len(self.jobs), overrides)
        self.jobs.append(job)
        try:
            config = load_config("build", env, overrides)
            if self.parent is None:
                self.start(env, config, overrides)
            key = data_key(config)
            pinned = [f"data.version={self.data_versions[key]}"] if key in self.data_versions else []
            result = build(env=env, overrides=[*overrides, *pinned], parent_run_id=self.parent, sweep_job=True)
            self.data_versions.setdefault(key, result.data_version)
            job.metrics, job.gate, job.run_id, job.data_version = result.metrics, result.gate, result.run_id, result.data_version
            return sweep.objective(result.metrics, config.sweep.metric)
        except Exception as error:  # the job's flow run logged the details; the sweep goes on
            job.error = f"{type(error).__name__}: {error}"
            print(f"error: job {job.number} ({' '.join(overrides)}): {job.error}", file=sys.stderr)
            return None

    def start(self, env: str, config: BuildConfig, overrides: list[str]) -> None:
        self.env, self.config, self.registry = env, config, Registry(config.mlflow)
        name = f"sweep-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        self.parent = self.registry.start_run(name, {"mlops.flow": "build-sweep", "mlops.environment": env,
                                                     "mlops.sweep.metric": config.sweep.metric,
                                                     "mlops.sweep.command": " ".join(sys.argv[1:])[:5000]})
        print(f"sweep: MLflow run {name} ({self.parent}) holds the jobs as child runs")

    def finish(self) -> int:
        """Print the table, register the best passing job; the exit code (1 when a job failed to
        run or no job passed the gate)."""
        if self.config is None:
            return 1 if self.jobs else 0
        metric, direction = self.config.sweep.metric, self.config.sweep.direction
        chosen = sweep.best(self.jobs, metric, direction)
        text = sweep.table(self.jobs, metric, direction, chosen)
        print("\n" + text)
        self.registry.log_text(self.parent, text, "sweep/table.md")
        create_markdown_artifact(text, key="build-sweep", description=f"Sweep {self.parent}: its jobs and the best")
        if chosen is None:
            print("error: no job of the sweep passed the gate: no alias moved", file=sys.stderr)
            self.registry.end_run(self.parent, "FAILED")
            return 1
        overrides = [o for o in chosen.overrides if not o.startswith("data.version=")]
        try:
            result = build(env=self.env, overrides=[*overrides, f"data.version={chosen.data_version}"],
                           parent_run_id=self.parent)
        except Exception as error:
            print(f"error: registering job {chosen.number}: {type(error).__name__}: {error}", file=sys.stderr)
            self.registry.end_run(self.parent, "FAILED")
            return 1
        self.registry.log(self.parent, metrics={metric: chosen.metrics[metric]}, tags={
            "mlops.sweep.best_job": chosen.number, "mlops.sweep.best_run_id": chosen.run_id,
            "mlops.model_version": result.version})
        self.registry.end_run(self.parent)
        print(f"sweep: job {chosen.number} registered as {result.model_name} version {result.version},"
              f" alias '{self.config.mlflow.candidate_alias}'")
        return 1 if any(job.error for job in self.jobs) else 0


def data_key(config: BuildConfig) -> str:
    """What decides a job's data version: jobs with the same key share one ingest."""
    return json.dumps([config.data.model_dump(mode="json", exclude={"version"}), config.seed, str(config.dvc.repo)],
                      sort_keys=True)


def main() -> None:
    run_cli("build", lambda env, overrides: build(env=env, overrides=overrides), sweep=BuildSweep())


if __name__ == "__main__":
    main()
