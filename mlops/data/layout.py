"""Where datasets live and how a class-folder tree is read: one scanner for every reader.

An image-folder tree has one sub-folder per class (`root/<class>/...`); a prepared dataset has
one such tree per split (`train/`, `val/`, `test/`) under `<dvc repo>/datasets/<name>/`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SPLITS = ("train", "val", "test")
MARKER = ".complete"  # written by a source when its tree is whole
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def dataset_dir(repo_dir: Path, name: str) -> Path:
    """The prepared dataset `name` in the DVC project `repo_dir`."""
    return repo_dir / "datasets" / name


def scan_classes(root: Path, nested: bool = True, suffixes: tuple[str, ...] | None = None) -> dict[str, list[Path]]:
    """class name -> its files, sorted, for every non-hidden class folder of `root`.

    `nested` takes files in sub-folders of a class too; `suffixes` keeps only those endings
    (case-insensitive). Hidden files and the source marker are never listed.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory (expected one sub-folder per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {}
    for name in classes:
        paths = (root / name).rglob("*") if nested else (root / name).iterdir()
        found[name] = sorted(
            p for p in paths
            if p.is_file() and not p.name.startswith(".") and (suffixes is None or p.suffix.lower() in suffixes)
        )
    return found


def tree_digest(root: Path) -> str | None:
    """A digest of every file under `root` (relative path, size, modification time), None when
    `root` is not a folder. No file is read, so 25,000 images take a fraction of a second; like
    make, rsync and DVC's own state, it does not see a change that keeps a file's size and
    modification time."""
    root = Path(root)
    if not root.is_dir():
        return None
    entries, start = [], len(str(root)) + 1
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            entries.append(f"{path[start:]}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
