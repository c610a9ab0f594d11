"""Deployment pieces without the flow: Kubernetes manifests, process control, application tests."""

from __future__ import annotations

import subprocess
import sys

import kubernetes_validate
import pytest
from conftest import LiveApp, write_image

from flows.config import load_config
from mlops.config.serve import default_serve_config
from mlops.deploy import app_tests, kubernetes, processes
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier


@pytest.fixture
def production(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    return load_config(
        "deploy", "production",
        ["deploy=kubernetes", "deploy.kubernetes.replicas=3", "deploy.kubernetes.memory_limit=3Gi", f"paths.workspace={tmp_path}"],
    )


def test_manifests_are_valid_kubernetes_and_carry_the_config(production, tmp_path):
    documents = kubernetes.render_manifests(production, "12")
    for document in documents:
        kubernetes_validate.validate(document, "1.31", strict=True)
    path = kubernetes.write_manifests(documents, tmp_path / "k8s" / "model-server.yaml")
    assert "&id" not in path.read_text()

    manifest, service, ingress = documents
    spec = manifest["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == service["spec"]["selector"]
    assert container["resources"]["limits"]["memory"] == "3Gi"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["command"][container["command"].index("--version") + 1] == "12"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.internal:5000"
    assert env["MLOPS_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "model-server-token"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # TLS ends at the Ingress, with the certificate of a kubernetes.io/tls Secret
    assert ingress["kind"] == "Ingress" and ingress["spec"]["tls"] == [{"secretName": "digits-server-tls"}]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}



def test_the_ingress_host_class_and_secret_come_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("DVC_REMOTE_URL", str(tmp_path))
    config = load_config("deploy", "production", [
        "deploy=kubernetes", f"paths.workspace={tmp_path}", "deploy.kubernetes.ingress_host=pets.example.org",
        "deploy.kubernetes.ingress_class=nginx", "deploy.kubernetes.tls_secret=pets-cert",
    ])
    ingress = kubernetes.render_manifests(config, "4")[2]
    kubernetes_validate.validate(ingress, "1.31", strict=True)
    assert ingress["spec"]["tls"] == [{"secretName": "pets-cert", "hosts": ["pets.example.org"]}]
    assert ingress["spec"]["rules"][0]["host"] == "pets.example.org"
    assert ingress["spec"]["ingressClassName"] == "nginx"


def test_local_tls_files_stay_out_of_the_pods(production):
    from mlops.config.serve import TlsConfig

    local_tls = TlsConfig(cert_file="/etc/here/cert.pem", key_file="/etc/here/key.pem")
    config = production.model_copy(update={"serve": production.serve.model_copy(update={"tls": local_tls})})
    deployment, _, ingress = kubernetes.render_manifests(config, "3")
    command = " ".join(deployment["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "/etc/here" not in command and ingress["spec"]["tls"]  # TLS is the Ingress's job there


def test_an_invalid_manifest_is_caught_by_the_validator(production):
    document = kubernetes.render_manifests(production, "1")[0]
    document["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, "1.31", strict=True)


def test_stop_server_only_signals_model_servers(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not processes.is_running(other.pid)  # not a model server: never killed by pid reuse
        processes.stop_server(other.pid)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_application_tests_score_answers_over_http(tiny_onnx, tmp_path):
    model = OnnxClassifier(tiny_onnx)
    files = [(write_image(tmp_path / f"{i}.png", seed=i), i % 3) for i in range(12)]
    files.append((tmp_path / "broken.png", 0))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with LiveApp(create_app(ServedModel("pets", "1", model), default_serve_config())) as url:
        result = app_tests.run_application_tests(url, files, ["cat", "dog", "fox"], concurrency=3)

    from mlops.train.evaluation import classify

    truth, predicted = classify(model, files[:-1])
    assert result.requests == 13 and result.errors == 1 and result.statuses == {"200": 12, "422": 1}
    assert result.error_rate == pytest.approx(1 / 13)
    assert result.accuracy == pytest.approx((truth == predicted).sum() / 13)
    assert result.latency_p95_ms >= result.latency_p50_ms > 0
