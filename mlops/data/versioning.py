"""Data versions with DVC: a prepared dataset's content hash is its version.

The DVC project lives in its own directory (no git needed, `--no-scm`); each dataset is one
tracked directory `datasets/<name>`. `commit_dataset` adds and pushes it to the remote;
`checkout_dataset` brings back any version the cache or the remote holds.

Beside each dataset a record (`.<name>.committed.json`) keeps the version it was last committed
as, the remote, and a digest of its files' paths, sizes and modification times: a dataset that
has not changed since, whose version the cache and the remote still hold, is not hashed again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from mlops.config import DvcConfig
from mlops.data.ingest import Prepared, load_prepared
from mlops.data.layout import dataset_dir, tree_digest

REMOTE_NAME = "store"


class DataVersionError(ValueError):
    pass


def open_repo(repo_dir: Path, remote: str):
    """Open (and on first use create) the DVC project, pointing its default remote at `remote`."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    from dvc.repo import Repo

    if not (repo_dir / ".dvc").is_dir():
        repo_dir.mkdir(parents=True, exist_ok=True)
        Repo.init(str(repo_dir), no_scm=True)
    repo = Repo(str(repo_dir))
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    with repo.config.edit() as conf:
        conf["core"]["analytics"] = False
        conf["core"]["remote"] = REMOTE_NAME
        conf["remote"][REMOTE_NAME] = {"url": remote}
    return repo


def commit_dataset(repo_dir: Path, remote: str, name: str) -> str:
    """Track `datasets/<name>` and push it; returns its version (the DVC directory hash).

    Nothing is hashed or copied when the dataset's files are as at its last commit, its `.dvc`
    file names that version, and the cache and the remote hold its directory object (DVC's own
    push takes a directory whose object the remote has as whole)."""
    target = dataset_dir(repo_dir, name)
    record_file = target.parent / f".{name}.committed.json"
    digest = tree_digest(target)  # before `add`: a file changed meanwhile is seen next time
    repo = open_repo(repo_dir, remote)
    with repo:
        try:
            record = json.loads(record_file.read_text())
            known = record["version"] if record == {"version": read_version(target), "remote": remote, "dataset": digest} else None
        except (OSError, ValueError, KeyError, TypeError, IndexError, yaml.YAMLError):
            known = None
        if known is not None and _stored(repo, known):
            return known
        record_file.unlink(missing_ok=True)
        repo.add([str(target)])
        repo.push(targets=[str(target) + ".dvc"])
    version = read_version(target)
    record_file.write_text(json.dumps({"version": version, "remote": remote, "dataset": digest}))
    return version


def _stored(repo, version: str) -> bool:
    """Whether the local cache and the default remote hold the directory object of `version`."""
    oid = f"{version}.dir"
    return repo.cache.local.exists(oid) and repo.cloud.get_remote_odb(REMOTE_NAME).exists(oid)


def read_version(target: Path) -> str:
    meta = yaml.safe_load(Path(str(target) + ".dvc").read_text())
    return meta["outs"][0]["md5"].removesuffix(".dir")


def checkout_dataset(repo_dir: Path, remote: str, name: str, version: str) -> Path:
    """Materialize version `version` of dataset `name` from the cache or the remote."""
    repo = open_repo(repo_dir, remote)
    target = dataset_dir(repo_dir, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    dvc_file = Path(str(target) + ".dvc")
    dvc_file.write_text(
        yaml.safe_dump({"outs": [{"md5": f"{version}.dir", "hash": "md5", "path": name}]})
    )
    from dvc.exceptions import DvcException

    try:
        with repo:
            repo.pull(targets=[str(dvc_file)], force=True)
    except DvcException as error:
        raise DataVersionError(
            f"data.version {version}: not in the DVC cache {repo_dir} nor the remote {remote}"
            f" ({type(error).__name__}: {error})"
        ) from None
    return target


def dataset_of(tags: dict[str, str], dvc: DvcConfig) -> Prepared:
    """The prepared dataset a model version was built on (its `data_name`/`data_version` tags)."""
    missing = [key for key in ("data_name", "data_version") if key not in tags]
    if missing:
        raise DataVersionError(f"the model version has no {' or '.join(missing)} tag: its data is unknown")
    return load_prepared(checkout_dataset(dvc.repo, dvc.remote, tags["data_name"], tags["data_version"]))
