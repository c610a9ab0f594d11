from __future__ import annotations

from pathlib import Path

import pytest

from mlops.data.layout import dataset_dir
from mlops.data.versioning import DataVersionError, checkout_dataset, commit_dataset


def write_dataset(repo: Path, files: dict[str, bytes]) -> None:
    target = dataset_dir(repo, "toy")
    for name, content in files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(content)


def test_same_content_same_version_and_old_versions_come_back(tmp_path):
    repo, remote = tmp_path / "dvc", str(tmp_path / "remote")
    write_dataset(repo, {"a/1.png": b"one", "b/2.png": b"two"})
    first = commit_dataset(repo, remote, "toy")
    assert commit_dataset(repo, remote, "toy") == first

    write_dataset(repo, {"a/1.png": b"changed"})
    second = commit_dataset(repo, remote, "toy")
    assert second != first and len(second) == 32

    restored = checkout_dataset(repo, remote, "toy", first)
    assert (restored / "a" / "1.png").read_bytes() == b"one"


def test_a_version_only_the_remote_has_is_pulled(tmp_path):
    remote = str(tmp_path / "remote")
    write_dataset(tmp_path / "dvc1", {"a/1.png": b"one"})
    version = commit_dataset(tmp_path / "dvc1", remote, "toy")
    restored = checkout_dataset(tmp_path / "dvc2", remote, "toy", version)  # a fresh cache
    assert (restored / "a" / "1.png").read_bytes() == b"one"


def test_an_unknown_version_is_a_clear_error(tmp_path):
    with pytest.raises(DataVersionError, match="data.version 0123456789abcdef0123456789abcdef: not in the DVC cache"):
        checkout_dataset(tmp_path / "dvc", str(tmp_path / "remote"), "toy", "0123456789abcdef0123456789abcdef")
