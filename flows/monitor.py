"""The monitor flow: integrity, drift, performance, telemetry and bias over a window of traffic.

    python -m flows.monitor env=test                       # the last monitor.window (1h)
    python -m flows.monitor env=test monitor.window=24h

It reads what the model server recorded for the version being served, compares it with that
version's reference profile, writes an HTML report (MLflow artifact) and a Prefect summary,
alerts per `monitor.alerts` and starts the build flow per `monitor.retrain`. The rules (the
report, which alerts are due, whether to retrain) live in `mlops.monitor`; this file wires them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.chain import deployment_exists, start_deployment
from flows.config import load_config, overrides_for, run_cli
from mlops import summary
from mlops.config import MonitorConfig
from mlops.data import production
from mlops.deploy import processes
from mlops.monitor import alerts, memory, report, retrain, window
from mlops.monitor.profiling import Reference
from mlops.registry import Registry, VersionRef, to_json
from mlops.serve.inference import OnnxClassifier

NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}  # MLflow, webhooks
LOCAL = {"cache_policy": NO_CACHE}


@dataclass
class Retraining:
    decision: str  # a RetrainKind: none | cooldown | deployment | in_process | missing_deployment
    reasons: list[str] = field(default_factory=list)
    started: str | None = None  # the build's flow run id (deployment) or "in-process"
    state: str | None = None  # in-process: the build's final state (COMPLETED, FAILED)
    model_version: str | None = None  # in-process and completed: the version it registered
    labelled: int | None = None  # labelled production images the build would add (None: it adds none)
    note: str = ""  # why it did what it did


@dataclass
class MonitorResult:
    outcome: str  # healthy | breach | no traffic
    version: str
    requests: int
    breaches: list[str] = field(default_factory=list)
    alerts_sent: list[str] = field(default_factory=list)
    retrain: Retraining | None = None
    report: str | None = None  # where the HTML report is
    to_label: str | None = None  # the active-labelling export of this run (monitor.labelling)


@task(**NETWORK)
def served_version(config: MonitorConfig, registry: Registry) -> VersionRef:
    """monitor.version, else the version live in this environment, else the production alias."""
    if config.monitor.version:
        return registry.version(config.monitor.version)
    live = processes.read_live(config.paths.deploy)
    if live is not None:
        return registry.version(live.version)
    ref = registry.alias(config.mlflow.production_alias)
    if ref is None:
        raise processes.DeployError(f"nothing to monitor in {config.environment}: no live server and no production version")
    return ref


@task(**NETWORK)
def fetch_model(registry: Registry, ref: VersionRef, folder) -> tuple[Reference | None, list[str]]:
    """The version's reference profile (None for a version built without one) and its classes."""
    found = registry.download_reference(ref.run_id, folder)
    classes = list(OnnxClassifier(registry.download_model(ref.run_id, folder)).spec.classes)
    return (Reference.load(found) if found else None), classes


@task(**LOCAL)
def analyse(config: MonitorConfig, ref: VersionRef, reference: Reference | None, classes: list[str],
            start: datetime, end: datetime) -> tuple[report.MonitorReport, window.Traffic]:
    """Every section's checks over the window."""
    traffic = window.load_traffic(config.records.store, ref.version, start, end)
    judged = report.judge(traffic, reference, classes, config.monitor, config.slo.max_p95_latency_ms)
    return judged, traffic


@task(**NETWORK)
def publish(config: MonitorConfig, registry: Registry, judged: report.MonitorReport, page: str) -> tuple[str, str]:
    """The HTML report and JSON checks in a (finished) run of the monitor experiment; a Prefect summary."""
    tags = {"mlops.flow": "monitor", "mlops.environment": config.environment, "mlops.model_version": judged.version,
            "mlops.outcome": judged.outcome, "mlops.prefect_flow_run": str(flow_run.get_id() or "")}
    with registry.run(f"monitor-v{judged.version}", tags, config.mlflow.monitor_experiment) as run_id:
        registry.log_text(run_id, page, "report/monitor.html")
        registry.log_text(run_id, to_json(judged.to_dict()), "report/checks.json")
        metrics = {f"{s}.{c.name}": float(c.value) for s, checks in judged.sections.items() for c in checks if c.value is not None}
        if judged.shadow and judged.shadow["agreement"] is not None:
            metrics["shadow.agreement"] = judged.shadow["agreement"]
        registry.log(run_id, metrics={"requests": judged.requests, **metrics})
        location = f"{registry.artifact_uri(run_id)}/report/monitor.html"
    if config.monitor.alerts.report_base_url:
        experiment = registry.experiment_id(config.mlflow.monitor_experiment)
        location = f"{config.monitor.alerts.report_base_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    create_markdown_artifact(judged.to_markdown() + f"\n\nReport: {location}\n", key=f"monitor-{config.environment}",
                             description=f"Monitor {config.environment}")
    return run_id, location


@task(**NETWORK)
def send_to_sink(due: list[alerts.Alert], sink: str, url: str | None) -> None:
    if sink.startswith("prefect:"):
        notify_block(due, url)
    else:
        alerts.deliver(due, sink, url)


def notify_block(due: list[alerts.Alert], name: str) -> None:
    """Send through the Prefect notification block `name` (<block type slug>/<block name>)."""
    from prefect.blocks.abstract import NotificationBlock
    from prefect.blocks.core import Block

    try:
        block = Block.load(name)
    except ValueError as error:
        raise ValueError(f"monitor.alerts.prefect_blocks: no block '{name}' on the Prefect server"
                         f" (add it in the UI under Blocks): {error}") from None
    if not isinstance(block, NotificationBlock):
        raise ValueError(f"monitor.alerts.prefect_blocks: '{name}' is a {type(block).__name__}, not a notification block")
    subject, body = alerts.message(due)
    block.notify(body, subject)


def send_alerts(config: MonitorConfig, candidates: list[alerts.Alert]) -> list[str]:
    """Send every alert of `candidates` not sent within the quiet period."""
    logger, policy = get_run_logger(), config.monitor.alerts
    state_path, now = config.paths.monitor / "alerts.json", datetime.now(UTC)
    sent = memory.load_state(state_path)
    due = alerts.due_alerts(candidates, sent, window.parse_duration(policy.quiet_period), now)
    if not due:
        return []
    sinks, problems = alerts.resolve_sinks(policy, os.environ)
    for problem in problems:
        logger.error(problem)
    for sink, url in sinks.items():
        state = send_to_sink(due, sink, url, return_state=True)  # one sink failing does not stop the others
        if state.is_failed():
            logger.error("alert sink %s failed: %s", sink, state.message)
    memory.save_state(state_path, sent | {a.key: now.isoformat() for a in due})
    return [a.key for a in due]


@task(**NETWORK)
def count_labelled(config: MonitorConfig, classes: list[str], now: datetime) -> int:
    """The labelled production images a retraining build would add (`monitor.retrain.production`)."""
    start = window.window_start(config.monitor.retrain.production, now)
    collected = production.collect(config.captures.url, config.records.store, classes, config.captures.on_conflict, start)
    return len(collected.joined.labelled)


def stores_of(config: MonitorConfig) -> dict[str, object]:
    """The stores the build the monitor starts must use: the ones this run watches."""
    return {
        "paths.workspace": config.paths.workspace, "mlflow.tracking_uri": config.mlflow.tracking_uri,
        "mlflow.artifact_location": config.mlflow.artifact_location, "mlflow.experiment": config.mlflow.experiment,
        "mlflow.registered_model": config.mlflow.registered_model, "dvc.repo": config.dvc.repo,
        "dvc.remote": config.dvc.remote, "records.dir": config.records.dir, "records.url": config.records.url, "captures.url": config.captures.url,
    }


def retrain_if_due(config: MonitorConfig, judged: report.MonitorReport, classes: list[str], monitor_run_id: str,
                   overrides: list[str]) -> Retraining:
    """Start the build flow once per breach (cool-down), through its deployment or in-process,
    on the source data plus the labelled production images of `monitor.retrain.production`
    (waiting while there are fewer than `monitor.retrain.min_labelled`).

    The build gets this run's stores (`stores_of`: whatever the environment of the worker that runs
    it), this run's overrides that concern it, then `monitor.retrain.overrides`.
    """
    logger, policy = get_run_logger(), config.monitor.retrain
    state_path, now = config.paths.monitor / "retrain.json", datetime.now(UTC)
    state = memory.load_state(state_path)
    last = datetime.fromisoformat(state["last"]) if "last" in state else None
    breaches = [f"{s}.{c.name}" for s, c in judged.breaches]
    wanted = policy.production is not None and bool(retrain.retrain_reasons(breaches, policy.sections))
    labelled = count_labelled(config, classes, now) if wanted else None
    decision = retrain.retrain_policy(
        breaches, policy.sections, policy.mode, window.parse_duration(policy.cooldown), last, now,
        policy.mode != "in_process" and deployment_exists(policy.deployment), labelled, policy.min_labelled,
    )
    result = Retraining(decision.kind.value, list(decision.reasons), labelled=labelled, note=decision.note)
    if decision.kind is retrain.RetrainKind.MISSING_DEPLOYMENT:
        raise RuntimeError(f"monitor.retrain.deployment {policy.deployment} does not exist (mode: deployment)")
    if not decision.starts:
        if decision.reasons:
            logger.warning("retraining wanted (%s) but %s", ", ".join(decision.reasons), decision.note)
        return result
    trigger = f"monitor/{flow_run.get_id() or monitor_run_id}"
    data = [f"data.production={policy.production}"] if policy.production else []
    stores, withheld = retrain.store_overrides(stores_of(config))
    if withheld:
        logger.warning("not passed to the build (they hold a password): %s; the worker's environment must give"
                       " the same values", ", ".join(withheld))
    build_overrides = [*stores, *overrides_for("build", overrides), *data, *policy.overrides, f"trigger={trigger}"]
    if decision.kind is retrain.RetrainKind.DEPLOYMENT:
        result.started = start_deployment(policy.deployment, {"env": config.environment, "overrides": build_overrides})
    else:
        from flows.build import build

        logger.info("building in-process (%s)", decision.note)
        built = build(env=config.environment, overrides=build_overrides, return_state=True)
        result.started, result.state = "in-process", built.type.value
        if built.is_completed():
            result.model_version = built.result().version
    memory.save_state(state_path, {"last": now.isoformat(), "reasons": result.reasons, "started": result.started,
                                   "monitor_run": monitor_run_id})
    logger.warning("retraining started (%s): %s", ", ".join(result.reasons), result.started)
    return result


@task(**NETWORK)
def label_least_confident(config: MonitorConfig, classes: list[str]):
    """`monitor.labelling.export` unlabelled captures, least confident first, for a person to label."""
    from flows.label import export_for_monitor  # flows.label imports this module

    return export_for_monitor(config, classes, datetime.now(UTC))


@flow(name="monitor", log_prints=True)
def monitor(env: str = "test", overrides: list[str] | None = None) -> MonitorResult:
    """Analyse the last `monitor.window` of traffic in environment `env`."""
    overrides = list(overrides or [])
    config: MonitorConfig = load_config("monitor", env, overrides)
    logger = get_run_logger()
    registry = Registry(config.mlflow)
    ref = served_version(config, registry)
    end = datetime.now(UTC)
    start = end - window.parse_duration(config.monitor.window)
    reference, classes = fetch_model(registry, ref, config.paths.monitor / "cache" / f"v{ref.version}")
    judged, traffic = analyse(config, ref, reference, classes, start, end)
    for problem in judged.unreadable:
        logger.warning("unreadable record skipped (file left in place): %s", problem)
    run_id, location = publish(config, registry, judged, report.html_report(judged, traffic, reference, classes))
    result = MonitorResult(judged.outcome, ref.version, judged.requests, [f"{s}.{c.name}" for s, c in judged.breaches],
                           report=location)
    if judged.outcome == "no traffic":
        logger.info("no traffic for version %s in the last %s", ref.version, config.monitor.window)
        summarize(config, judged, result)
        return result
    result.alerts_sent = send_alerts(
        config, alerts.alerts_for(judged.breaches, config.monitor.alerts.sections, judged.version, location))
    result.retrain = retrain_if_due(config, judged, classes, run_id, overrides)
    registry.log(run_id, tags={"mlops.retrain": result.retrain.started or "none", "mlops.retrain_decision": result.retrain.decision,
                               "mlops.retrain_labelled": str(result.retrain.labelled)})
    if result.retrain.decision == retrain.RetrainKind.WAITING_FOR_LABELS:
        waiting = alerts.waiting_for_labels(result.retrain.labelled, config.monitor.retrain.min_labelled, judged.version, location)
        result.alerts_sent += send_alerts(config, [waiting])
        create_markdown_artifact(f"Retraining waits for labels: {result.retrain.note}.\n", key=f"monitor-{config.environment}-retrain",
                                 description="Retraining")
    exported = label_least_confident(config, classes)
    if exported is not None:
        result.to_label = str(exported)
        logger.info("the least confident unlabelled captures are waiting for a person in %s", exported)
    logger.info("%s: %d requests, breaches %s", judged.outcome, judged.requests, result.breaches or "none")
    summarize(config, judged, result)
    return result


def summarize(config: MonitorConfig, judged: report.MonitorReport, result: MonitorResult) -> None:
    """The verdict per section, what was sent and started, where the report is: console and artifact."""
    verdicts = {section: summary.section_verdict(checks) for section, checks in judged.sections.items()}
    retraining = result.retrain
    retrain = None if retraining is None else f"{retraining.decision}" + (
        f", started {retraining.started}" if retraining.started else "") + (f" ({retraining.note})" if retraining.note else "")
    text = summary.monitor_summary(config.environment, judged.version, judged.outcome, judged.requests, verdicts,
                                   result.report or "", result.alerts_sent, retrain)
    get_run_logger().info("summary\n%s", text)
    create_markdown_artifact(text, key=f"monitor-{config.environment}-summary", description="Monitor summary")


def main() -> None:
    run_cli("monitor", lambda env, overrides: monitor(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
