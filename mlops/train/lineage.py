"""Lineage: which code, commit and config made a model, and the key that says "nothing changed".

The key hashes only what shapes a trained model: the data version, the training and export
settings, and the code that trains, exports and preprocesses. Editing the model server, the
monitor or a flow never retrains a model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mlops.config import BuildConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# the code a trained model depends on (the data's own code is covered by the data version)
TRAINING_CODE = ("mlops/train/training.py", "mlops/train/packaging.py", "mlops/serve/inference.py")


@dataclass(frozen=True)
class GitState:
    commit: str  # "unknown" outside a git checkout
    dirty: bool


def git_state(root: Path = PROJECT_ROOT) -> GitState:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return GitState("unknown", False)
    return GitState(commit, dirty)


def code_hash(root: Path = PROJECT_ROOT, files: tuple[str, ...] = TRAINING_CODE) -> str:
    """sha256 over the training code: a dirty tree still gets a distinct code version."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def config_hash(config: BuildConfig) -> str:
    return _hash(config.model_dump(mode="json"))


def trace(config: BuildConfig, data_version: str) -> dict[str, str]:
    """What a model version records to be traced back: data, commit, code and config."""
    git = git_state()
    return {
        "data_name": config.data.name,
        "data_version": data_version,
        "git_commit": git.commit,
        "git_dirty": str(git.dirty),
        "code_hash": code_hash(),
        "config_hash": config_hash(config),
    }


def train_key(config: BuildConfig, data_version: str, code: str) -> str:
    """Same key, same model: data content, everything that shapes training and export, and code.

    Thresholds, stores and names are left out, so changing a bound re-gates without retraining.
    """
    data = config.data.model_dump(mode="json", exclude={"path", "version", "validation"})
    return _hash(
        {
            "data_version": data_version,
            "data": data,
            "model": {"name": config.model.name, "weights": file_hash(config.model.weights_path)},
            "train": config.train.model_dump(mode="json", exclude={"progress_bar", "num_workers"}),
            "export": config.export.model_dump(mode="json", exclude={"latency_images"}),
            "seed": config.seed,
            "code": code,
        }
    )


def file_hash(path: Path | None) -> str | None:
    """The content of a file (initial weights), so a file replaced under the same path counts."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _hash(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
