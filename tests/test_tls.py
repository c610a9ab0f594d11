"""https: the model server with `serve.tls` (a self-signed certificate made here), its clients
trusting that certificate, and one clear line for every way the setting can be wrong."""

from __future__ import annotations

import httpx
import pytest
from conftest import register_tiny, self_signed, write_image

from flows.config import load_config
from mlops.config.serve import TlsConfig, default_serve_config
from mlops.deploy import app_tests, processes
from mlops.deploy.processes import DeployError
from mlops.serve.server import ServerError, check_tls, main, tls_files

TOKEN = "tls-test-token"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.mark.slow  # starts a server process: kept out of the fast tier
def test_the_server_speaks_https_only_and_its_clients_verify_it(tiny_onnx, certificate, tmp_path, monkeypatch):
    cert, key = certificate
    register_tiny(tiny_onnx, tmp_path)
    monkeypatch.setenv("MLOPS_TLS_CERT", str(cert))  # paths from the environment, as in production
    monkeypatch.setenv("MLOPS_TLS_KEY", str(key))
    monkeypatch.setenv("MLOPS_API_TOKEN", TOKEN)
    config = load_config("deploy", "test", [
        f"paths.workspace={tmp_path}", f"serve.port={processes.free_port('127.0.0.1')}", "serve.token_env=MLOPS_API_TOKEN",
        "serve.tls.cert_file_env=MLOPS_TLS_CERT", "serve.tls.key_file_env=MLOPS_TLS_KEY",
    ])
    server = processes.start_server(config, "1", blue_green=False)
    try:
        assert server.url.startswith("https://") and server.tls_cert == str(cert)
        assert processes.wait_ready(server, 120)["instance"] == server.instance

        files = [(write_image(tmp_path / "images" / f"{i}.png", seed=i), i % 3) for i in range(6)]
        result = app_tests.run_application_tests(server.url, files, ["cat", "dog", "fox"], 2, TOKEN, server.verify)
        assert result.statuses == {"200": 6}
        image = files[0][0].read_bytes()
        assert httpx.post(server.url + "/predict", content=image, headers={"content-type": "image/png"},
                          verify=server.verify).status_code == 401  # the token is still required

        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(server.url + "/ready", timeout=5)  # the system's CAs do not know it
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url.replace("https://", "http://") + "/ready", timeout=5)  # no plain http
    finally:
        processes.stop_server(server)


def test_a_wrong_tls_setting_is_one_clear_line(certificate, tmp_path, monkeypatch):
    cert, key = certificate
    monkeypatch.delenv("MLOPS_TLS_KEY", raising=False)
    cases = {
        "serve.tls: key_file is not set": TlsConfig(cert_file=str(cert)),
        f"serve.tls.cert_file: cannot read {tmp_path / 'none.pem'}: No such file": TlsConfig(
            cert_file=str(tmp_path / "none.pem"), key_file=str(key)),
        "serve.tls.key_file_env: the variable MLOPS_TLS_KEY is not set": TlsConfig(
            cert_file=str(cert), key_file_env="MLOPS_TLS_KEY"),
        "serve.tls: cert_file and cert_file_env are both set": TlsConfig(
            cert_file=str(cert), cert_file_env="MLOPS_TLS_CERT", key_file=str(key)),
    }
    for message, tls in cases.items():
        with pytest.raises(ServerError, match=message):
            tls_files(tls)
    assert tls_files(TlsConfig()) is None

    other_cert, _ = self_signed(tmp_path / "other")
    with pytest.raises(ServerError, match=f"serve.tls: cannot use certificate {other_cert} with key {key}"):
        check_tls(TlsConfig(cert_file=str(other_cert), key_file=str(key)))  # a key of another certificate

    settings = default_serve_config().model_copy(update={"tls": TlsConfig(cert_file=str(cert))})
    with pytest.raises(SystemExit) as exit_:
        main(["--tracking-uri", "sqlite:///none.db", "--model", "m", "--version", "1", "--settings",
              settings.model_dump_json()])
    assert exit_.value.code.startswith("error: serve.tls: key_file is not set")

    config = load_config("deploy", "test", [f"paths.workspace={tmp_path}", f"serve.tls.cert_file={cert}"])
    with pytest.raises(DeployError, match="key_file is not set"):
        processes.tls_cert(config.serve)  # the deploy flow checks before it starts anything
