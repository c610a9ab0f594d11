from __future__ import annotations

import os
import shutil
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


def test_an_unchanged_dataset_is_not_hashed_or_pushed_again(tmp_path, monkeypatch):
    from dvc.repo import Repo

    repo, remote = tmp_path / "dvc", str(tmp_path / "remote")
    write_dataset(repo, {"a/1.png": b"one", "b/2.png": b"two"})
    first = commit_dataset(repo, remote, "toy")

    def refuse(*args, **kwargs):
        raise AssertionError("DVC hashed or pushed an unchanged dataset")

    monkeypatch.setattr(Repo, "add", refuse)
    monkeypatch.setattr(Repo, "push", refuse)
    assert commit_dataset(repo, remote, "toy") == first
    monkeypatch.undo()

    # same size, new modification time: committed again, as a new version
    target = dataset_dir(repo, "toy") / "a" / "1.png"
    target.write_bytes(b"uno")
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert commit_dataset(repo, remote, "toy") not in (first, None)


def test_a_version_the_remote_lost_is_pushed_again(tmp_path):
    repo, remote = tmp_path / "dvc", str(tmp_path / "remote")
    write_dataset(repo, {"a/1.png": b"one"})
    version = commit_dataset(repo, remote, "toy")
    shutil.rmtree(remote)
    assert commit_dataset(repo, remote, "toy") == version
    restored = checkout_dataset(tmp_path / "dvc2", remote, "toy", version)  # a fresh cache: from the remote
    assert (restored / "a" / "1.png").read_bytes() == b"one"
