"""A new sqlite MLflow store starts as a copy of an empty one (`registry.seed_sqlite_store`): real MLflow."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mlflow import MlflowClient

from mlops.config import MlflowConfig
from mlops.registry import Registry, seed_sqlite_store


def schema(database: Path) -> tuple[dict, list]:
    """Every table's and index's definition, and the schema revision. A definition is compared
    as its set of lines: MLflow's own migrations write a table's constraints in varying order."""
    with sqlite3.connect(database) as connection:
        found = connection.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        revision = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    return {(kind, name): {line.strip().rstrip(",") for line in (sql or "").splitlines()} for kind, name, sql in found}, revision


def test_a_seeded_store_is_the_store_mlflow_makes(tmp_path):
    made, seeded = tmp_path / "made", tmp_path / "seeded"
    made.mkdir(), seeded.mkdir()
    MlflowClient(f"sqlite:///{made}/mlflow.db").search_experiments()  # MLflow runs its migrations
    uri = f"sqlite:///{seeded}/mlflow.db"
    assert seed_sqlite_store(uri, tmp_path / "templates")
    assert schema(seeded / "mlflow.db") == schema(made / "mlflow.db")
    client = MlflowClient(uri, uri)
    assert client.get_experiment("0").name == "Default"  # MLflow adds it, as in a store it made
    run = client.create_run(client.create_experiment("digits", artifact_location=(seeded / "art").as_uri()))
    client.log_metric(run.info.run_id, "accuracy", 0.9)
    client.create_registered_model("digits")
    assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
    assert [m.name for m in client.search_registered_models()] == ["digits"]
    again = tmp_path / "again"
    again.mkdir()
    assert seed_sqlite_store(f"sqlite:///{again}/mlflow.db", tmp_path / "templates")  # from the kept template
    assert schema(again / "mlflow.db") == schema(made / "mlflow.db")


def test_nothing_stored_is_touched_and_what_it_cannot_seed_is_left_to_mlflow(tmp_path):
    templates = tmp_path / "templates"
    kept = tmp_path / "mlflow.db"
    kept.write_bytes(b"a store with runs in it")
    assert not seed_sqlite_store(f"sqlite:///{kept}", templates)
    assert kept.read_bytes() == b"a store with runs in it"
    assert not seed_sqlite_store(f"sqlite:///{tmp_path}/no-such-folder/mlflow.db", templates)
    assert not seed_sqlite_store(f"sqlite:///{tmp_path}/other.db?timeout=5", templates)
    assert not seed_sqlite_store("postgresql://mlflow@127.0.0.1/mlflow", templates)
    blocked = tmp_path / "a-file-not-a-folder"
    blocked.write_text("")
    folder = tmp_path / "workspace"
    folder.mkdir()
    assert not seed_sqlite_store(f"sqlite:///{folder}/mlflow.db", blocked)  # no cache to keep a template in
    assert list(folder.iterdir()) == []  # no half-made file left behind
    assert not templates.exists()


def test_the_registry_seeds_a_new_workspace_from_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    uri = f"sqlite:///{workspace}/mlflow.db"
    registry = Registry(MlflowConfig(
        tracking_uri=uri, experiment="digits", monitor_experiment="digits-monitor", registered_model="digits",
        candidate_alias="candidate", approved_alias="approved", production_alias="production", previous_alias="previous",
    ))
    assert [p.name for p in (tmp_path / "cache" / "mlops").iterdir()][0].startswith("mlflow-")
    with registry.run("build", {}) as run_id:
        registry.log(run_id, metrics={"accuracy": 0.5})
    assert registry.metrics(run_id) == {"accuracy": 0.5}
