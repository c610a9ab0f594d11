"""The build flow: ingest -> train -> package (+ reference profile) -> evaluate -> gate -> register.

    python -m flows.build env=test model=mobilenet_v3_small train.max_epochs=3
    python -m flows.build --cfg job env=production
    python -m flows.build -m model=resnet18,mobilenet_v3_small

`build` is the one flow object both the CLI and a Prefect deployment run; it takes an
environment name and Hydra overrides and composes its config itself.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.chain import start_deployment
from flows.config import load_config, run_cli, to_yaml
from mlops import data as data_lib
from mlops import evaluation, lineage, packaging, registry, training, versioning
from mlops.config import Config
from mlops.inference import OnnxClassifier, load_array


class GateFailed(RuntimeError):
    pass


@dataclass
class Dataset:
    prepared: data_lib.Prepared
    version: str


@dataclass
class BuildResult:
    run_id: str
    data_version: str
    model_name: str
    version: str | None
    reused_run_id: str | None
    chained: str | None = None  # the flow run started by chain.after_build


@task(cache_policy=NO_CACHE)
def ingest_data(config: Config) -> Dataset:
    """Materialize, validate, split and version the dataset (or check out a pinned version)."""
    logger = get_run_logger()
    d, repo = config.data, config.dvc.repo
    if d.version is not None:
        path = versioning.checkout_dataset(repo, config.dvc.remote, d.name, d.version)
        logger.info("checked out pinned data version %s", d.version)
        return Dataset(data_lib.load_prepared(path), d.version)
    target = versioning.dataset_dir(repo, d.name)
    prepared = data_lib.prepare_dataset(d, config.seed, config.paths.workspace, target)
    version = versioning.commit_dataset(repo, config.dvc.remote, d.name)
    if prepared.rejected:
        logger.warning(
            "%d images quarantined under %s:\n%s",
            len(prepared.rejected),
            config.paths.workspace / "quarantine" / d.name,
            "\n".join(f"  {r.path}: {r.kind} ({r.detail})" for r in prepared.rejected),
        )
    logger.info("data version %s: %s", version, {s: sum(c.values()) for s, c in prepared.counts.items()})
    return Dataset(prepared, version)


@task(cache_policy=NO_CACHE)
def train_model(config: Config, dataset: Dataset, run_id: str) -> training.Trained:
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(tracking_uri=config.mlflow.tracking_uri, run_id=run_id)
    workdir = config.paths.workspace / "runs" / run_id
    return training.train(config, dataset.prepared, workdir, logger=logger)


@task(cache_policy=NO_CACHE)
def package_model(config: Config, trained: training.Trained, dataset: Dataset, run_id: str) -> Path:
    """Export to ONNX, check parity on test images, log it in MLflow's ONNX flavour."""
    client, _ = registry.connect(config.mlflow)
    onnx_path = config.paths.workspace / "runs" / run_id / registry.ONNX_FILE
    packaging.export_onnx(trained.network, trained.spec, onnx_path, config.export.opset)
    files = dataset.prepared.files("test")[: config.export.parity_images]
    batch = np.stack([load_array(path, trained.spec) for path, _ in files])
    parity = packaging.check_parity(
        trained.network, onnx_path, batch, config.export.parity_atol, config.export.parity_rtol
    )
    client.log_artifact(run_id, str(trained.weights), "weights")
    registry.log_flat(client, run_id, metrics={"onnx_parity_max_abs_diff": parity.max_abs_diff})
    registry.log_onnx_model(client, run_id, onnx_path, batch[:1])
    return onnx_path


@task(cache_policy=NO_CACHE)
def profile_reference(config: Config, onnx_path: Path, dataset: Dataset, run_id: str) -> None:
    """The monitor's reference: whylogs profile of train-split image features and of the
    model's outputs on the validation split, stored with the run (and so with the version)."""
    from mlops.profiling import build_reference

    client, _ = registry.connect(config.mlflow)
    train = [path for path, _ in dataset.prepared.files("train")]
    val = [path for path, _ in dataset.prepared.files("val")]
    reference = build_reference(OnnxClassifier(onnx_path), train, val)
    folder = reference.save(config.paths.workspace / "runs" / run_id / "reference")
    client.log_artifacts(run_id, str(folder), registry.REFERENCE_ARTIFACT)


@task(cache_policy=NO_CACHE)
def evaluate_model(
    config: Config, onnx_path: Path, dataset: Dataset, run_id: str
) -> tuple[evaluation.Evaluation, evaluation.Evaluation | None, str]:
    """Metrics and latency of the new model and, on the same test split, of the production model."""
    client, _ = registry.connect(config.mlflow)
    files = dataset.prepared.files("test")
    new = evaluation.evaluate(OnnxClassifier(onnx_path), files, config.export.latency_images)
    registry.log_flat(client, run_id, metrics=new.metrics())
    workdir = config.paths.workspace / "runs" / run_id
    client.log_artifact(run_id, str(evaluation.plot_confusion(new, workdir / "confusion_matrix.png")), "evaluation")
    client.log_text(run_id, registry.to_json(asdict(new)), "evaluation/test_metrics.json")

    current = registry.get_alias(client, config.mlflow.registered_model, config.mlflow.production_alias)
    if current is None:
        return new, None, "no production model yet: comparison skipped"
    label = f"production v{current.version}"
    model = OnnxClassifier(registry.download_model(client, current.run_id, workdir / "production"))
    if list(model.spec.classes) != new.classes:
        return new, None, f"{label} has other classes {list(model.spec.classes)}: comparison skipped"
    production = evaluation.evaluate(model, files, config.export.latency_images)
    registry.log_flat(client, run_id, metrics=production.metrics("production_"))
    return new, production, label


@task(cache_policy=NO_CACHE)
def gate_model(
    config: Config,
    new: evaluation.Evaluation,
    production: evaluation.Evaluation | None,
    label: str,
    run_id: str,
) -> evaluation.GateReport:
    """Every check with value, bound and verdict: MLflow artifacts and tags, a Prefect artifact."""
    client, _ = registry.connect(config.mlflow)
    report = evaluation.gate(new, config.thresholds, production, label)
    client.log_text(run_id, registry.to_json(report.to_dict()), "gate/report.json")
    client.log_text(run_id, report.to_markdown(), "gate/report.md")
    verdicts = {f"mlops.gate.{check.name}": check.verdict for check in report.checks}
    registry.log_flat(client, run_id, tags={"mlops.gate": "passed" if report.passed else "failed"} | verdicts)
    create_markdown_artifact(report.to_markdown(), key="gate-report", description="Build gate")
    return report


@task(cache_policy=NO_CACHE)
def register_model(
    config: Config,
    dataset: Dataset,
    source_run_id: str,
    run_id: str,
    result: evaluation.Evaluation,
    report: evaluation.GateReport,
    trace: dict[str, str],
    overrides: list[str],
) -> registry.VersionRef:
    """Register (or reuse) the model version of `source_run_id` and point the candidate alias at it."""
    client, _ = registry.connect(config.mlflow)
    tags = trace | {
        "build_run_id": run_id,
        "environment": config.environment,
        "gate": "passed",
        "test_accuracy": f"{result.accuracy:.4f}",
        "test_macro_f1": f"{result.macro_f1:.4f}",
    }
    reproduce = "python -m flows.build " + shlex.join(
        [f"env={config.environment}", *overrides, f"data.version={dataset.version}"]
    )
    card = registry.model_card(
        config.mlflow.registered_model,
        dataset.version,
        dataset.prepared.counts,
        asdict(result),
        report.to_markdown(),
        {"build run": run_id, "model run": source_run_id, **trace},
        reproduce,
    )
    ref, created = registry.register(client, config.mlflow.registered_model, source_run_id, tags, card)
    client.set_registered_model_alias(ref.name, config.mlflow.candidate_alias, ref.version)
    get_run_logger().info(
        "%s %s version %s, alias '%s'",
        "registered" if created else "reused",
        ref.name,
        ref.version,
        config.mlflow.candidate_alias,
    )
    return ref


@flow(name="build", log_prints=True)
def build(env: str = "test", overrides: list[str] | None = None) -> BuildResult:
    """Build a model from the `conf/build.yaml` config in environment `env` with Hydra `overrides`."""
    overrides = list(overrides or [])
    logger = get_run_logger()
    config = load_config("build", env, overrides)
    config_yaml = to_yaml(config)
    create_markdown_artifact(f"```yaml\n{config_yaml}```", key="build-config", description="Resolved build config")
    config.paths.workspace.mkdir(parents=True, exist_ok=True)

    dataset = ingest_data(config)
    client, experiment_id = registry.connect(config.mlflow)
    trace = lineage.trace(config, dataset.version)
    key = lineage.train_key(config, dataset.version, trace["code_hash"])
    reused = None if config.force else registry.find_reusable_run(client, experiment_id, key)
    run_tags = {f"mlops.{k}": v for k, v in trace.items()} | {
        "mlops.flow": "build",
        "mlops.environment": config.environment,
        "mlops.overrides": " ".join(overrides),
        "mlops.trigger": config.trigger or "manual",
    }
    if reused:
        run_tags["mlops.reused_run_id"] = reused
    run_id = registry.start_run(client, experiment_id, f"build-{config.model.name}", run_tags)
    try:
        client.log_text(run_id, config_yaml, "config/resolved.yaml")
        client.log_text(run_id, (dataset.prepared.path / data_lib.MANIFEST).read_text(), "data/manifest.json")
        params = config.model_dump(mode="json", exclude={"mlflow", "paths", "dvc"})
        registry.log_flat(client, run_id, params=registry.flatten(params))
        if reused:
            logger.info("reusing the model of run %s: same data version, config and code (force=true retrains)", reused)
            source_run_id = reused
            onnx_path = registry.download_model(client, reused, config.paths.workspace / "runs" / run_id)
        else:
            client.set_tag(run_id, registry.TRAIN_KEY_TAG, key)
            trained = train_model(config, dataset, run_id)
            onnx_path = package_model(config, trained, dataset, run_id)
            profile_reference(config, onnx_path, dataset, run_id)
            source_run_id = run_id

        new, production, label = evaluate_model(config, onnx_path, dataset, run_id)
        report = gate_model(config, new, production, label, run_id)
        if not report.passed:
            failures = "; ".join(f"{c.name} {c.value} not {c.op} {c.bound}" for c in report.failures)
            raise GateFailed(f"gate failed: {failures}")

        ref = register_model(config, dataset, source_run_id, run_id, new, report, trace, overrides)
        client.set_tag(run_id, "mlops.model_version", ref.version)
        chained = start_deployment(config.chain.after_build) if config.chain.after_build else None
        client.set_tag(run_id, "mlops.chained", chained or "none")
        client.set_terminated(run_id, "FINISHED")
        return BuildResult(run_id, dataset.version, ref.name, ref.version, reused, chained)
    except BaseException as error:
        client.set_tag(run_id, "mlops.error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise


def main() -> None:
    run_cli("build", lambda env, overrides: build(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
