"""The whole loop on the embedded defaults, in one command:

    python -m flows.demo [workspace=demo-workspace] [port=8000] [test_port=8100] [keep=true] [Hydra overrides ...]

build -> deploy to test -> release to production -> drifted traffic (brightened photos) with
feedback labels, captured by the server -> monitor (alert, retrain on the source data plus the
labelled production images) -> the retrained version through the build gate, the test
environment and the release -> a before/after table. Production runs locally: its stores are
the workspace's (the variables env=production reads are set here unless already set), its
token is generated if missing.

The table is measured through HTTP on the served version's test split, which no build trained
on (neither clean nor brightened): clean and brightened by the same seed, before and after.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.build import build
from flows.config import load_config, overrides_for
from flows.deploy import deploy
from flows.monitor import monitor
from flows.startup import api_ready
from mlops import traffic
from mlops.data.versioning import dataset_of
from mlops.deploy import processes
from mlops.registry import Registry

TOKEN_FILE = "production-token"  # in the workspace, readable by its owner only
HELD_OUT_SEED = 7  # the brightened test split: the same images before and after
RETRAIN_TIMEOUT_S = 1800  # a retraining build a worker runs (monitor.retrain through the deployment)


@dataclass(frozen=True)
class Recovery:
    """HTTP accuracy of the production versions on the held-out test split, clean and drifted."""

    old: str
    new: str
    old_clean: float
    old_drifted: float
    new_clean: float
    new_drifted: float

    @property
    def recovered(self) -> float:
        """The share of the accuracy the drift took that the retrained version won back."""
        lost = self.old_clean - self.old_drifted
        return (self.new_drifted - self.old_drifted) / lost if lost > 0 else float("nan")

    def markdown(self, images: int, max_drop: float) -> str:
        regression = self.old_clean - self.new_clean
        verdict = "within" if regression <= max_drop else "BEYOND"
        return "\n".join([
            f"| held-out test split ({images} images, HTTP) | production v{self.old} | retrained v{self.new} |",
            "|---|---:|---:|",
            f"| clean | {self.old_clean:.3f} | {self.new_clean:.3f} |",
            f"| brightened (the drift) | {self.old_drifted:.3f} | {self.new_drifted:.3f} |",
            "",
            f"The retrained version won back {self.recovered:.0%} of the accuracy the drift took;"
            f" on clean images it changed by {-regression:+.3f}, {verdict} the gate's max_accuracy_drop {max_drop}.",
        ])


def production_variables(workspace: Path) -> dict[str, str]:
    """What conf/env/production.yaml reads, pointed at the local workspace (existing values win).

    A generated token is kept in `<workspace>/production-token` (mode 600), never in a log.
    """
    token_file = workspace / TOKEN_FILE
    token = os.environ.get("MLOPS_API_TOKEN")
    if not token:
        token = token_file.read_text().strip() if token_file.exists() else secrets.token_urlsafe(16)
        workspace.mkdir(parents=True, exist_ok=True)
        token_file.touch(mode=0o600)
        token_file.write_text(token)
    defaults = {
        "MLOPS_WORKSPACE": str(workspace),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db",
        "DVC_REMOTE_URL": str(workspace / "dvc-remote"),
    }
    return {key: os.environ.get(key, value) for key, value in defaults.items()} | {"MLOPS_API_TOKEN": token}


def shared_stores() -> list[str]:
    """Overrides that put every environment of the demo on the stores of the production variables:
    the workspace's by default (what env=test uses anyway), a server's when they name one
    (`source workspace/stack/production.env` after `deployments/stack.sh start --production`)."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    stores = [f"mlflow.tracking_uri={uri}", f"dvc.remote={os.environ['DVC_REMOTE_URL']}"]
    if uri.startswith(("http://", "https://")):  # the server keeps the artifacts (its bucket), unless told otherwise
        stores.append(f"mlflow.artifact_location={os.environ.get('MLFLOW_ARTIFACT_URI') or 'null'}")
    return stores


def wait_for_run(run_id: str, timeout_s: float = RETRAIN_TIMEOUT_S) -> str:
    """The final state type of a flow run a worker runs ("COMPLETED", "FAILED", ...); "TIMEOUT" past `timeout_s`."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_final():
                return state.type.value
            time.sleep(2)
    return "TIMEOUT"


def approve(production: list[str]) -> None:
    """What a reviewer does before each release (production's `deploy.approval: manual`)."""
    deploy(env="production", overrides=[*production, "action=approve", "reviewer=demo",
                                        "comment=the demo approves what passed the test environment"])


@flow(name="demo", log_prints=True)
def demo(
    workspace: str = "demo-workspace",
    port: int = 8000,
    test_port: int = 8100,
    keep: bool = True,
    overrides: list[str] | None = None,
) -> dict:
    """Run the loop; returns what each stage produced. `keep=False` stops the servers at the end."""
    logger = get_run_logger()
    root = Path(workspace).resolve()
    os.environ.update(production_variables(root))
    common = [f"paths.workspace={root}", *shared_stores(), *(overrides or [])]
    known = {o for flow in ("build", "deploy", "monitor") for o in overrides_for(flow, common)}
    unknown = [o for o in common if o not in known]
    if unknown:
        raise ValueError(f"overrides that no flow has a key for: {unknown}")
    test = [*overrides_for("deploy", common), f"serve.port={test_port}"]
    # the demo labels most of what it sends: keep every image (production's default keeps 10%)
    production = [*overrides_for("deploy", common), f"serve.port={port}", "serve.capture.sample_rate=1.0"]
    summary: dict[str, object] = {}
    try:
        first = build(env="test", overrides=[*overrides_for("build", common), "train.progress_bar=false"])
        summary["build"] = f"version {first.version} (data {first.data_version})"
        summary["deploy test"] = f"version {deploy(env='test', overrides=test).version} approved"
        approve(production)
        released = deploy(env="production", overrides=production)
        summary["release"] = f"version {released.version} live on {released.url}"

        config = load_config("deploy", "production", production)
        prepared = dataset_of(Registry(config.mlflow).version_tags(released.version), config.dvc)
        held_out = [(path, prepared.classes[label]) for path, label in prepared.files("test")]
        seen = [(path, prepared.classes[label]) for split in ("train", "val") for path, label in prepared.files(split)]
        token = os.environ["MLOPS_API_TOKEN"]

        def accuracy(drift: str) -> float:
            """The live production version's accuracy on the held-out test split (https when serve.tls is set)."""
            live = processes.read_live(config.paths.deploy)
            return traffic.replay(live.url, held_out, drift=drift, token=token, seed=HELD_OUT_SEED, verify=live.verify).accuracy

        before = {"clean": accuracy("none"), "brightness": accuracy("brightness")}
        verify = processes.read_live(config.paths.deploy).verify
        drifted = traffic.replay(released.url, seen, drift="brightness", feedback_share=0.8, token=token, seed=1, verify=verify)
        summary["traffic"] = f"drifted: {drifted.summary()}"
        # the server flushes its records every second, and ships them every records.upload_s to records.url
        time.sleep(1.5 + (config.records.upload_s if config.records.url else 0.0))

        watched = monitor(env="production", overrides=[*overrides_for("monitor", common), "monitor.window=30m"])
        summary["monitor"] = f"{watched.outcome}: {', '.join(watched.breaches) or 'no breach'}; report {watched.report}"
        summary["alerts"] = ", ".join(watched.alerts_sent) or "none"
        retrained = watched.retrain
        if retrained and retrained.started and retrained.started != "in-process":  # a worker runs the build
            logger.info("waiting for the retraining build %s (a worker runs it)", retrained.started)
            retrained.state = wait_for_run(retrained.started)
            candidate = Registry(config.mlflow).alias(config.mlflow.candidate_alias)
            if retrained.state == "COMPLETED" and candidate is not None:
                retrained.model_version = candidate.version
        summary["retrain"] = (f"{retrained.started}, {retrained.state}, model version {retrained.model_version}"
                              f" ({retrained.labelled} labelled production images)"
                              if retrained and retrained.started else f"not started: {retrained.note if retrained else ''}")
        if retrained and retrained.state == "COMPLETED":
            again = deploy(env="test", overrides=test, return_state=True)
            summary["retrained version in test"] = (
                f"version {again.result().version} approved" if again.is_completed() else f"failed: {again.message}"
            )
            if again.is_completed():
                approve(production)
                released_again = deploy(env="production", overrides=production)
                summary["retrained release"] = f"version {released_again.version} live on {released_again.url}"
                recovery = Recovery(released.version, released_again.version, before["clean"], before["brightness"],
                                    accuracy("none"), accuracy("brightness"))
                gate = load_config("build", "production", overrides_for("build", common)).gate
                table = recovery.markdown(len(held_out), gate.max_accuracy_drop)
                summary["recovery"] = recovery
                logger.info("before and after, on images no build trained on:\n%s", table)
                create_markdown_artifact(table, key="demo-recovery", description="Accuracy before and after retraining")
    finally:
        if not keep:
            for env in ("test", "production"):
                live = processes.read_live(root / "deploy" / env)
                if live is not None:
                    processes.stop_server(live)
                    processes.write_live(root / "deploy" / env, None)
    for stage, outcome in summary.items():
        if stage != "recovery":
            logger.info("%-26s %s", stage, outcome)
    if keep:
        variables = " ".join(f"{key}={shlex.quote(os.environ[key])}" for key in
                             ("MLOPS_WORKSPACE", "MLFLOW_TRACKING_URI", "DVC_REMOTE_URL"))
        logger.info(
            "production is still serving: curl -H \"Authorization: Bearer $(cat %s)\" -F file=@%s http://127.0.0.1:%d/predict"
            " ; stop it with: %s python -m flows.deploy env=production action=stop serve.port=%d",
            shlex.quote(str(root / TOKEN_FILE)), shlex.quote(str(held_out[0][0])), port, variables, port,
        )
    return summary


def main() -> None:
    api_ready()  # Prefect's temporary API, started by flows.startup while this module imported
    options, overrides = {}, []
    for item in sys.argv[1:]:
        key, _, value = item.partition("=")
        if key in ("workspace", "port", "test_port", "keep"):
            options[key] = value
        else:
            overrides.append(item)
    demo(
        workspace=options.get("workspace", "demo-workspace"),
        port=int(options.get("port", 8000)),
        test_port=int(options.get("test_port", 8100)),
        keep=options.get("keep", "true").lower() != "false",
        overrides=overrides,
    )


if __name__ == "__main__":
    main()
