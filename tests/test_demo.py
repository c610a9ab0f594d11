"""The README's one-command demo of the whole loop, shrunk to tiny data and two epochs."""

from __future__ import annotations

import os

import psutil
import pytest

from flows.demo import demo
from mlops.deploy import processes as deployment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_api")]

LOOSE = [
    "train.max_epochs=2", "data.max_per_class=40", "gate.min_accuracy=0.3", "gate.min_class_recall=0.0",
    "gate.max_recall_gap=1.0", "gate.max_accuracy_drop=1.0", "gate.max_macro_f1_drop=1.0",
]


def test_demo_runs_the_loop_and_the_retrained_version_passes_the_gates_again(tmp_path):
    saved = dict(os.environ)
    try:
        summary = demo(
            workspace=str(tmp_path / "ws"), port=deployment.free_port("127.0.0.1"),
            test_port=deployment.free_port("127.0.0.1"), keep=False, overrides=LOOSE,
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert summary["build"].startswith("version 1") and summary["deploy test"] == "version 1 approved"
    assert summary["release"].startswith("version 1 live on http://127.0.0.1:")
    assert summary["monitor"].startswith("breach: ") and "drift.drifted_share" in summary["monitor"]
    assert "drift.drifted_share@v1" in summary["alerts"]
    assert summary["retrain"] == "in-process, COMPLETED, model version 2"
    assert summary["retrained version in test"] == "version 2 approved"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
