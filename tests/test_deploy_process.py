"""Server processes as the deploy flow manages them: started with a shared model cache, known by
pid, create time and instance id, and never confused with another server that took the pid."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import psutil
import pytest
from conftest import LiveApp, register_tiny

from flows.config import load_config
from mlops.config.serve import default_serve_config
from mlops.deploy import processes
from mlops.deploy.processes import DeployError, LiveServer
from mlops.serve.app import ServedModel, create_app
from mlops.serve.inference import OnnxClassifier


@pytest.fixture(scope="module")
def workspace(tiny_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("ws")
    register_tiny(tiny_onnx, path)
    return path


def config(workspace, *overrides: str):
    port = processes.free_port("127.0.0.1")
    return load_config("deploy", "test", [f"paths.workspace={workspace}", f"serve.port={port}", *overrides])


@pytest.mark.slow  # two real server processes
def test_stop_never_signals_another_server_that_took_the_pid(workspace, caplog):
    first_config, second_config = config(workspace), config(workspace)
    # two servers of one version started at once share the deploy cache (paths.deploy/models)
    first = processes.start_server(first_config, "1", blue_green=False)
    second = processes.start_server(second_config, "1", blue_green=False)
    try:
        for server in (first, second):
            ready = processes.wait_ready(server, 120)
            assert ready["instance"] == server.instance and server.identified
            command = psutil.Process(server.pid).cmdline()
            assert command[command.index("--cache-dir") + 1] == str(first_config.paths.deploy / "models")
        assert len(list((first_config.paths.deploy / "models").glob("*/model.onnx"))) == 1

        assert processes.stop_server(first) and not psutil.pid_exists(first.pid)
        # a stale live.json: the first server's record, its pid now taken by the second server
        stale = dataclasses.replace(first, pid=second.pid)
        processes.write_live(first_config.paths.deploy, stale)
        stale = processes.read_live(first_config.paths.deploy)
        assert not processes.is_running(stale)
        assert processes.stop_server(stale) is False
        assert processes.is_running(second)

        # a record written before identities were kept: recognised by its command line, and said so
        old = {key: value for key, value in dataclasses.asdict(second).items()
               if key not in ("create_time", "instance", "tls_cert")}
        (first_config.paths.deploy / processes.LIVE_FILE).write_text(json.dumps(old))
        with caplog.at_level(logging.WARNING, logger="mlops.deploy.processes"):
            legacy = processes.read_live(first_config.paths.deploy)
        assert not legacy.identified and "identity unknown" in caplog.text
        assert processes.is_running(legacy)

        assert processes.stop_server(second)
        assert not processes.is_running(second) and not psutil.pid_exists(second.pid)
    finally:
        for server in (first, second):
            processes.stop_server(server)


def test_wait_ready_ignores_an_answer_from_another_instance(tiny_onnx, tmp_path):
    served = ServedModel("pets", "1", OnnxClassifier(tiny_onnx), instance="theirs")
    with LiveApp(create_app(served, default_serve_config())) as url:
        port = int(url.rsplit(":", 1)[1])
        ours = LiveServer(os.getpid(), "pets", "1", "127.0.0.1", port, None, str(tmp_path / "log"), "now",
                          psutil.Process().create_time(), "ours")
        with pytest.raises(DeployError, match="was not ready"):
            processes.wait_ready(ours, 1.0)
        assert processes.wait_ready(dataclasses.replace(ours, instance="theirs"), 5.0)["instance"] == "theirs"

