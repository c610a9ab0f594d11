"""End-to-end on loopback: a person's approval through the Prefect API (the call the UI's form
makes) and from the command line, a rejection, a canary of a worse model rolled back under load
with no client error, a good one taken to 100%, and a shadow version compared by the monitor."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_deploy_flow
from test_deploy_flow import TOKEN, alias, client, production_url, run_deploy

from mlops.data.layout import dataset_dir
from mlops.deploy import processes as deployment
from mlops.registry import download_model, sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]
stack = test_deploy_flow.stack  # the same fixture: this module's own workspace copy and servers

MODEL = "digits"
FAST_CANARY = ["deploy.strategy=canary", "deploy.canary.poll_s=0.5", "deploy.canary.min_requests=15",
               "deploy.canary.min_labelled=10", "deploy.canary.max_wait_s=90", "deploy.canary.max_p95_ratio=5"]


def clone_version(stack, source: str = "1", permute: bool = False) -> str:
    """A new registered version of `source`'s model and lineage; `permute`: its logits rolled by
    one class (every answer wrong, the class shares unchanged): a deliberately worse model."""
    import onnx
    from onnx import helper, numpy_helper

    mlflow = client(stack)
    original = mlflow.get_model_version(MODEL, source)
    folder = stack[0] / "clones" / f"{source}-{time.monotonic_ns()}"
    path = download_model(mlflow, original.run_id, folder / "download")
    if permute:
        graph = (model := onnx.load(path)).graph
        for node in graph.node:
            node.output[:] = ["logits_unpermuted" if o == "logits" else o for o in node.output]
        classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
        graph.initializer.append(numpy_helper.from_array(np.roll(np.arange(classes), 1).astype(np.int64), "permutation"))
        graph.node.append(helper.make_node("Gather", ["logits_unpermuted", "permutation"], ["logits"], axis=1))
        onnx.save(model, path)
    run_id = mlflow.create_run(mlflow.get_experiment_by_name(MODEL).experiment_id).info.run_id
    mlflow.log_artifact(run_id, str(path), "model")
    mlflow.set_terminated(run_id)
    version = mlflow.create_model_version(MODEL, f"{mlflow.get_run(run_id).info.artifact_uri}/model", run_id=run_id).version
    kept = {k: v for k, v in original.tags.items() if not k.startswith(("deploy.", "approval.", "mlops.onnx_sha256"))}
    for key, value in kept.items() | {"mlops.onnx_sha256": sha256_file(path)}.items():
        mlflow.set_model_version_tag(MODEL, version, key, value)
    return str(version)


def tags(stack, version: str) -> dict[str, str]:
    return client(stack).get_model_version(MODEL, version).tags


def images_of(stack) -> list[tuple[Path, str]]:
    root = dataset_dir(stack[0] / "dvc", "digits") / "test"
    return [(path, folder.name) for folder in sorted(root.iterdir()) for path in sorted(folder.iterdir())]


class Load:
    """Clients sending test images (and their true labels as /feedback) until stopped, at most
    `limit` requests; a refused or reset connection is retried once, as clients should."""

    def __init__(self, stack, limit: int = 6000, threads: int = 2):
        self.images, self.url, self.limit = images_of(stack), production_url(stack), limit
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self.ids: list[str] = []
        self.failures: list[str] = []  # a client that gave up (after one retry)
        self.retried = 0
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.send, args=(seed,)) for seed in range(threads)]

    def post(self, http: httpx.Client, path: str, **kwargs) -> httpx.Response:
        for attempt in (1, 2):
            try:
                return http.post(self.url + path, **kwargs)
            except httpx.TransportError:  # a kept-alive connection the old server closed as it stopped
                if attempt == 2:
                    raise
                self.retried += 1
        raise AssertionError("unreachable")

    def send(self, seed: int) -> None:
        rng, headers = random.Random(seed), {"authorization": f"Bearer {TOKEN}"}
        try:
            with httpx.Client(timeout=10, headers=headers) as http:
                while not self.done.is_set() and len(self.statuses) < self.limit:
                    path, label = rng.choice(self.images)
                    answer = self.post(http, "/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
                    self.statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        body = answer.json()
                        self.versions.append(body["model"]["version"])
                        self.ids.append(body["request_id"])
                        given = self.post(http, "/feedback", json={"request_id": body["request_id"], "label": label})
                        self.statuses.append(given.status_code)
        except Exception as error:  # noqa: BLE001 - the test reads it
            self.failures.append(repr(error))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self.done.set()
        for thread in self.threads:
            thread.join()

    def no_client_error(self) -> bool:
        """Every request answered (202 for feedback), none given up; a retried reset is allowed, few."""
        return not self.failures and set(self.statuses) <= {200, 202} and self.retried <= 6


def paused_run(timeout_s: float = 120.0):
    """The deploy flow run waiting for its approval form."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as prefect:
        while time.monotonic() < deadline:
            runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("no flow run paused for approval")


def release_with_form(stack, answer: dict, *overrides: str):
    """Release with deploy.approval=manual; answer the paused run's form as the UI does."""
    from prefect.flow_runs import resume_flow_run

    result = {}
    runner = threading.Thread(target=lambda: result.setdefault(
        "state", run_deploy(stack, "production", "deploy.approval=manual", *overrides)))
    runner.start()
    try:
        paused = paused_run()
        assert paused.state.state_details.run_input_keyset  # it waits for a form, not a bare resume
        resume_flow_run(paused.id, run_input=answer)
    finally:
        runner.join(timeout=300)
    return result["state"]


def test_a_release_waits_for_the_approval_form_and_records_it(stack):
    assert run_deploy(stack, "test").is_completed()
    state = release_with_form(stack, {"approve": True, "reviewer": "Ana Reviewer", "comment": "figures as expected"})
    assert state.is_completed(), state.message
    assert alias(stack, "production") == "1"
    recorded = tags(stack, "1")
    assert (recorded["approval.decision"], recorded["approval.reviewer"], recorded["approval.via"]) == (
        "approved", "Ana Reviewer", "prefect-ui")
    assert recorded["approval.tested_at"] == recorded["deploy.test.at"]
    assert recorded["deploy.production.reviewer"] == "Ana Reviewer"  # in the deploy report too
    card = client(stack).get_model_version(MODEL, "1").description
    assert "**approved** by Ana Reviewer (prefect-ui): figures as expected" in card and "## Gate" in card
    reports = [json.loads(p.read_text()) for p in (stack[0] / "deploy" / "production" / "reports").glob("*.json")]
    assert any(r.get("approval") == "approved" and r.get("comment") == "figures as expected" for r in reports)


def test_a_rejected_version_cannot_be_released(stack):
    version = clone_version(stack)
    client(stack).set_registered_model_alias(MODEL, "candidate", version)
    assert run_deploy(stack, "test").is_completed()
    assert alias(stack, "approved") == version
    state = release_with_form(stack, {"approve": False, "reviewer": "Ana Reviewer", "comment": "worse on sevens"})
    assert state.is_failed() and "rejected by Ana Reviewer" in state.message
    assert alias(stack, "production") == "1" and tags(stack, version)["approval.decision"] == "rejected"
    assert httpx.get(production_url(stack) + "/ready").json()["version"] == "1"

    again = run_deploy(stack, "production", "deploy.approval=manual")  # no second form: the decision stands
    assert again.is_failed() and "rejected by Ana Reviewer" in again.message and "worse on sevens" in again.message

    # a person changes their mind from the command line: recorded the same way, then released
    decided = run_deploy(stack, "production", "action=approve", f"version={version}", "reviewer=Bo",
                         "comment=retested by hand")
    assert decided.is_completed(), decided.message
    assert (tags(stack, version)["approval.decision"], tags(stack, version)["approval.via"]) == ("approved", "cli")
    assert "**approved** by Bo (cli): retested by hand" in client(stack).get_model_version(MODEL, version).description
    assert run_deploy(stack, "production", "deploy.approval=manual").is_completed()
    assert alias(stack, "production") == version


def test_no_decision_in_time_without_a_server_or_a_bad_one_releases_nothing(stack):
    serving = alias(stack, "production")
    version = clone_version(stack, serving)
    client(stack).set_registered_model_alias(MODEL, "candidate", version)
    assert run_deploy(stack, "test").is_completed()

    timed_out = run_deploy(stack, "production", "deploy.approval=manual", "deploy.approval_timeout_s=2")
    assert timed_out.is_failed()  # Prefect's own words, "failed and never resumed", or ours: "no decision ..."
    assert "never resumed" in timed_out.message or f"no decision on version {version}" in timed_out.message
    assert alias(stack, "production") == serving and "approval.decision" not in tags(stack, version)

    # from a shell with no Prefect server there is no form to show: it says how to approve instead
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    workspace, ports = stack
    shell = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "env=production", f"paths.workspace={workspace}",
         f"serve.port={ports['production']}"], env=environment, capture_output=True, text=True, timeout=300)
    assert shell.returncode != 0
    assert f"action=approve version={version}" in shell.stdout + shell.stderr
    assert alias(stack, "production") == serving

    rejected = run_deploy(stack, "production", "action=reject", f"version={version}", "reviewer=Bo")
    assert rejected.is_failed() and "comment: a rejection needs a reason" in rejected.message
    unknown = run_deploy(stack, "production", "action=approve", "version=99", "reviewer=Bo")
    assert unknown.is_failed() and "version=99: no such version" in unknown.message
    assert "approval.decision" not in tags(stack, version)


def test_a_worse_canary_is_rolled_back_with_no_client_error(stack):
    serving = alias(stack, "production")
    worse = clone_version(stack, serving, permute=True)
    client(stack).set_registered_model_alias(MODEL, "approved", worse)  # it never passed the test environment
    with Load(stack) as load:
        state = run_deploy(stack, "production", *FAST_CANARY, "deploy.canary.steps=[{share:0.5,bake_s:30}]")
    assert state.is_failed() and "rolled back at 50%" in state.message and "accuracy" in state.message
    assert load.no_client_error() and worse in load.versions  # it answered some, then none
    assert alias(stack, "production") == serving
    live = deployment.read_live(stack[0] / "deploy" / "production")
    assert (live.version, live.challenger) == (serving, None)
    assert httpx.get(production_url(stack) + "/ready").json()["challenger"] is None
    recorded = tags(stack, worse)
    assert recorded["deploy.production.canary_1_verdict"] == "rollback"
    assert float(recorded["deploy.production.canary_1_canary_accuracy"]) < 0.3
    assert recorded["deploy.production.status"] == "rolled back"


def test_a_good_canary_goes_through_every_step_to_production(stack):
    serving = alias(stack, "production")
    good = clone_version(stack, serving)
    client(stack).set_registered_model_alias(MODEL, "approved", good)
    steps = "deploy.canary.steps=[{share:0.3,bake_s:3},{share:0.6,bake_s:3}]"
    with Load(stack) as load:  # the same model in both arms: at alpha 0.01 a step's chance shift rolls back 1 in 100
        state = run_deploy(stack, "production", *FAST_CANARY, steps, "deploy.canary.alpha=0.001")
    assert state.is_completed(), state.message
    assert load.no_client_error() and good in load.versions
    ready = httpx.get(production_url(stack) + "/ready").json()
    assert (ready["version"], ready["challenger"]) == (good, None)
    assert (alias(stack, "production"), alias(stack, "previous")) == (good, serving)
    recorded = tags(stack, good)
    assert [recorded[f"deploy.production.canary_{n}_verdict"] for n in (1, 2)] == ["promote", "promote"]
    assert [float(recorded[f"deploy.production.canary_{n}_share"]) for n in (1, 2)] == [0.3, 0.6]
    assert int(recorded["deploy.production.canary_2_canary_requests"]) >= 15
    assert recorded["deploy.production.strategy"] == "canary"


def test_a_shadow_answers_the_same_requests_unseen_and_the_monitor_compares(stack):
    from flows.monitor import monitor

    serving, challenger = alias(stack, "production"), "1"
    state = run_deploy(stack, "production", "action=shadow", f"version={challenger}", "deploy.shadow.sample_rate=1.0")
    assert state.is_completed(), state.message
    with Load(stack, limit=160, threads=1) as load:
        while len(load.ids) < 80 and not load.failures and not load.done.wait(0.2):
            pass
    assert load.no_client_error() and set(load.versions) == {serving}  # shadow answers are never returned
    time.sleep(2.0)  # the server flushes its records every second
    records = [json.loads(line) for path in (stack[0] / "records" / "production" / "requests").rglob("*.jsonl")
               for line in path.read_text().splitlines()]
    shadowed = {r["request_id"] for r in records if r.get("role") == "shadow" and r["model_version"] == challenger}
    assert set(load.ids) <= shadowed

    watched = monitor(env="production", overrides=[f"paths.workspace={stack[0]}", "monitor.window=10m",
                                                    "monitor.retrain.sections=[]"])
    assert watched.version == serving
    mlflow = client(stack)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name(f"{MODEL}-monitor").experiment_id],
                                order_by=["attributes.start_time DESC"], max_results=1)
    folder = Path(mlflow.download_artifacts(run.info.run_id, "report", str(stack[0] / "monitor-report")))
    shadow = json.loads((folder / "checks.json").read_text())["shadow"]
    assert shadow["versions"] == [challenger] and shadow["pairs"] >= 80
    assert shadow["agreement"] == pytest.approx(1.0)  # the same model file answers the same
    assert shadow["shadow"]["accuracy"] == shadow["champion"]["accuracy"] is not None
    assert run.data.metrics["shadow.agreement"] == pytest.approx(1.0)
    assert f"shadow: version {challenger} beside {serving}" in (folder / "monitor.html").read_text()
