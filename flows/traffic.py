"""The traffic flow: replay the served version's test split against an environment's live server
(demos, tests, a bounded load), with a progress bar, a summary line and a Prefect artifact.

    python -m flows.traffic env=test                                   # each test image once
    python -m flows.traffic env=test traffic.drift=brightness traffic.requests=200 traffic.feedback=0.5
    python -m flows.traffic env=production traffic.drift=class_mix traffic.target=3

What to send is `traffic:` in `conf/traffic.yaml`; the live server, its token variable and the
stores come from the environment's deploy settings. `python -m mlops.traffic --help` is the same
replay for any URL and image folder, without Prefect.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flows.config import load_config, run_cli
from mlops import traffic as replay
from mlops.config import TrafficConfig, secret
from mlops.data.versioning import dataset_of
from mlops.deploy import processes
from mlops.registry import Registry


class ReplayFailed(RuntimeError):
    pass


@dataclass
class TrafficResult:
    url: str
    version: str
    sent: int
    ok: int
    errors: int
    feedback_sent: int
    accuracy: float
    elapsed_s: float


@flow(name="traffic", log_prints=True)
def traffic(env: str = "test", overrides: list[str] | None = None) -> TrafficResult:
    """Replay `traffic:` against environment `env`'s live server; fails when no request got an answer."""
    logger = get_run_logger()
    config: TrafficConfig = load_config("traffic", env, list(overrides or []))
    options = config.traffic
    live = processes.read_live(config.paths.deploy)
    if live is None or not processes.is_running(live):
        raise ReplayFailed(f"no server is live in {env} (start one with python -m flows.deploy env={env})")
    prepared = dataset_of(Registry(config.mlflow).version_tags(live.version), config.dvc)
    images = replay.load_images(prepared.path / "test")
    total = options.requests or len(images)
    with Progress(TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("replay", total=total)
        result = replay.replay(
            live.url, images, requests=options.requests, drift=options.drift, strength=options.strength,
            feedback_share=options.feedback, concurrency=options.concurrency, token=secret(config.serve.token_env),
            seed=options.seed, class_mix_target=options.target, verify=live.verify,
            progress=lambda: bar.advance(task),
        )
    line = f"{live.url} (version {live.version}) drift={options.drift}: {result.summary()}"
    logger.info(line)
    create_markdown_artifact(
        f"## Traffic {env}: {result.sent} requests to version {live.version}\n\n{line}\n\n"
        + "| sent | ok | errors | feedback | accuracy | seconds |\n|---:|---:|---:|---:|---:|---:|\n"
        + f"| {result.sent} | {result.ok} | {result.errors} | {result.feedback_sent} | {result.accuracy:.3f}"
          f" | {result.elapsed_s:.1f} |\n",
        key=f"traffic-{env}", description="Replayed traffic")
    if not result.ok:
        raise ReplayFailed(f"no request of {result.sent} got an answer from {live.url}")
    return TrafficResult(live.url, live.version, result.sent, result.ok, result.errors, result.feedback_sent,
                         result.accuracy, result.elapsed_s)


def main() -> None:
    run_cli("traffic", lambda env, overrides: traffic(env=env, overrides=overrides))


if __name__ == "__main__":
    main()
