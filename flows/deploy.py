"""The deploy flow: validate a candidate in test, release it to production, roll back.

    python -m flows.deploy env=test                         # serve + test the candidate, approve it
    python -m flows.deploy env=production                   # release the approved version
    python -m flows.deploy env=production action=rollback   # put the previous version back
    python -m flows.deploy env=production action=stop       # stop the environment's server
    python -m flows.deploy env=production deploy=kubernetes # render manifests instead

Which of these a run does is configuration: `deploy.mode` (validate in env/test.yaml, release in
env/production.yaml), `action` and `deploy.target`.
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
from mlops import deployment, evaluation, registry, versioning
from mlops.config import DeployJob, secret
from mlops.data import load_prepared
from mlops.deployment import DeployError, LiveServer


@dataclass
class DeployResult:
    environment: str
    action: str
    version: str
    url: str | None
    previous_version: str | None = None
    manifests: str | None = None
    chained: str | None = None  # the flow run started by chain.after_validate


def token(config: DeployJob) -> str | None:
    """The bearer token the server will demand, from the variable the config names."""
    try:
        return secret(config.serve.token_env)
    except ValueError:
        variable = config.serve.token_env
        raise DeployError(f"serve.token_env: environment variable {variable} is not set (the server needs a token)") from None


@task(cache_policy=NO_CACHE)
def resolve_version(config: DeployJob, alias: str) -> registry.VersionRef:
    client, _ = registry.connect(config.mlflow)
    ref = registry.get_alias(client, config.mlflow.registered_model, alias)
    if ref is None:
        hint = {
            config.mlflow.candidate_alias: "run `python -m flows.build` first",
            config.mlflow.approved_alias: "run `python -m flows.deploy env=test` first",
            config.mlflow.previous_alias: "nothing was released before the current production version",
        }.get(alias, "")
        raise DeployError(f"model {config.mlflow.registered_model} has no '{alias}' version: {hint}")
    return ref


@task(cache_policy=NO_CACHE)
def fetch_test_split(config: DeployJob, ref: registry.VersionRef) -> tuple[list[tuple[Path, int]], list[str]]:
    """The test split of the data version the model was built on (checked out with DVC)."""
    client, _ = registry.connect(config.mlflow)
    tags = client.get_model_version(ref.name, ref.version).tags
    path = versioning.checkout_dataset(config.dvc.repo, config.dvc.remote, tags["data_name"], tags["data_version"])
    prepared = load_prepared(path)
    return prepared.files("test"), prepared.classes


@task(cache_policy=NO_CACHE)
def start_server(config: DeployJob, ref: registry.VersionRef, blue_green: bool) -> LiveServer:
    """Start the server process and wait for /ready; on failure it is stopped and the log shown."""
    server = deployment.start_server(config, ref.version, config.deploy.state_dir, blue_green, blue_green)
    try:
        deployment.wait_ready(server, config.deploy.ready_timeout_s)
    except DeployError:
        deployment.stop_server(server.pid)
        raise
    get_run_logger().info("version %s ready on %s (pid %d)", ref.version, server.admin_url, server.pid)
    return server


@task(cache_policy=NO_CACHE)
def test_application(
    config: DeployJob, server: LiveServer, files: list[tuple[Path, int]], classes: list[str]
) -> tuple[deployment.ApplicationResult, evaluation.GateReport]:
    result = deployment.run_application_tests(
        server.admin_url, files, classes, config.deploy.app_test_concurrency, token(config)
    )
    return result, evaluation.application_gate(result, config.thresholds.application)


@task(cache_policy=NO_CACHE)
def stop_server(server: LiveServer) -> None:
    deployment.stop_server(server.pid)


@task(cache_policy=NO_CACHE)
def report(config: DeployJob, ref: registry.VersionRef, lines: dict[str, object], gate: evaluation.GateReport | None) -> str:
    """The deploy report: a Prefect markdown artifact, MLflow tags on the version, a JSON file."""
    env, now = config.environment, datetime.now(UTC).isoformat()
    body = "\n".join(f"| {key} | {value} |" for key, value in lines.items())
    markdown = f"# Deploy {ref.name} v{ref.version} to {env}\n\n| | |\n|---|---|\n| at | {now} |\n{body}\n"
    if gate is not None:
        markdown += "\n## Application tests\n\n" + gate.to_markdown() + "\n"
    create_markdown_artifact(markdown, key=f"deploy-report-{env}", description=f"Deploy to {env}")
    client, _ = registry.connect(config.mlflow)
    tags = {f"deploy.{env}.at": now} | {f"deploy.{env}.{key}": value for key, value in lines.items()}
    for key, value in tags.items():
        client.set_model_version_tag(ref.name, ref.version, key, str(value))
    reports = config.deploy.state_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "model": ref.name, "version": ref.version, "at": now, **lines}
    if gate is not None:
        payload["application_tests"] = gate.to_dict()
    (reports / f"{now.replace(':', '')}-v{ref.version}.json").write_text(json.dumps(payload, indent=2, default=str))
    return markdown


def validate(config: DeployJob) -> DeployResult:
    """Test environment: serve the candidate, test the application over HTTP, approve on pass."""
    logger = get_run_logger()
    ref = resolve_version(config, config.mlflow.candidate_alias)
    state = config.deploy.state_dir
    old = deployment.read_live(state)
    if old is not None:
        stop_server(old)  # a test server kept from an earlier run
        deployment.write_live(state, None)
    files, classes = fetch_test_split(config, ref)
    server = start_server(config, ref, blue_green=False)
    deployment.write_live(state, server)
    try:
        result, gate = test_application(config, server, files, classes)
    finally:
        if not config.deploy.keep_test_server:
            stop_server(server)
            deployment.write_live(state, None)
    verdict = "passed" if gate.passed else "failed"
    client, _ = registry.connect(config.mlflow)
    report(config, ref, {"status": verdict, "url": server.url, **result.metrics()}, gate)
    if not gate.passed:
        failures = "; ".join(f"{c.name} {c.value} not {c.op} {c.bound}" for c in gate.failures)
        raise DeployError(f"application tests failed for version {ref.version}: {failures}")
    client.set_registered_model_alias(ref.name, config.mlflow.approved_alias, ref.version)
    logger.info("version %s approved for production (alias '%s')", ref.version, config.mlflow.approved_alias)
    chained = start_deployment(config.chain.after_validate) if config.chain.after_validate else None
    url = server.url if config.deploy.keep_test_server else None
    return DeployResult(config.environment, "validate", ref.version, url, chained=chained)


def release(config: DeployJob) -> DeployResult:
    """Production: blue-green to the approved version (or back to the previous one)."""
    logger = get_run_logger()
    m = config.mlflow
    rollback = config.action == "rollback"
    ref = resolve_version(config, m.previous_alias if rollback else m.approved_alias)
    client, _ = registry.connect(config.mlflow)
    current = registry.get_alias(client, m.registered_model, m.production_alias)
    state = config.deploy.state_dir
    old = deployment.read_live(state)
    if old is not None and not deployment.is_running(old.pid):
        logger.warning("recorded production server (pid %d, v%s) is not running", old.pid, old.version)
        old = None
    if old is not None and old.version == ref.version and current is not None and current.version == ref.version:
        logger.info("version %s is already serving on %s", ref.version, old.url)
        return DeployResult(config.environment, config.action, ref.version, old.url)

    files, classes = fetch_test_split(config, ref)
    new = start_server(config, ref, blue_green=True)
    try:  # smoke test on the new server alone, before any traffic moves
        result = deployment.run_application_tests(new.admin_url, files[:4], classes, 1, token(config))
        if result.errors:
            raise DeployError(f"new server answered {result.statuses} to test images")
    except BaseException:
        stop_server(new)
        raise
    deployment.write_live(state, new)
    if old is not None:
        stop_server(old)  # traffic on the shared port now goes to the new server only

    if current is not None and current.version != ref.version:
        client.set_registered_model_alias(m.registered_model, m.previous_alias, current.version)
        approved = registry.get_alias(client, m.registered_model, m.approved_alias)
        if rollback and approved is not None and approved.version == current.version:
            # the version rolled back from must pass the test environment again to return
            client.delete_registered_model_alias(m.registered_model, m.approved_alias)
    client.set_registered_model_alias(m.registered_model, m.production_alias, ref.version)
    previous = current.version if current else None
    report(config, ref, {"status": "live", "action": config.action, "url": new.url, "pid": new.pid, "replaced_version": previous}, None)
    logger.info("version %s live on %s (was %s)", ref.version, new.url, previous)
    return DeployResult(config.environment, config.action, ref.version, new.url, previous)


def stop(config: DeployJob) -> DeployResult:
    """Stop the environment's live server; aliases stay where they are."""
    live = deployment.read_live(config.deploy.state_dir)
    if live is None:
        get_run_logger().info("no server recorded for %s", config.environment)
        return DeployResult(config.environment, "stop", "", None)
    stop_server(live)
    deployment.write_live(config.deploy.state_dir, None)
    get_run_logger().info("stopped version %s on %s (pid %d)", live.version, live.url, live.pid)
    return DeployResult(config.environment, "stop", live.version, live.url)


def render(config: DeployJob) -> DeployResult:
    """Kubernetes target: render the manifests for the version this run would deploy."""
    m = config.mlflow
    if config.deploy.mode == "validate":
        alias = m.candidate_alias
    else:
        alias = m.previous_alias if config.action == "rollback" else m.approved_alias
    ref = resolve_version(config, alias)
    path = deployment.write_manifests(
        deployment.render_manifests(config, ref.version), config.deploy.manifests_dir / "model-server.yaml"
    )
    get_run_logger().info("wrote %s: apply with `kubectl apply -f %s`", path, path)
    return DeployResult(config.environment, "render", ref.version, None, manifests=str(path))


@flow(name="deploy", log_prints=True)
def deploy(env: str = "test", overrides: list[str] | None = None) -> DeployResult:
    """Deploy per `conf/deploy.yaml` in environment `env` with Hydra `overrides`."""
    config = load_config("deploy", env, list(overrides or []))
    if config.action == "stop":
        return stop(config)
    token(config)  # a missing token stops the run before anything starts
    if config.deploy.target == "kubernetes":
        return render(config)
    if config.deploy.mode == "validate":
        return validate(config)
    return release(config)


def main() -> None:
    run_cli("deploy", lambda env, overrides: deploy(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
