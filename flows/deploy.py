"""The deploy flow: validate a candidate in test, release it to production, roll back, stop.

    python -m flows.deploy env=test                         # action=validate: serve + test the candidate, approve it
    python -m flows.deploy env=production                   # action=release: the approved version, blue-green
    python -m flows.deploy env=production action=rollback   # put the previous version back
    python -m flows.deploy env=production action=stop       # stop the environment's server
    python -m flows.deploy env=production action=approve version=3 comment="..."   # a person's decision
    python -m flows.deploy env=production deploy.strategy=canary   # 5% -> 25% -> 100%, judged per bake
    python -m flows.deploy env=production action=shadow version=4  # 4 answers a copy of sampled requests
    python -m flows.deploy env=production deploy=kubernetes # render manifests instead

`action` is the one switch (each environment sets its default and the actions it allows);
`mlops.deploy.release.plan` decides which version to serve and how the aliases move,
`mlops.deploy.approval` whether a person's decision lets it into production, and
`mlops.deploy.canary` whether a canary goes on or rolls back; this flow carries them out.
With `deploy.approval: manual` a release waits, paused, for the reviewer's form in the Prefect UI.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger, task
from pydantic import Field
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from flows.chain import start_deployment
from flows.config import load_config, run_cli
from mlops import summary
from mlops.checks import Report
from mlops.config import DeployConfig, DvcConfig, secret
from mlops.data import versioning
from mlops.deploy import app_tests, approval, canary, kubernetes, processes, release
from mlops.deploy.processes import DeployError, LiveServer
from mlops.deploy.release import Action, Plan
from mlops.registry import Registry
from mlops.serve.records import read_window

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
def start_server(
    config: DeployConfig, version: str, blue_green: bool, challenger: tuple[str, str, float] | None = None
) -> LiveServer:
    """Start the server process and wait for /ready; on failure it is stopped and the log shown."""
    server = processes.start_server(config, version, blue_green, challenger)
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


# -- approval --------------------------------------------------------------------------------


class ApprovalForm(RunInput):
    """The form a paused release shows in the Prefect UI."""

    approve: bool = Field(description="On: release this version to production. Off: reject it (say why below).")
    reviewer: str = Field(description="Your name, recorded on the model version and in its card")
    comment: str = Field("", description="What you checked, or why you reject it (required to reject)")


@task(**NETWORK)
def record_decision(config: DeployConfig, registry: Registry, version: str, verdict: approval.Verdict) -> None:
    """The decision as `approval.*` tags, in the model card and in the deploy report."""
    tags = registry.version_tags(version)
    registry.tag_version(version, approval.decision_tags(verdict, tags.get("deploy.test.at")))
    registry.add_to_card(version, approval.card_section(version, verdict))
    report(config, registry, version, {"approval": verdict.decision.value, "reviewer": verdict.reviewer,
                                        "comment": verdict.comment, "via": verdict.via}, None)
    get_run_logger().info("version %s %s by %s: %s", version, verdict.decision, verdict.reviewer, verdict.comment)


def api_server() -> str | None:
    """The Prefect API this run reports to, when it is a server a person can open (not ephemeral)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def wait_for_decision(config: DeployConfig, version: str, tags: dict[str, str]) -> approval.Verdict:
    """Pause this flow run with the approval form; the reviewer resumes it from the UI."""
    logger = get_run_logger()
    if api_server() is None:
        raise DeployError(
            f"version {version} needs a person's approval (deploy.approval: manual) and this run has no Prefect"
            f" server to show the form on: run `python -m flows.deploy env={config.environment} action=approve"
            f" version={version} comment=...` first, or run the release under a Prefect server")
    timeout = int(config.deploy.approval_timeout_s)
    logger.info("waiting up to %d s for a person to approve version %s in the Prefect UI", timeout, version)
    try:
        form = pause_flow_run(
            wait_for_input=ApprovalForm.with_initial_data(
                description=approval.summary_for_reviewer(version, tags), approve=False, reviewer="", comment=""),
            timeout=timeout, poll_interval=2, key=f"approve-{version}",
        )
    except Exception as error:  # FlowPauseTimeout, or the run was cancelled while paused
        raise DeployError(f"no decision on version {version} within {timeout} s (deploy.approval_timeout_s):"
                          f" nothing was released ({type(error).__name__})") from None
    try:
        return approval.decide(form.approve, form.reviewer, form.comment, datetime.now(UTC), "prefect-ui")
    except approval.BadDecision as bad:
        raise DeployError(f"the approval form for version {version}: {bad}; nothing was released") from None


def ensure_approved(config: DeployConfig, registry: Registry, version: str) -> None:
    """Go on only with a version a person approved (deploy.approval: manual): ask when undecided."""
    if config.deploy.approval == "auto":
        return
    tags = registry.version_tags(version)
    ok, why = approval.releasable(tags, "manual")
    if not ok and approval.awaiting(tags):
        record_decision(config, registry, version, wait_for_decision(config, version, tags))
        ok, why = approval.releasable(registry.version_tags(version), "manual")
    if not ok:
        raise DeployError(f"version {version} cannot be released: {why}")
    get_run_logger().info("version %s: %s", version, why)


def decide_by_hand(config: DeployConfig, registry: Registry, aliases: release.Aliases) -> DeployResult:
    """action=approve|reject from the command line, recorded as the UI form would be."""
    version = config.version or aliases.approved
    if version is None:
        raise DeployError(f"action={config.action}: no version given and no '{config.mlflow.approved_alias}' alias"
                          " (version=N)")
    try:
        tags = registry.version_tags(version)
    except Exception:  # noqa: BLE001 - MLflow's own error is long; say which version
        raise DeployError(f"version={version}: no such version of {registry.model}") from None
    if tags.get("deploy.test.status") != "passed":
        raise DeployError(f"version {version} has not passed the test environment: nothing to decide on"
                          " (python -m flows.deploy env=test)")
    decision = approval.Decision.APPROVED if config.action == "approve" else approval.Decision.REJECTED
    try:
        verdict = approval.decide(decision, config.reviewer or getpass.getuser(), config.comment, datetime.now(UTC), "cli")
    except approval.BadDecision as bad:
        raise DeployError(f"action={config.action}: {bad}") from None
    record_decision(config, registry, version, verdict)
    return DeployResult(config.environment, config.action, version, None)


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


def replace_server(config: DeployConfig, version: str, old: LiveServer | None, files, classes,
                   challenger: tuple[str, str, float] | None = None) -> LiveServer:
    """Blue-green: a new server (with `challenger` beside it, if given) is checked alone on its
    admin port, then takes the port and the old one stops; if it fails, the old one never noticed."""
    new = start_server(config, version, True, challenger)
    try:  # smoke test on the new server alone, before any traffic moves
        result = app_tests.run_application_tests(new.admin_url, files[:4], classes, 1, token(config), new.verify)
        if result.errors:
            raise DeployError(f"new server answered {result.statuses} to test images")
    except BaseException:
        stop_server(new)
        raise
    processes.write_live(config.paths.deploy, new)
    if old is not None:
        stop_server(old)  # traffic on the shared port now goes to the new server only
    return new


def release_version(config: DeployConfig, registry: Registry, plan: Plan, old: LiveServer | None) -> DeployResult:
    """Blue-green to the plan's version: the new server is checked alone before traffic moves."""
    logger = get_run_logger()
    files, classes = fetch_test_split(registry, config.dvc, plan.version)
    new = replace_server(config, plan.version, old, files, classes)
    move_aliases(registry, plan)
    replaced = old.version if old else None
    report(config, registry, plan.version, {"status": "live", "action": plan.action.value, "url": new.url,
                                            "pid": new.pid, "replaced_version": replaced}, None)
    logger.info("version %s live on %s (%s)", plan.version, new.url, plan.reason)
    return DeployResult(config.environment, plan.action, plan.version, new.url, replaced)


# -- canary and shadow -----------------------------------------------------------------------


def bake_bounds(config: DeployConfig) -> canary.BakeBounds:
    c = config.deploy.canary
    return canary.BakeBounds(c.min_requests, c.max_error_rate_increase, c.max_p95_ratio, c.max_prediction_shift,
                             c.max_accuracy_drop, c.min_labelled, c.alpha)


@task(**LOCAL)
def bake(config: DeployConfig, old: str, new: str, bake_s: float) -> tuple[canary.Judgement, dict, float]:
    """Watch both versions' request records (and feedback) from now until `judge_bake` decides."""
    settings, records = config.deploy.canary, config.records.dir
    start, began = datetime.now(UTC), time.monotonic()
    while True:
        time.sleep(settings.poll_s)
        elapsed, until = time.monotonic() - began, datetime.now(UTC) + timedelta(seconds=1)
        labels = {r["request_id"]: r["label"] for r in read_window(records, "feedback", start, until).records}
        found = canary.arms(read_window(records, "requests", start, until).records, labels,
                            {canary.Role.CHAMPION: old, canary.Role.CANARY: new})
        judged = canary.judge_bake(found[canary.Role.CHAMPION], found[canary.Role.CANARY], bake_bounds(config),
                                   baked=elapsed >= bake_s, timed_out=elapsed >= settings.max_wait_s)
        if judged.verdict is not canary.Verdict.WAIT:
            return judged, {role: arm.figures() for role, arm in found.items()}, elapsed


def release_canary(config: DeployConfig, registry: Registry, plan: Plan, old: LiveServer | None) -> DeployResult:
    """The plan's version on each step's share of requests beside the production one, judged per
    bake; a breach puts the old version back alone, passing every step releases it (100%)."""
    logger = get_run_logger()
    if old is None:
        logger.info("no version is serving: nothing to compare a canary with, releasing blue-green")
        return release_version(config, registry, plan, old)
    files, classes = fetch_test_split(registry, config.dvc, plan.version)
    current, steps = old, config.deploy.canary.steps
    for number, step in enumerate(steps, 1):
        current = replace_server(config, old.version, current, files, classes, (plan.version, "canary", step.share))
        logger.info("canary step %d/%d: version %s on %.0f%% of requests beside %s", number, len(steps), plan.version,
                    step.share * 100, old.version)
        judged, figures, seconds = bake(config, old.version, plan.version, step.bake_s)
        lines = {f"canary_{number}_share": step.share, f"canary_{number}_seconds": round(seconds, 1),
                 f"canary_{number}_verdict": judged.verdict.value, f"canary_{number}_reasons": "; ".join(judged.reasons)}
        for role, values in figures.items():
            lines |= {f"canary_{number}_{role}_{key}": value for key, value in values.items()}
        report(config, registry, plan.version, lines, None)
        if judged.verdict is canary.Verdict.ROLLBACK:
            replace_server(config, old.version, current, files, classes)
            report(config, registry, plan.version, {"status": "rolled back", "canary_rolled_back_at": step.share}, None)
            raise DeployError(f"canary of version {plan.version} rolled back at {step.share:.0%}: "
                              + "; ".join(judged.reasons) + f" (version {old.version} serves alone again)")
    new = replace_server(config, plan.version, current, files, classes)
    move_aliases(registry, plan)
    report(config, registry, plan.version, {"status": "live", "action": "release", "strategy": "canary",
                                            "url": new.url, "pid": new.pid, "replaced_version": old.version}, None)
    logger.info("version %s passed %d canary steps: live on %s", plan.version, len(steps), new.url)
    return DeployResult(config.environment, plan.action, plan.version, new.url, old.version)


def start_shadow(config: DeployConfig, registry: Registry, aliases: release.Aliases, live: LiveServer | None) -> DeployResult:
    """Restart production (blue-green) with `version` beside it answering a sampled copy of requests."""
    version = config.version or aliases.approved
    if live is None:
        raise DeployError("action=shadow: no server is serving in this environment: release a version first")
    if version is None or version == live.version:
        raise DeployError(f"action=shadow: give a version other than the serving {live.version} (version=N)")
    files, classes = fetch_test_split(registry, config.dvc, version)
    rate = config.deploy.shadow.sample_rate
    new = replace_server(config, live.version, live, files, classes, (version, "shadow", rate))
    report(config, registry, version, {"shadow_of": live.version, "shadow_sample_rate": rate, "url": new.url}, None)
    get_run_logger().info("version %s shadows %s on %.0f%% of requests (answers recorded, never returned)",
                          version, live.version, rate * 100)
    return DeployResult(config.environment, "shadow", live.version, new.url)


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
    registry = Registry(config.mlflow)
    if config.action in ("approve", "reject"):
        return decide_by_hand(config, registry, read_aliases(registry))
    token(config)  # a missing token or an incomplete serve.tls stops the run before anything starts
    processes.tls_cert(config.serve)
    if config.action == "shadow":
        return start_shadow(config, registry, read_aliases(registry), live)
    try:
        plan = release.plan(config.action, read_aliases(registry), live.version if live else None)
    except release.Refused as refused:
        raise DeployError(f"action={config.action} for {registry.model}: {refused}") from None
    if plan.version is None:
        get_run_logger().info("%s: nothing to do (%s)", config.action, plan.reason)
        return DeployResult(config.environment, config.action, live.version, live.url)
    if plan.action is Action.RELEASE and plan.moves:
        ensure_approved(config, registry, plan.version)
    if config.deploy.target == "kubernetes":
        return render(config, plan)
    if plan.action is Action.VALIDATE:
        return validate(config, registry, plan)
    if plan.action is Action.RELEASE and plan.moves and config.deploy.strategy == "canary":
        return release_canary(config, registry, plan, live)
    return release_version(config, registry, plan, live)


def main() -> None:
    run_cli("deploy", lambda env, overrides: deploy(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
