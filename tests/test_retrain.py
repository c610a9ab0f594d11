"""The retraining rule (`mlops.monitor.retrain.retrain_policy`): pure, no Prefect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mlops.monitor.retrain import RetrainDecision, RetrainKind, retrain_policy, store_overrides

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SECTIONS = ["drift", "performance"]


def decide(breaches, mode="auto", last_started=None, deployment_exists=True, cooldown=timedelta(hours=6)):
    return retrain_policy(breaches, SECTIONS, mode, cooldown, last_started, NOW, deployment_exists)


@pytest.mark.parametrize("breaches", [[], ["telemetry.p95_latency_ms"], ["bias.recall_gap", "integrity.rejected_share"]])
def test_no_breach_in_retraining_sections_is_none(breaches):
    d = decide(breaches)
    assert d.kind is RetrainKind.NONE
    assert d.reasons == ()
    assert not d.starts


def test_within_cooldown_only_says_so():
    d = decide(["drift.share"], last_started=NOW - timedelta(hours=5, minutes=59))
    assert d.kind is RetrainKind.COOLDOWN
    assert d.reasons == ("drift.share",)
    assert not d.starts


def test_exactly_at_cooldown_boundary_starts():
    d = decide(["drift.share"], last_started=NOW - timedelta(hours=6))
    assert d.kind is RetrainKind.DEPLOYMENT
    assert d.starts


@pytest.mark.parametrize(
    ("mode", "exists", "kind"),
    [
        ("in_process", True, RetrainKind.IN_PROCESS),
        ("in_process", False, RetrainKind.IN_PROCESS),
        ("auto", True, RetrainKind.DEPLOYMENT),
        ("auto", False, RetrainKind.IN_PROCESS),
        ("deployment", True, RetrainKind.DEPLOYMENT),
        ("deployment", False, RetrainKind.MISSING_DEPLOYMENT),
    ],
)
def test_mode_and_deployment(mode, exists, kind):
    d = decide(["performance.accuracy"], mode=mode, deployment_exists=exists)
    assert d.kind is kind
    assert d.starts is (kind in (RetrainKind.DEPLOYMENT, RetrainKind.IN_PROCESS))


def test_reasons_sorted_deduplicated_and_filtered():
    d = decide(["performance.accuracy", "drift.share", "telemetry.error_rate", "drift.share"])
    assert d.reasons == ("drift.share", "performance.accuracy")


def test_section_must_match_whole_prefix():
    assert decide(["drifting.share"]).kind is RetrainKind.NONE


@pytest.mark.parametrize("kind", list(RetrainKind))
def test_starts_property(kind):
    assert RetrainDecision(kind).starts is (kind in {RetrainKind.DEPLOYMENT, RetrainKind.IN_PROCESS})


@pytest.mark.parametrize(("labelled", "kind"), [(3, RetrainKind.WAITING_FOR_LABELS), (20, RetrainKind.DEPLOYMENT),
                                                (None, RetrainKind.DEPLOYMENT)])
def test_a_retrain_on_production_data_waits_for_enough_labels(labelled, kind):
    decision = retrain_policy(["drift.drifted_share"], SECTIONS, "auto", timedelta(hours=6), None, NOW, True,
                              labelled=labelled, min_labelled=20)
    assert decision.kind is kind and not (kind is RetrainKind.WAITING_FOR_LABELS and decision.starts)
    if kind is RetrainKind.WAITING_FOR_LABELS:
        assert "3 labelled production image(s)" in decision.note and "monitor.retrain.min_labelled (20)" in decision.note


def test_the_cooldown_comes_before_the_label_count():
    decision = retrain_policy(["drift.drifted_share"], SECTIONS, "auto", timedelta(hours=6), NOW - timedelta(hours=1),
                              NOW, True, labelled=0, min_labelled=20)
    assert decision.kind is RetrainKind.COOLDOWN


def test_store_overrides_point_a_build_at_the_monitors_stores():
    overrides, withheld = store_overrides({
        "paths.workspace": Path("/srv/ml ws"), "mlflow.tracking_uri": "sqlite:////srv/ml ws/mlflow.db",
        "mlflow.artifact_location": None, "dvc.remote": "s3://bucket/dvc?region=eu,west", "records.dir": "/srv/it's",
    })
    assert overrides == ["paths.workspace='/srv/ml ws'", "mlflow.tracking_uri='sqlite:////srv/ml ws/mlflow.db'",
                         "dvc.remote='s3://bucket/dvc?region=eu,west'", "records.dir='/srv/it\\'s'"]
    assert withheld == []


def test_a_store_url_with_a_password_is_never_passed():
    overrides, withheld = store_overrides({"mlflow.tracking_uri": "postgresql://mlflow:s3cret@db:5432/mlflow",
                                           "dvc.remote": "s3://bucket/dvc"})
    assert withheld == ["mlflow.tracking_uri"] and overrides == ["dvc.remote='s3://bucket/dvc'"]
    assert "s3cret" not in " ".join(overrides)


def test_store_overrides_are_what_hydra_composes_back():
    from flows.config import load_config

    stores = {"paths.workspace": "/srv/a,b", "mlflow.tracking_uri": "sqlite:////srv/a,b/it's.db", "captures.url": "s3://c/x y"}
    config = load_config("build", "test", store_overrides(stores)[0])
    assert (str(config.paths.workspace), config.mlflow.tracking_uri, config.captures.url) == tuple(stores.values())


def test_an_estimated_accuracy_breach_retrains_before_any_label_or_waits_for_production_labels():
    on_source = retrain_policy(["performance.estimated_accuracy"], SECTIONS, "auto", timedelta(hours=6), None, NOW, True,
                               labelled=None, min_labelled=20)  # monitor.retrain.production: null
    assert on_source.kind is RetrainKind.DEPLOYMENT and on_source.reasons == ("performance.estimated_accuracy",)
    on_production = retrain_policy(["performance.estimated_accuracy"], SECTIONS, "auto", timedelta(hours=6), None, NOW,
                                   True, labelled=0, min_labelled=20)
    assert on_production.kind is RetrainKind.WAITING_FOR_LABELS and "0 labelled production image(s)" in on_production.note
