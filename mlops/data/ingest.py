"""Ingest: materialize a source as class folders, validate every image, split, write the dataset.

The prepared dataset is a directory `train/`, `val/`, `test/` (one folder per class each) plus
`manifest.json`. Its bytes depend only on the source, the config and the seed, so the same
inputs give the same DVC hash: the data version.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlops.config import DataConfig, ValidationPolicy
from mlops.data.layout import MARKER, SPLITS, scan_classes

MANIFEST = "manifest.json"


class DataError(ValueError):
    """The data cannot be used; `problems` lists every reason, one line each."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = problems
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        super().__init__(f"{where}:\n" + "\n".join(f"  {p}" for p in shown))


@dataclass(frozen=True)
class Rejected:
    path: str  # relative to the source root
    kind: str  # empty | unreadable | corrupt | mode | too_small
    detail: str


@dataclass
class Prepared:
    path: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    rejected: list[Rejected] = field(default_factory=list)
    capped: int = 0  # valid images left out by data.max_per_class
    production: dict | None = None  # the manifest's section on labelled production images, if any

    def files(self, split: str) -> list[tuple[Path, int]]:
        """(image path, class index) pairs of one split, in a stable order; none for a split the
        dataset does not have (the production holdout, in a dataset without production images)."""
        if not (self.path / split).is_dir():
            return []
        found = scan_classes(self.path / split, nested=False)
        return [(path, index) for index, name in enumerate(self.classes) for path in found.get(name, [])]


# -- sources -------------------------------------------------------------------------------


def materialize_digits(dest: Path) -> Path:
    """Write scikit-learn's digits as 8-bit grayscale PNGs, `<dest>/<digit>/<index>.png`."""
    from sklearn.datasets import load_digits

    done = dest / MARKER
    if done.exists():
        return dest
    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{index:04d}.png", optimize=False)
    done.touch()
    return dest


def source_root(data: DataConfig, workspace: Path) -> Path:
    if data.source == "digits":
        return materialize_digits(workspace / "sources" / "digits")
    assert data.path is not None  # the schema requires it for imagefolder
    root = data.path.expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data.path {root}", ["is not a directory"])
    return root


def scan_class_folders(root: Path) -> dict[str, list[Path]]:
    """Every file under each class folder (nested folders included); at least two classes."""
    found = scan_classes(root)
    if len(found) < 2:
        raise DataError(f"data source {root}", [f"needs at least 2 class folders, found {len(found)}: {sorted(found)}"])
    return found


def chosen_classes(found: dict[str, list[Path]], classes: list[str] | None, root: Path) -> dict[str, list[Path]]:
    """The class folders `data.classes` names (all when None); a name without a folder is an error."""
    if classes is None:
        return found
    missing = [name for name in classes if name not in found]
    if missing:
        raise DataError(f"data.classes in {root}", [f"no class folder '{name}'; found {sorted(found)}" for name in missing])
    return {name: found[name] for name in classes}


# -- validation ----------------------------------------------------------------------------


def inspect_image(path: Path, policy: ValidationPolicy) -> tuple[str, str] | None:
    """None for a usable image, else (kind, detail)."""
    if path.stat().st_size == 0:
        return "empty", "0 bytes"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            mode, (width, height) = image.mode, image.size
    except UnidentifiedImageError:
        return "unreadable", "not an image file PIL can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return "corrupt", f"{type(error).__name__}: {error}"
    if mode not in policy.allowed_modes:
        return "mode", f"mode {mode}, allowed {policy.allowed_modes}"
    if min(width, height) < policy.min_image_size:
        return "too_small", f"{width}x{height}, minimum side {policy.min_image_size}"
    return None


def validate_images(
    root: Path, files: dict[str, list[Path]], policy: ValidationPolicy
) -> tuple[dict[str, list[Path]], list[Rejected]]:
    good: dict[str, list[Path]] = {}
    rejected: list[Rejected] = []
    for name, paths in files.items():
        good[name] = []
        for path in paths:
            problem = inspect_image(path, policy)
            if problem is None:
                good[name].append(path)
            else:
                rejected.append(Rejected(str(path.relative_to(root)), *problem))
    return good, rejected


def check_classes(good: dict[str, list[Path]], policy: ValidationPolicy) -> list[str]:
    sizes = {name: len(paths) for name, paths in good.items()}
    problems = [
        f"class '{name}': {n} valid images, minimum {policy.min_images_per_class}"
        for name, n in sizes.items()
        if n < policy.min_images_per_class
    ]
    smallest, largest = min(sizes.values()), max(sizes.values())
    if smallest > 0 and largest / smallest > policy.max_class_imbalance:
        problems.append(
            f"class imbalance {largest / smallest:.2f} (largest {largest} / smallest {smallest})"
            f" exceeds max_class_imbalance {policy.max_class_imbalance}"
        )
    return problems


def quarantine(root: Path, rejected: list[Rejected], dest: Path) -> None:
    """Copy each rejected file aside (the source is never touched) and write a report."""
    for item in rejected:
        target = dest / item.kind / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / item.path, target)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "report.json").write_text(json.dumps([asdict(r) for r in rejected], indent=2))


# -- split and write -----------------------------------------------------------------------


def split_class(
    paths: list[Path], name: str, data: DataConfig, seed: int
) -> tuple[dict[str, list[Path]], int]:
    """Deterministic per-class split (stratified overall); returns the split and how many were capped."""
    shuffled = sorted(paths)
    random.Random(f"{seed}:{name}").shuffle(shuffled)
    capped = 0
    if data.max_per_class is not None and len(shuffled) > data.max_per_class:
        capped = len(shuffled) - data.max_per_class
        shuffled = shuffled[: data.max_per_class]
    n = len(shuffled)
    n_test = max(1, round(n * data.test_fraction))
    n_val = max(1, round(n * data.val_fraction))
    return {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": shuffled[n_test + n_val :],
    }, capped


def prepare_dataset(data: DataConfig, seed: int, workspace: Path, dest: Path) -> Prepared:
    """Ingest `data` into `dest` (replaced). Raises DataError listing every problem found."""
    root = source_root(data, workspace)
    good, rejected = validate_images(root, chosen_classes(scan_class_folders(root), data.classes, root), data.validation)
    if rejected and data.validation.policy == "fail":
        raise DataError(
            f"{len(rejected)} invalid images in {root} (data.validation.policy=fail)",
            [f"{r.path}: {r.kind} ({r.detail})" for r in rejected],
        )
    problems = check_classes(good, data.validation)
    if problems:
        raise DataError(f"data {root} does not meet data.validation", problems)
    folder = workspace / "quarantine" / data.name
    shutil.rmtree(folder, ignore_errors=True)  # copies of an earlier run's rejects: the folder shows this run's only
    if rejected:
        quarantine(root, rejected, folder)

    classes = sorted(good)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    capped = 0
    if dest.exists():
        shutil.rmtree(dest)
    for name in classes:
        parts, dropped = split_class(good[name], name, data, seed)
        capped += dropped
        for split, paths in parts.items():
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copyfile(path, folder / "__".join(path.relative_to(root / name).parts))
            counts[split][name] = len(paths)

    manifest = {
        "source": data.source,
        "source_path": str(root) if data.source == "imagefolder" else None,
        "classes": classes,
        "counts": counts,
        "seed": seed,
        "val_fraction": data.val_fraction,
        "test_fraction": data.test_fraction,
        "max_per_class": data.max_per_class,
        "capped": capped,
        "rejected": [asdict(r) for r in rejected],
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Prepared(dest, classes, counts, rejected, capped)


def load_prepared(path: Path) -> Prepared:
    manifest = json.loads((path / MANIFEST).read_text())
    return Prepared(
        path,
        manifest["classes"],
        manifest["counts"],
        [Rejected(**r) for r in manifest["rejected"]],
        manifest["capped"],
        manifest.get("production"),
    )
