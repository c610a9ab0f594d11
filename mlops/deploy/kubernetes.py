"""Kubernetes: the model server of a version as a Deployment, a Service and an Ingress (rendered, not applied).

TLS ends at the Ingress: clients reach it over https with the certificate of the Secret
`<model>-server-tls` (type kubernetes.io/tls, created by you: `kubectl create secret tls`); from
there to the pods traffic stays inside the cluster, in plain http. `serve.tls` (files on this
machine) applies to local servers only.

Records go to a volume of the pod; so do captures when `serve.capture.url` is a local path (a
path on this machine means nothing in a pod), while an object-store URL (s3://...) is passed
as it is, for every replica to write to.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from mlops.config import DeployConfig
from mlops.config.serve import CaptureConfig, TlsConfig
from mlops.deploy.processes import server_command


def host(name: str | None, key: str) -> dict:
    """The Ingress's host field (`hosts` in a TLS entry, `host` in a rule), absent for any host."""
    if name is None:
        return {}
    return {key: [name] if key == "hosts" else name}


CAPTURES_IN_POD = "/var/lib/mlops/captures"


def pod_capture(capture: CaptureConfig) -> tuple[CaptureConfig, bool]:
    """`serve.capture` as a pod uses it, and whether it needs the captures volume: a local path
    becomes the volume's; a remote URL stays."""
    from fsspec.core import split_protocol

    if not capture.enabled or capture.url is None or split_protocol(capture.url)[0] not in (None, "file", "local"):
        return capture, False
    return capture.model_copy(update={"url": CAPTURES_IN_POD}), True


def render_manifests(config: DeployConfig, version: str) -> list[dict]:
    """A Deployment, a Service and a TLS Ingress for the model server of `version`, from `deploy.kubernetes`."""
    k8s, serve = config.deploy.kubernetes, config.serve
    name = f"{config.mlflow.registered_model}-server"
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "mlops-flows", "mlops/environment": config.environment}
    capture, capture_volume = pod_capture(serve.capture)
    in_pod = serve.model_copy(
        update={"host": "0.0.0.0", "port": 8000, "tls": TlsConfig(), "cache_dir": None, "capture": capture}
    )
    volumes = [("records", "/var/lib/mlops/records")] + ([("captures", CAPTURES_IN_POD)] if capture_volume else [])
    records = config.records.model_copy(update={"dir": Path("/var/lib/mlops/records")})
    command = server_command(in_pod, records, "$(MLFLOW_TRACKING_URI)", config.mlflow.registered_model, version)
    command[0] = "python"
    env = [{"name": "MLFLOW_TRACKING_URI", "value": config.mlflow.tracking_uri}]
    if serve.token_env:
        env.append({
            "name": serve.token_env,
            "valueFrom": {"secretKeyRef": {"name": k8s.token_secret, "key": "token"}},
        })
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container = {
        "name": "model-server",
        "image": k8s.image,
        "command": command,
        "ports": [{"name": "http", "containerPort": 8000}],
        "env": env,
        "readinessProbe": probe | {"httpGet": {"path": "/ready", "port": "http"}, "initialDelaySeconds": 5},
        "livenessProbe": probe | {"httpGet": {"path": "/health", "port": "http"}, "initialDelaySeconds": 15},
        "resources": {
            "requests": {"cpu": k8s.cpu_request, "memory": k8s.memory_request},
            "limits": {"cpu": k8s.cpu_limit, "memory": k8s.memory_limit},
        },
        "volumeMounts": [{"name": volume, "mountPath": path} for volume, path in volumes],
    }
    metadata = {"name": name, "namespace": k8s.namespace, "labels": labels}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata | {"annotations": {"mlops/model-version": version}},
        "spec": {
            "replicas": k8s.replicas,
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"}},
                "spec": {"containers": [container], "volumes": [{"name": volume, "emptyDir": {}} for volume, _ in volumes]},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata | {"annotations": {
            # ingress-nginx: https only, and bodies as large as the server accepts (its default is 1m)
            "nginx.ingress.kubernetes.io/ssl-redirect": "true",
            "nginx.ingress.kubernetes.io/proxy-body-size": f"{math.ceil(serve.max_body_mb)}m",
        }},
        "spec": {
            "tls": [{"secretName": k8s.tls_secret or f"{name}-tls"} | host(k8s.ingress_host, "hosts")],
            "rules": [{"http": {"paths": [{
                "path": "/", "pathType": "Prefix", "backend": {"service": {"name": name, "port": {"name": "http"}}},
            }]}} | host(k8s.ingress_host, "host")],
        } | ({"ingressClassName": k8s.ingress_class} if k8s.ingress_class else {}),
    }
    return [deployment, service, ingress]


class _PlainDumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # no &anchors: manifests read as written
        return True


def write_manifests(documents: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump_all(documents, Dumper=_PlainDumper, sort_keys=False))
    return path
