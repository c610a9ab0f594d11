"""The operator's files under deployments/ agree with the code they describe.

Dashboard and alert queries name metrics (and labels) the model server really exports; the
Prometheus targets are the ports of conf/; the Kubernetes work pool template renders to a valid
Job; the GitHub workflow runs CI's own test command; stack.sh runs its commands in order (with
stand-ins for prefect, mlflow and curl: no server starts here).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
STACK = DEPLOYMENTS / "stack.sh"

YAML_FILES = [
    "prometheus/prometheus.yml",
    "prometheus/alerts.yml",
    "grafana/provisioning/datasources/prometheus.yml",
    "grafana/provisioning/dashboards/mlops.yml",
    "github-actions/mlops.yml",
]
JSON_FILES = ["grafana/model-server-dashboard.json", "kubernetes/work-pool-template.json"]

TARGET_LABELS = {"job", "instance", "environment"}  # added by Prometheus from the scrape config
PROMETHEUS_BUILTINS = {"up"}


def load_yaml(relative: str):
    return yaml.safe_load((DEPLOYMENTS / relative).read_text())


def load_json(relative: str):
    return json.loads((DEPLOYMENTS / relative).read_text())


@pytest.mark.parametrize("relative", YAML_FILES + JSON_FILES)
def test_file_parses(relative):
    path = DEPLOYMENTS / relative
    document = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    assert isinstance(document, dict) and document


# -- what the model server exports -----------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_onnx) -> dict[str, set[str]]:
    """Every series name the model server exports, with the label names seen on it.

    Names come from the server's own registry (`# TYPE` lines of generate_latest); labels from a
    real app after a prediction, a rejected request and a feedback label went through it.
    """
    from fastapi.testclient import TestClient
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from mlops.serve.inference import OnnxClassifier
    from mlops.serve.app import Metrics, ServedModel, create_app

    served = ServedModel("image-classifier", "7", OnnxClassifier(tiny_onnx))
    names: dict[str, set[str]] = {}
    for line in generate_latest(Metrics(served).registry).decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                series = [f"{name}_bucket", f"{name}_count", f"{name}_sum", f"{name}_created"]
            elif kind == "counter":  # its TYPE line already says name_total
                series = [name, name.removesuffix("_total") + "_created"]
            else:
                series = [name]
            names.update({s: set() for s in series})
    assert "mlops_requests_total" in names and "mlops_request_latency_seconds_bucket" in names

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 30, 200)).save(buffer, format="PNG")
    with TestClient(create_app(served)) as client:
        answer = client.post("/predict", files={"file": ("x.png", buffer.getvalue(), "image/png")})
        assert answer.status_code == 200, answer.text
        assert client.post("/predict", content=b"", headers={"content-type": "image/png"}).status_code == 400
        feedback = {"request_id": answer.json()["request_id"], "label": answer.json()["prediction"]}
        assert client.post("/feedback", json=feedback).status_code == 202
        text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert sample.name in names, f"{sample.name} served but not in the registry"
            names[sample.name] |= set(sample.labels)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(mlops_[a-zA-Z0-9_]+|up)\b(?!\s*\()", expr))


def label_names(expr: str) -> set[str]:
    """Labels an expression groups by or matches on (Grafana variables already substituted)."""
    found: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        found |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        found |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return found


def check_query(expr: str, exported: dict[str, set[str]], extra_labels: set[str] = frozenset()) -> None:
    names = metric_names(expr)
    assert names, f"no metric in {expr!r}"
    unknown = names - set(exported) - PROMETHEUS_BUILTINS
    assert not unknown, f"{expr!r} names metrics the model server does not export: {sorted(unknown)}"
    known = set(TARGET_LABELS)
    for name in names & set(exported):
        known |= exported[name]
    missing = (label_names(expr) | set(extra_labels)) - known
    assert not missing, f"{expr!r} uses labels its metrics do not have: {sorted(missing)}"


def test_query_checker_catches_mistakes(exported):
    check_query('sum by (endpoint) (rate(mlops_requests_total{environment=~"x"}[5m]))', exported)
    with pytest.raises(AssertionError, match="does not export"):
        check_query("rate(mlops_requests[5m])", exported)  # a counter without its _total
    with pytest.raises(AssertionError, match="labels"):
        check_query("sum by (class_name) (rate(mlops_errors_total[5m]))", exported)


def dashboard_targets() -> list[tuple[str, dict]]:
    dashboard = load_json("grafana/model-server-dashboard.json")
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel["targets"]]


@pytest.mark.parametrize("title,target", dashboard_targets(), ids=[f"{t}-{x['refId']}" for t, x in dashboard_targets()])
def test_dashboard_query_uses_exported_metrics(title, target, exported):
    expr = target["expr"].replace("$__rate_interval", "5m").replace("$environment", ".*")
    legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    check_query(expr, exported, legend)


def test_dashboard_shape():
    dashboard = load_json("grafana/model-server-dashboard.json")
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    used = {name for _, target in dashboard_targets() for name in metric_names(target["expr"])}
    for metric in ("mlops_requests_total", "mlops_request_latency_seconds_bucket", "mlops_errors_total",
                   "mlops_predictions_total", "mlops_batch_size_bucket", "mlops_feedback_total", "mlops_model_info"):
        assert metric in used, f"no panel shows {metric}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml("prometheus/alerts.yml")["groups"] for rule in group["rules"]]


@pytest.mark.parametrize("rule", alert_rules(), ids=[r["alert"] for r in alert_rules()])
def test_alert_rule_uses_exported_metrics(rule, exported):
    check_query(rule["expr"], exported)
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"]


# -- Prometheus scrape config -------------------------------------------------------------------


def test_prometheus_scrapes_the_configured_ports(monkeypatch, tmp_path):
    from flows.config import load_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    config = load_yaml("prometheus/prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOYMENTS / "prometheus" / rule_file).is_file()
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "mlops-model-server"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    scraped = {group["labels"]["environment"]: group["targets"] for group in job["static_configs"]}
    for env in ("test", "production"):
        serve = load_config("deploy", env, []).serve
        assert scraped[env] == [f"{serve.host}:{serve.port}"]


def test_commented_kubernetes_variant_matches_the_rendered_pods():
    """The commented kubernetes_sd job parses and keys on the annotations render_manifests sets."""
    from flows.config import load_config
    from mlops.deploy.kubernetes import render_manifests

    lines = (DEPLOYMENTS / "prometheus/prometheus.yml").read_text().splitlines()
    start = lines.index("  # - job_name: mlops-model-server")
    block = [line[4:] for line in lines[start:] if line.startswith("  # ") or line == "  #"]
    (job,) = yaml.safe_load("\n".join(block))
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"

    deployment = render_manifests(load_config("deploy", "test", ["deploy=kubernetes"]), "3")[0]
    pod = deployment["spec"]["template"]["metadata"]

    def meta(kind: str, key: str) -> str:
        return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    relabel = job["relabel_configs"]
    keep = [r for r in relabel if r.get("action") == "keep"]
    assert keep[0]["source_labels"] == [meta("annotation", "prometheus.io/scrape")]
    assert re.fullmatch(keep[0]["regex"], pod["annotations"]["prometheus.io/scrape"])
    port = [r for r in relabel if r.get("target_label") == "__address__"][0]
    assert port["source_labels"][1] == meta("annotation", "prometheus.io/port")
    match = re.fullmatch(port["regex"], f"10.0.0.7:8080;{pod['annotations']['prometheus.io/port']}")
    assert port["replacement"].replace("$1", match[1]).replace("$2", match[2]) == "10.0.0.7:8000"
    environment = [r for r in relabel if r.get("target_label") == "environment"][0]
    assert environment["source_labels"] == [meta("label", "mlops/environment")]
    assert "mlops/environment" in pod["labels"]


def test_grafana_provisioning():
    (source,) = load_yaml("grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    (provider,) = load_yaml("grafana/provisioning/dashboards/mlops.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# -- the Kubernetes work pool -----------------------------------------------------------------

TEMPLATE = "kubernetes/work-pool-template.json"
# What Prefect's Kubernetes worker requires of every job manifest (prefect_kubernetes.worker,
# _get_base_job_manifest); it rejects a template without these values.
PREFECT_REQUIRED = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "spec": {"template": {"spec": {"parallelism": 1, "completions": 1, "restartPolicy": "Never"}}},
}


def contains(whole, part) -> bool:
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and contains(whole[k], v) for k, v in part.items())
    return whole == part


def drop_none(value):
    """What the API server sees: the worker's client sends null for unset fields, which means absent."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value]
    return value


def render(template: dict, values: dict) -> dict:
    """The job manifest as the Kubernetes worker builds it: variable defaults, then the run's values."""
    from prefect.utilities.templating import apply_values

    properties = template["variables"]["properties"]
    filled = {name: spec["default"] for name, spec in properties.items() if "default" in spec} | values
    configuration = apply_values(template["job_configuration"], filled)
    manifest = configuration["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]  # as the worker does
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return manifest


def test_every_placeholder_is_a_declared_variable():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    template = load_json(TEMPLATE)
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    declared = set(template["variables"]["properties"])
    assert used - declared == set()
    assert {"image", "namespace", "env", "service_account_name", "finished_job_ttl", "cpu_request", "memory_request"} <= used
    validate_base_job_template(template)  # the server's own check when the pool is created
    broken = json.loads(json.dumps(template))
    broken["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        validate_base_job_template(broken)


def test_variables_are_a_json_schema_with_valid_defaults():
    variables = load_json(TEMPLATE)["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {name: spec["default"] for name, spec in variables["properties"].items() if "default" in spec}
    jsonschema.validate(defaults, variables)


def test_prefect_yaml_job_variables_fit_the_pool():
    variables = load_json(TEMPLATE)["variables"]
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    on_pool = [d for d in deployments if d.get("work_pool", {}).get("name") == "mlops-k8s"]
    for deployment in on_pool:
        job_variables = deployment["work_pool"].get("job_variables", {})
        assert set(job_variables) <= set(variables["properties"]), deployment["name"]
        jsonschema.validate(job_variables, variables)


SAMPLES = {
    "defaults": {},
    "overrides": {
        "image": "registry.example.com/mlops-flows:1.2.3",
        "namespace": "ml-prod",
        "service_account_name": "mlops-flows",
        "cpu_request": "500m",
        "memory_request": "2Gi",
        "memory_limit": "3Gi",
        "finished_job_ttl": None,
        "image_pull_policy": "Always",
        "env": {"PREFECT_LOGGING_LEVEL": "DEBUG"},
    },
}


@pytest.mark.parametrize("case", SAMPLES)
def test_job_manifest_renders_to_a_valid_kubernetes_job(case):
    template = load_json(TEMPLATE)
    jsonschema.validate(SAMPLES[case], template["variables"])
    worker_values = {  # what the worker always supplies for a flow run
        "name": "build-production-k8s-a1b2c3",
        "command": "prefect flow-run execute",
        "labels": {"prefect.io/flow-run-id": "0f6a3c9e-3d4e-4a1b-9a53-5b2f8f1c2d3e"},
        "env": {"PREFECT_API_URL": "http://prefect.mlops.svc:4200/api", "PREFECT__FLOW_RUN_ID": "0f6a3c9e"},
    }
    manifest = render(template, worker_values | SAMPLES[case])
    assert "{{" not in json.dumps(manifest)
    assert contains(manifest, PREFECT_REQUIRED)
    pod = manifest["spec"]["template"]["spec"]
    assert pod["containers"][0]["name"] == "prefect-job"
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]
    # Prefect demands parallelism/completions inside the pod spec, where Kubernetes drops them as
    # unknown fields; strict validation judges the rest.
    for key in ("parallelism", "completions"):
        pod.pop(key)
    kubernetes_validate.validate(drop_none(manifest), "1.31", strict=True)


def test_validation_is_strict_enough_to_fail():
    manifest = render(load_json(TEMPLATE), {"name": "x", "command": "prefect flow-run execute", "labels": {}, "env": {}})
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = ["2"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(drop_none(manifest), "1.31", strict=True)


def test_dockerfile():
    text = (DEPLOYMENTS / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", text, re.M)
    assert re.search(r"^RUN pip install \.\s*$", text, re.M)
    for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: not in the project"
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|AWS_)\w*\s*=", text), "no secret in the image"


# -- GitHub Actions ---------------------------------------------------------------------------


def test_github_workflow():
    workflow = load_yaml("github-actions/mlops.yml")
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    jobs = workflow["jobs"]

    def runs(job: str) -> list[str]:
        return [" ".join(step["run"].split()) for step in jobs[job]["steps"] if "run" in step]

    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1].strip()
    assert ci_command in runs("test")
    uses = [step.get("uses", "") for step in jobs["test"]["steps"]]
    assert any(u.startswith("actions/checkout@") for u in uses)
    (setup,) = [s for s in jobs["test"]["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert str(setup["with"]["python-version"]) == "3.11"

    assert jobs["build"]["needs"] == "test"
    assert ".venv/bin/python -m flows.build env=test" in runs("build")

    deploy = jobs["deploy"]
    assert deploy["needs"] == "build"
    assert "refs/heads/main" in deploy["if"]
    commands = runs("deploy")
    test_at = commands.index(".venv/bin/python -m flows.deploy env=test")
    production_at = commands.index(".venv/bin/python -m flows.deploy env=production")
    assert test_at < production_at
    (production,) = [s for s in deploy["steps"] if s.get("run", "").endswith("env=production")]
    # Every variable conf/env/production.yaml requires (no default), and the server token.
    text = (ROOT / "conf/env/production.yaml").read_text()
    required = set(re.findall(r"\$\{oc\.env:([A-Z_]+)\}", text)) | {"MLOPS_API_TOKEN"}
    for name in required:
        assert production["env"][name] == "${{ secrets.%s }}" % name


# -- stack.sh ---------------------------------------------------------------------------------


def run_stack(command: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), *command.split()], env=env, capture_output=True, text=True, timeout=timeout)


def test_stack_script_syntax():
    subprocess.run(["bash", "-n", str(STACK)], check=True)


def test_stack_status_with_an_empty_workspace(tmp_path):
    workspace = tmp_path / "workspace"
    env = os.environ | {"MLOPS_WORKSPACE": str(workspace)}
    result = run_stack("status", env)
    assert result.returncode == 0, result.stderr
    for part in ("prefect-server", "mlflow", "worker"):
        assert f"{part}: not running" in result.stdout
    assert "running (pid" not in result.stdout
    assert not workspace.exists(), "status must not create anything"
    assert run_stack("bogus", env).returncode == 2


def test_stack_ignores_a_stale_pid_file(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack/mlflow.pid").write_text(f"{dead.pid}\n")
    env = os.environ | {"MLOPS_WORKSPACE": str(tmp_path)}
    assert "mlflow: not running" in run_stack("status", env).stdout
    result = run_stack("stop", env)
    assert result.returncode == 0 and not (tmp_path / "stack/mlflow.pid").exists()


STAND_IN = """#!/usr/bin/env bash
# Records how it was called; the long-running commands sleep instead of serving.
echo "$(basename "$0") $* | cwd=$PWD | api=${PREFECT_API_URL:-} | workspace=${MLOPS_WORKSPACE:-}" >> "$CALLS"
case "$(basename "$0") $*" in
    "prefect server start"*|"prefect worker start"*|"mlflow server"*) exec sleep 60 ;;
    "prefect work-pool inspect"*) exit 1 ;;
esac
"""


@pytest.mark.slow  # starts processes: kept out of the fast tier
def test_stack_start_status_stop_with_stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("prefect", "mlflow", "curl"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.log"
    workspace = tmp_path / "ws"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_REMOTE_URL")} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MLOPS_VENV": "",
        "MLOPS_WORKSPACE": str(workspace),
        "PREFECT_PORT": "4311",
        "MLFLOW_PORT": "5011",
        "CALLS": str(calls),
        "STOP_TIMEOUT_S": "5",
    }
    try:
        started = run_stack("start", env)
        assert started.returncode == 0, started.stdout + started.stderr
        background = {  # started with & by launch: they may log in any order
            "prefect server start --host 127.0.0.1 --port 4311",
            f"mlflow server --host 127.0.0.1 --port 5011 --backend-store-uri sqlite:///{workspace}/mlflow.db"
            f" --artifacts-destination {workspace}/mlartifacts",
            "prefect worker start --pool mlops-process",
        }
        foreground = [
            "curl -fs -o /dev/null --max-time 2 http://127.0.0.1:4311/api/health",
            "curl -fs -o /dev/null --max-time 2 http://127.0.0.1:5011/health",
            "prefect work-pool inspect mlops-process",
            "prefect work-pool create mlops-process --type process",
            "prefect work-pool inspect mlops-k8s",
            "prefect work-pool create mlops-k8s --type kubernetes --base-job-template"
            " deployments/kubernetes/work-pool-template.json",
            "prefect --no-prompt deploy --all",
        ]
        deadline = time.monotonic() + 10
        while True:
            commands = [line.split(" | ")[0] for line in calls.read_text().splitlines()]
            if background <= set(commands) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert background <= set(commands)
        assert [c for c in commands if c not in background] == foreground
        deploy = [line for line in calls.read_text().splitlines() if " deploy --all" in line][0]
        assert f"cwd={ROOT} " in deploy and "api=http://127.0.0.1:4311/api" in deploy
        worker = [line for line in calls.read_text().splitlines() if "worker start" in line][0]
        assert "api=http://127.0.0.1:4311/api" in worker and f"workspace={workspace}" in worker

        status = run_stack("status", env).stdout
        for part in ("prefect-server", "mlflow", "worker"):
            assert re.search(rf"^{part}: running \(pid \d+\)$", status, re.M), status
        again = run_stack("start", env)
        assert again.returncode == 0 and again.stdout.count("already running") == 3
    finally:
        stopped = run_stack("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.count("stopped (pid") == 3
    assert run_stack("status", env).stdout.count("not running") == 3
    assert not list((workspace / "stack").glob("*.pid"))


def test_stack_production_without_postgresql_says_what_to_install(tmp_path):
    env = os.environ | {"MLOPS_WORKSPACE": str(tmp_path / "ws"), "PG_BIN": str(tmp_path / "nowhere")}
    result = run_stack("start --production", env)
    assert result.returncode == 1
    assert "PostgreSQL is not installed" in result.stderr and "apt-get install -y postgresql" in result.stderr
    assert not list((tmp_path / "ws" / "stack").glob("*.pid")), "nothing may be left running"
    bad = run_stack("start --prod", env)
    assert bad.returncode == 2 and "usage:" in bad.stderr
