"""The deploy flow: validate a candidate in test, release it to production, roll back, stop.

    python -m flows.deploy env=test                         # action=validate: serve + test the candidate, approve it
    python -m flows.deploy env=production                   # action=release: the approved version, blue-green
    python -m flows.deploy env=production action=rollback   # put the previous version back
    python -m flows.deploy env=production action=stop       # stop the environment's server
    python -m flows.deploy env=production deploy=kubernetes # render manifests instead

`action` is the one switch (each environment sets its default and the actions it allows);
`mlops.deploy.release.plan` decides which version to serve and how the aliases move, and this
flow carries the plan out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.chain import start_deployment
from flows.config import load_config, run_cli
from mlops import summary
from mlops.checks import Report
from mlops.config import DeployConfig, DvcConfig, secret
from mlops.data import versioning
from mlops.deploy import app_tests, kubernetes, processes, release
from mlops.deploy.processes import DeployError, LiveServer
from mlops.deploy.release import Action, Plan
from mlops.registry import Registry

NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}  # MLflow, DVC remote
LOCAL = {"cache_policy": NO_CACHE}


@dataclass
class DeployResult:
    environment: str
    action: str
    version: str
    url: str | None
    previous_version: str | None = None
    manifests: str | None = None
    chained: str | None = None  # the flow run started by chain.after_validate
    figures: dict[str, float] | None = None  # the application tests' figures (action=validate)


def token(config: DeployConfig) -> str | None:
    """The bearer token the server will demand, from the variable the config names."""
    try:
        return secret(config.serve.token_env)
    except ValueError:
        variable = config.serve.token_env
        raise DeployError(f"serve.token_env: environment variable {variable} is not set (the server needs a token)") from None


@task(**NETWORK)
def read_aliases(registry: Registry) -> release.Aliases:
    """Where the aliases point, and what the `previous` version replaced when it was released."""
    m, found = registry.settings, registry.aliases()
    previous = found.get(m.previous_alias)
    before = registry.version_tags(previous).get(release.REPLACED_TAG) if previous else None
    return release.Aliases(
        candidate=found.get(m.candidate_alias), approved=found.get(m.approved_alias),
        production=found.get(m.production_alias), previous=previous, before_previous=before or None,
    )


@task(**NETWORK)
def move_aliases(registry: Registry, plan: Plan) -> None:
    """Carry out the plan's alias moves (and remember what a released version replaced)."""
    for move in plan.moves:
        registry.set_alias(getattr(registry.settings, f"{move.role}_alias"), move.version)
    if plan.action is Action.RELEASE and plan.moves:
        registry.tag_version(plan.version, {release.REPLACED_TAG: plan.replaced or ""})


@task(**NETWORK)
def fetch_test_split(registry: Registry, dvc: DvcConfig, version: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """The test split of the data version the model was built on (checked out with DVC)."""
    prepared = versioning.dataset_of(registry.version_tags(version), dvc)
    return prepared.files("test"), prepared.classes


@task(**LOCAL)
def start_server(config: DeployConfig, version: str, blue_green: bool) -> LiveServer:
    """Start the server process and wait for /ready; on failure it is stopped and the log shown."""
    server = processes.start_server(config, version, blue_green)
    try:
        processes.wait_ready(server, config.deploy.ready_timeout_s)
    except DeployError:
        processes.stop_server(server)
        raise
    get_run_logger().info("version %s ready on %s (pid %d)", version, server.admin_url, server.pid)
    return server


@task(**LOCAL)
def test_application(config: DeployConfig, server: LiveServer, files, classes: list[str]) -> tuple[app_tests.ApplicationResult, Report]:
    result = app_tests.run_application_tests(
        server.admin_url, files, classes, config.deploy.app_tests.concurrency, token(config), server.verify
    )
    return result, app_tests.application_gate(result, config.deploy.app_tests, config.slo.max_p95_latency_ms)


@task(**LOCAL)
def stop_server(server: LiveServer) -> bool:
    """Stop the server's process, if it is still that process (a pid can be reused)."""
    return processes.stop_server(server)


@task(**NETWORK)
def report(config: DeployConfig, registry: Registry, version: str, lines: dict[str, object], gate: Report | None) -> str:
    """The deploy report: a Prefect markdown artifact, MLflow tags on the version, a JSON file."""
    env, now = config.environment, datetime.now(UTC).isoformat()
    body = "\n".join(f"| {key} | {value} |" for key, value in lines.items())
    markdown = f"# Deploy {registry.model} v{version} to {env}\n\n| | |\n|---|---|\n| at | {now} |\n{body}\n"
    if gate is not None:
        markdown += "\n## Application tests\n\n" + gate.to_markdown() + "\n"
    create_markdown_artifact(markdown, key=f"deploy-report-{env}", description=f"Deploy to {env}")
    registry.tag_version(version, {f"deploy.{env}.at": now} | {f"deploy.{env}.{key}": value for key, value in lines.items()})
    reports = config.paths.deploy / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "model": registry.model, "version": version, "at": now, **lines}
    if gate is not None:
        payload["application_tests"] = gate.to_dict()
    (reports / f"{now.replace(':', '')}-v{version}.json").write_text(json.dumps(payload, indent=2, default=str))
    return markdown


def validate(config: DeployConfig, registry: Registry, plan: Plan) -> DeployResult:
    """Serve the candidate, test the application over HTTP, approve on pass."""
    logger, state = get_run_logger(), config.paths.deploy
    old = processes.read_live(state)
    if old is not None:
        stop_server(old)  # a test server kept from an earlier run
        processes.write_live(state, None)
    files, classes = fetch_test_split(registry, config.dvc, plan.version)
    server = start_server(config, plan.version, blue_green=False)
    processes.write_live(state, server)
    try:
        result, gate = test_application(config, server, files, classes)
    finally:
        if not config.deploy.keep_test_server:
            stop_server(server)
            processes.write_live(state, None)
    report(config, registry, plan.version, {"status": "passed" if gate.passed else "failed", "url": server.url,
                                            **result.metrics()}, gate)
    if not gate.passed:
        raise DeployError(f"application tests failed for version {plan.version}: {gate.describe_failures()}")
    move_aliases(registry, plan)
    logger.info("version %s approved for production (alias '%s')", plan.version, config.mlflow.approved_alias)
    chained = start_deployment(config.chain.after_validate) if config.chain.after_validate else None
    url = server.url if config.deploy.keep_test_server else None
    return DeployResult(config.environment, plan.action, plan.version, url, chained=chained, figures=result.metrics())


def release_version(config: DeployConfig, registry: Registry, plan: Plan, old: LiveServer | None) -> DeployResult:
    """Blue-green to the plan's version: the new server is checked alone before traffic moves."""
    logger, state = get_run_logger(), config.paths.deploy
    files, classes = fetch_test_split(registry, config.dvc, plan.version)
    new = start_server(config, plan.version, blue_green=True)
    try:  # smoke test on the new server alone, before any traffic moves
        result = app_tests.run_application_tests(new.admin_url, files[:4], classes, 1, token(config), new.verify)
        if result.errors:
            raise DeployError(f"new server answered {result.statuses} to test images")
    except BaseException:
        stop_server(new)
        raise
    processes.write_live(state, new)
    if old is not None:
        stop_server(old)  # traffic on the shared port now goes to the new server only
    move_aliases(registry, plan)
    replaced = old.version if old else None
    report(config, registry, plan.version, {"status": "live", "action": plan.action.value, "url": new.url,
                                            "pid": new.pid, "replaced_version": replaced}, None)
    logger.info("version %s live on %s (%s)", plan.version, new.url, plan.reason)
    return DeployResult(config.environment, plan.action, plan.version, new.url, replaced)


def stop(config: DeployConfig, live: LiveServer | None) -> DeployResult:
    """Stop the environment's live server; aliases stay where they are."""
    if live is None:
        get_run_logger().info("no server recorded for %s", config.environment)
        return DeployResult(config.environment, "stop", "", None)
    if stop_server(live):
        get_run_logger().info("stopped version %s on %s (pid %d)", live.version, live.url, live.pid)
    else:
        get_run_logger().info("version %s (pid %d) was not running any more: record cleared", live.version, live.pid)
    processes.write_live(config.paths.deploy, None)
    return DeployResult(config.environment, "stop", live.version, live.url)


def render(config: DeployConfig, plan: Plan) -> DeployResult:
    """Kubernetes target: render the manifests for the version the plan serves."""
    path = kubernetes.write_manifests(
        kubernetes.render_manifests(config, plan.version), config.deploy.manifests_dir / "model-server.yaml"
    )
    get_run_logger().info("wrote %s: apply with `kubectl apply -f %s`", path, path)
    return DeployResult(config.environment, "render", plan.version, None, manifests=str(path))


@flow(name="deploy", log_prints=True)
def deploy(env: str = "test", overrides: list[str] | None = None) -> DeployResult:
    """Deploy per `conf/deploy.yaml` in environment `env` with Hydra `overrides`; ends with a summary."""
    result = run_action(load_config("deploy", env, list(overrides or [])))
    text = summary.deploy_summary(result.environment, str(result.action), result.version, result.url,
                                  previous=result.previous_version, figures=result.figures, manifests=result.manifests,
                                  chained=result.chained)
    get_run_logger().info("summary\n%s", text)
    create_markdown_artifact(text, key=f"deploy-{result.environment}-summary", description="Deploy summary")
    return result


def run_action(config: DeployConfig) -> DeployResult:
    """What `config.action` asks for, on the environment's live server."""
    live = processes.read_live(config.paths.deploy)
    if config.action == Action.STOP:
        return stop(config, live)  # a record whose server is gone is cleared too
    if live is not None and not processes.is_running(live):
        get_run_logger().warning("recorded server (pid %d, v%s) is not running", live.pid, live.version)
        live = None
    token(config)  # a missing token or an incomplete serve.tls stops the run before anything starts
    processes.tls_cert(config.serve)
    registry = Registry(config.mlflow)
    try:
        plan = release.plan(config.action, read_aliases(registry), live.version if live else None)
    except release.Refused as refused:
        raise DeployError(f"action={config.action} for {registry.model}: {refused}") from None
    if plan.version is None:
        get_run_logger().info("%s: nothing to do (%s)", config.action, plan.reason)
        return DeployResult(config.environment, config.action, live.version, live.url)
    if config.deploy.target == "kubernetes":
        return render(config, plan)
    if plan.action is Action.VALIDATE:
        return validate(config, registry, plan)
    return release_version(config, registry, plan, live)


def main() -> None:
    run_cli("deploy", lambda env, overrides: deploy(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
