"""The model server's OpenAPI document is true: schemathesis fuzzes it with real image bodies
and finds no server error and no response outside the document, with and without a token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import LiveApp

from mlops.config.serve import default_serve_config
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier

CONFIG = Path(__file__).parent / "schemathesis" / "schemathesis.toml"
TOKEN = "openapi-test-token"


@pytest.fixture(scope="module", params=[None, TOKEN], ids=["open", "token"])
def server(request, tiny_onnx):
    app = create_app(ServedModel("pets", "5", OnnxClassifier(tiny_onnx)), default_serve_config(), request.param)
    with LiveApp(app) as url:
        yield url, request.param


def test_the_document_declares_bodies_errors_and_security(server):
    url, token = server
    document = httpx.get(url + "/openapi.json").json()
    predict = document["paths"]["/predict"]["post"]
    assert {"multipart/form-data", "image/png", "image/jpeg", "application/octet-stream"} <= set(predict["requestBody"]["content"])
    assert {"200", "400", "413", "415", "422"} <= set(predict["responses"])
    batch = document["paths"]["/predict/batch"]["post"]
    assert batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["files"]["type"] == "array"
    labels = document["paths"]["/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert labels["properties"]["label"]["enum"] == ["cat", "dog", "fox"]
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    schemes = document.get("components", {}).get("securitySchemes")
    if token:
        assert schemes == {"bearer": {"type": "http", "scheme": "bearer"}}
        assert predict["security"] == [{"bearer": []}] and "401" in predict["responses"]
        assert "security" not in document["paths"]["/health"]["get"]
    else:
        assert schemes is None and "security" not in predict


@pytest.mark.slow  # runs schemathesis as a process: kept out of the fast tier
def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    url, token = server
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(CONFIG),
        "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "1",
        "--no-color", "--generation-database", "none", "--report-dir", str(tmp_path),
    ]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=os.environ | {"SCHEMATHESIS_TELEMETRY": "false"})
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    assert cases and int(cases[1]) >= 100 and cases[1] == cases[2], output[-3000:]
