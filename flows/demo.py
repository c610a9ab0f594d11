"""The whole loop on the embedded defaults, in one command:

    python -m flows.demo [workspace=demo-workspace] [port=8000] [test_port=8100] [keep=true] [Hydra overrides ...]

build -> deploy to test -> release to production -> replay drifted traffic with feedback ->
monitor (alert, retrain) -> the retrained version through the build gate and the test
environment again. Production runs locally: its stores are the workspace's (the variables
env=production reads are set here unless already set), its token is generated if missing.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger

from flows.build import build
from flows.config import load_config, overrides_for
from flows.deploy import deploy
from flows.monitor import monitor
from mlops import traffic
from mlops.data.versioning import dataset_of
from mlops.deploy import processes
from mlops.registry import Registry

TOKEN_FILE = "production-token"  # in the workspace, readable by its owner only


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
    common = [f"paths.workspace={root}", *(overrides or [])]
    known = {o for flow in ("build", "deploy", "monitor") for o in overrides_for(flow, common)}
    unknown = [o for o in common if o not in known]
    if unknown:
        raise ValueError(f"overrides that no flow has a key for: {unknown}")
    test = [*overrides_for("deploy", common), f"serve.port={test_port}"]
    production = [*overrides_for("deploy", common), f"serve.port={port}"]
    summary: dict[str, object] = {}
    try:
        first = build(env="test", overrides=[*overrides_for("build", common), "train.progress_bar=false"])
        summary["build"] = f"version {first.version} (data {first.data_version})"
        summary["deploy test"] = f"version {deploy(env='test', overrides=test).version} approved"
        released = deploy(env="production", overrides=production)
        summary["release"] = f"version {released.version} live on {released.url}"

        config = load_config("deploy", "production", production)
        prepared = dataset_of(Registry(config.mlflow).version_tags(released.version), config.dvc)
        images = [(path, prepared.classes[label]) for path, label in prepared.files("test")]
        token = os.environ["MLOPS_API_TOKEN"]
        verify = processes.read_live(config.paths.deploy).verify  # https when serve.tls is set
        clean = traffic.replay(released.url, images, feedback_share=0.5, token=token, verify=verify)
        drifted = traffic.replay(released.url, images, requests=2 * len(images), drift="brightness",
                                 feedback_share=0.5, token=token, seed=1, verify=verify)
        summary["traffic"] = f"{clean.summary()} | drifted: {drifted.summary()}"
        time.sleep(1.5)  # the server flushes its records every second

        watched = monitor(env="production", overrides=[*overrides_for("monitor", common), "monitor.window=30m"])
        summary["monitor"] = f"{watched.outcome}: {', '.join(watched.breaches) or 'no breach'}; report {watched.report}"
        summary["alerts"] = ", ".join(watched.alerts_sent) or "none"
        retrained = watched.retrain
        summary["retrain"] = (f"{retrained.started}, {retrained.state}, model version {retrained.model_version}"
                              if retrained and retrained.started else "not triggered")
        if retrained and retrained.state == "COMPLETED":
            again = deploy(env="test", overrides=test, return_state=True)
            summary["retrained version in test"] = (
                f"version {again.result().version} approved" if again.is_completed() else f"failed: {again.message}"
            )
    finally:
        if not keep:
            for env in ("test", "production"):
                live = processes.read_live(root / "deploy" / env)
                if live is not None:
                    processes.stop_server(live)
                    processes.write_live(root / "deploy" / env, None)
    for stage, outcome in summary.items():
        logger.info("%-26s %s", stage, outcome)
    if keep:
        variables = " ".join(f"{key}={shlex.quote(os.environ[key])}" for key in
                             ("MLOPS_WORKSPACE", "MLFLOW_TRACKING_URI", "DVC_REMOTE_URL"))
        logger.info(
            "production is still serving: curl -H \"Authorization: Bearer $(cat %s)\" -F file=@%s http://127.0.0.1:%d/predict"
            " ; stop it with: %s python -m flows.deploy env=production action=stop serve.port=%d",
            shlex.quote(str(root / TOKEN_FILE)), shlex.quote(str(images[0][0])), port, variables, port,
        )
    return summary


def main() -> None:
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
