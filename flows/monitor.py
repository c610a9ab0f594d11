"""The monitor flow: integrity, drift, performance, telemetry and bias over a window of traffic.

    python -m flows.monitor env=test                       # the last monitor.window (1h)
    python -m flows.monitor env=test monitor.window=24h

It reads what the model server recorded for the version being served, compares it with that
version's reference profile, writes an HTML report (MLflow artifact) and a Prefect summary,
alerts per `monitor.alerts` and starts the build flow per `monitor.retrain`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.chain import start_deployment
from flows.config import load_config, run_cli
from mlops import deployment, monitoring, registry
from mlops.config import Config
from mlops.inference import OnnxClassifier
from mlops.profiling import Reference


@dataclass
class MonitorResult:
    outcome: str  # healthy | breach | no traffic
    version: str
    requests: int
    breaches: list[str] = field(default_factory=list)
    alerts_sent: list[str] = field(default_factory=list)
    retrain: str | None = None  # what was started: a flow run id, or None
    report: str | None = None  # where the HTML report is


def served_version(config: Config) -> registry.VersionRef:
    """monitor.version, else the version live in this environment, else the production alias."""
    client, _ = registry.connect(config.mlflow)
    name = config.mlflow.registered_model
    if config.monitor.version:
        version = client.get_model_version(name, str(config.monitor.version))
        return registry.VersionRef(name, str(version.version), version.run_id)
    live = deployment.read_live(config.deploy.state_dir)
    if live is not None:
        version = client.get_model_version(name, live.version)
        return registry.VersionRef(name, live.version, version.run_id)
    ref = registry.get_alias(client, name, config.mlflow.production_alias)
    if ref is None:
        raise deployment.DeployError(f"nothing to monitor in {config.environment}: no live server and no production version")
    return ref


@task(cache_policy=NO_CACHE)
def analyse(config: Config, ref: registry.VersionRef, start: datetime, end: datetime, workdir: Path):
    """All five sections over the window; returns the report, the traffic, the reference, the classes."""
    client, _ = registry.connect(config.mlflow)
    traffic = monitoring.load_traffic(config.serve.records.dir, ref.version, start, end)
    report = monitoring.MonitorReport(ref.version, start, end, traffic.requests, unreadable=traffic.unreadable)
    folder = registry.download_reference(client, ref.run_id, workdir)
    reference = Reference.load(folder) if folder else None
    classes = list(OnnxClassifier(registry.download_model(client, ref.run_id, workdir)).spec.classes)
    if traffic.requests == 0:
        return report, traffic, reference, classes
    live = deployment.read_live(config.deploy.state_dir)  # /metrics needs no token
    metrics_text = monitoring.scrape(live.url + "/metrics") if live and live.version == ref.version else None
    drift_section, report.feature_drift = monitoring.drift_checks(traffic, reference, config.monitor)
    report.sections = {
        "integrity": monitoring.integrity_checks(traffic, config.monitor),
        "drift": drift_section,
        "performance": monitoring.performance_checks(traffic, classes, config.monitor),
        "telemetry": monitoring.telemetry_checks(traffic, metrics_text, config.monitor),
        "bias": monitoring.bias_checks(traffic, reference, classes, config.monitor),
    }
    return report, traffic, reference, classes


@task(cache_policy=NO_CACHE)
def publish(config: Config, report: monitoring.MonitorReport, page: str) -> tuple[str, str]:
    """The HTML report and JSON checks in an MLflow run of the monitor experiment; a Prefect summary."""
    settings = config.mlflow.model_copy(update={"experiment": f"{config.mlflow.experiment}-monitor"})
    client, experiment = registry.connect(settings)
    run_id = registry.start_run(
        client, experiment, f"monitor-v{report.version}",
        {"mlops.flow": "monitor", "mlops.environment": config.environment, "mlops.model_version": report.version,
         "mlops.outcome": report.outcome, "mlops.prefect_flow_run": str(flow_run.get_id() or "")},
    )
    client.log_text(run_id, page, "report/monitor.html")
    client.log_text(run_id, registry.to_json(report.to_dict()), "report/checks.json")
    metrics = {f"{s}.{c.name}": float(c.value) for s, checks in report.sections.items() for c in checks if c.value is not None}
    registry.log_flat(client, run_id, metrics={"requests": report.requests, **metrics})
    location = f"{client.get_run(run_id).info.artifact_uri}/report/monitor.html"
    if config.monitor.alerts.report_base_url:
        location = f"{config.monitor.alerts.report_base_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    create_markdown_artifact(report.to_markdown() + f"\n\nReport: {location}\n", key=f"monitor-{config.environment}",
                             description=f"Monitor {config.environment}")
    return run_id, location


@task(cache_policy=NO_CACHE)
def alert(config: Config, report: monitoring.MonitorReport, location: str) -> list[str]:
    policy = config.monitor.alerts
    alerts = [
        monitoring.Alert(section, check.name, check.value, check.bound, check.op, report.version, location)
        for section, check in report.breaches
        if section in policy.sections
    ]
    sinks = {}
    for sink in policy.sinks:
        variable = {"webhook": policy.webhook_url_env, "slack": policy.slack_url_env}.get(sink)
        url = os.environ.get(variable) if variable else None
        if variable and not url:
            get_run_logger().error("alert sink %s: environment variable %s is not set; skipped", sink, variable)
            continue
        sinks[sink] = url
    sent = monitoring.send_alerts(
        alerts, sinks, config.monitor.state_dir / "alerts.json",
        monitoring.parse_duration(policy.quiet_period), datetime.now(UTC),
    )
    return [a.key for a in sent]


@task(cache_policy=NO_CACHE)
def trigger_retraining(
    config: Config, report: monitoring.MonitorReport, monitor_run_id: str, overrides: list[str]
) -> str | None:
    """Start the build flow once per breach (cool-down), through its deployment or in-process.

    The build gets this run's own overrides (same stores), then `monitor.retrain.overrides`.
    """
    logger = get_run_logger()
    policy = config.monitor.retrain
    reasons = sorted({f"{s}.{c.name}" for s, c in report.breaches if s in policy.sections})
    if not reasons:
        return None
    state_path = config.monitor.state_dir / "retrain.json"
    state, now = monitoring.load_state(state_path), datetime.now(UTC)
    if not monitoring.due(state, "last", monitoring.parse_duration(policy.cooldown), now):
        logger.info("retraining wanted (%s) but in cool-down since %s", ", ".join(reasons), state["last"])
        return None
    trigger = f"monitor/{flow_run.get_id() or monitor_run_id}"
    overrides = [*overrides, *policy.overrides, f"trigger={trigger}"]
    started = None
    if policy.mode != "in_process":
        run_id = start_deployment(policy.deployment, {"env": config.environment, "overrides": overrides})
        if run_id is not None:
            started = f"flow run {run_id} of deployment {policy.deployment}"
        elif policy.mode == "deployment":
            raise RuntimeError(f"monitor.retrain.deployment {policy.deployment} does not exist (mode: deployment)")
    if started is None:
        from flows.build import build

        logger.info("building in-process (monitor.retrain.mode: %s)", policy.mode)
        state_of_build = build(env=config.environment, overrides=overrides, return_state=True)
        started = f"in-process build, {state_of_build.type.value}"
        if state_of_build.is_completed():
            started += f", model version {state_of_build.result().version}"
    monitoring.save_state(state_path, {"last": now.isoformat(), "reasons": reasons, "started": started, "monitor_run": monitor_run_id})
    logger.warning("retraining started (%s): %s", ", ".join(reasons), started)
    return started


@flow(name="monitor", log_prints=True)
def monitor(env: str = "test", overrides: list[str] | None = None) -> MonitorResult:
    """Analyse the last `monitor.window` of traffic in environment `env`."""
    overrides = list(overrides or [])
    config = load_config("monitor", env, overrides)
    logger = get_run_logger()
    ref = served_version(config)
    end = datetime.now(UTC)
    start = end - monitoring.parse_duration(config.monitor.window)
    workdir = config.monitor.state_dir / "cache" / f"v{ref.version}"  # the model and its reference
    report, traffic, reference, classes = analyse(config, ref, start, end, workdir)
    for problem in report.unreadable:
        logger.warning("unreadable record skipped (file left in place): %s", problem)
    page = monitoring.html_report(report, traffic, reference, classes)
    run_id, location = publish(config, report, page)
    result = MonitorResult(report.outcome, ref.version, report.requests, [f"{s}.{c.name}" for s, c in report.breaches], report=location)
    if report.outcome == "no traffic":
        logger.info("no traffic for version %s in the last %s", ref.version, config.monitor.window)
        return result
    result.alerts_sent = alert(config, report, location)
    result.retrain = trigger_retraining(config, report, run_id, overrides)
    client, _ = registry.connect(config.mlflow)
    client.set_tag(run_id, "mlops.retrain", result.retrain or "none")
    logger.info("%s: %d requests, breaches %s", report.outcome, report.requests, result.breaches or "none")
    return result


def main() -> None:
    run_cli("monitor", lambda env, overrides: monitor(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
