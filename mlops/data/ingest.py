"""Ingest: materialize a source as class folders, validate every image, split, write the dataset.

The prepared dataset is a directory `train/`, `val/`, `test/` (one folder per class each) plus
`manifest.json`. Its bytes depend only on the source, the config and the seed, so the same
inputs give the same DVC hash: the data version.

Beside it, outside what DVC tracks, a record (`.<name>.ingest.json`) keeps what it was made from:
every source file's path, size and modification time with what validation found in it, the
settings and seed, and a digest of the prepared folder. An unchanged source with the same
settings reads no image and writes nothing; a changed one reads only its new or changed files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlops.config import DataConfig, ValidationPolicy
from mlops.data.layout import MARKER, SPLITS, scan_classes, tree_digest

MANIFEST = "manifest.json"
RECORD_FORMAT = 1  # of the record beside a prepared dataset: a record of another format is ignored
THREADS = min(8, (os.cpu_count() or 1) + 2)  # Pillow decodes and the kernel copies without the GIL


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


def _decoded_facts(path: Path) -> tuple:
    """Verify, then decode at full size: the reference check, and the words of every problem."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            return image.mode, image.size[0], image.size[1]
    except UnidentifiedImageError:
        return "unreadable", "not an image file PIL can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return "corrupt", f"{type(error).__name__}: {error}"


def image_facts(path: Path) -> tuple:
    """What validation needs to know of one file: (kind, detail) of one that is empty, not an
    image or corrupt; (mode, width, height) of an image that decodes.

    A JPEG is decoded at 1/8 scale in the DCT domain (`Image.draft`): every byte of it is still
    entropy-decoded, so a truncated or damaged file fails as at full size, in half the time. A JPEG
    that fails, and every other format, gets the full verify-and-decode, which words the problem."""
    if path.stat().st_size == 0:
        return "empty", "0 bytes"
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                width, height = image.size
                image.draft(None, (1, 1))
                image.load()
                return image.mode, width, height
    except Exception:  # noqa: BLE001 - the full decode below finds the problem again and names it
        pass
    return _decoded_facts(path)


def judge(facts: tuple | list, policy: ValidationPolicy) -> tuple[str, str] | None:
    """None for a usable image, else (kind, detail), from the file's `image_facts`."""
    if len(facts) == 2:
        return facts[0], facts[1]
    mode, width, height = facts
    if mode not in policy.allowed_modes:
        return "mode", f"mode {mode}, allowed {policy.allowed_modes}"
    if min(width, height) < policy.min_image_size:
        return "too_small", f"{width}x{height}, minimum side {policy.min_image_size}"
    return None


def inspect_image(path: Path, policy: ValidationPolicy) -> tuple[str, str] | None:
    """None for a usable image, else (kind, detail)."""
    return judge(image_facts(path), policy)


def read_facts(root: Path, files: dict[str, list[Path]], known: dict[str, list]) -> dict[str, list]:
    """relative path -> [size, mtime_ns, *image_facts] of every file. A file whose size and
    modification time are those `known` holds is not read again; the others are read by a few
    threads at once."""
    entries, todo = {}, []
    for paths in files.values():
        for path in paths:
            relative, stat = str(path.relative_to(root)), path.stat()
            entries[relative] = [stat.st_size, stat.st_mtime_ns]
            if known.get(relative, [])[:2] == entries[relative]:
                entries[relative] += known[relative][2:]
            else:
                todo.append(relative)
    with ThreadPoolExecutor(THREADS) as pool:
        for relative, facts in zip(todo, pool.map(lambda relative: image_facts(root / relative), todo)):
            entries[relative] += facts
    return entries


def validate_images(
    root: Path, files: dict[str, list[Path]], policy: ValidationPolicy, facts: dict[str, list] | None = None
) -> tuple[dict[str, list[Path]], list[Rejected]]:
    """The usable images per class and every rejected file; `facts` (`read_facts`) saves reading."""
    facts = read_facts(root, files, {}) if facts is None else facts
    good: dict[str, list[Path]] = {}
    rejected: list[Rejected] = []
    for name, paths in files.items():
        good[name] = []
        for path in paths:
            relative = str(path.relative_to(root))
            problem = judge(facts[relative][2:], policy)
            if problem is None:
                good[name].append(path)
            else:
                rejected.append(Rejected(relative, *problem))
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


def record_path(dest: Path) -> Path:
    """The record of what the prepared dataset `dest` was made from: beside it, not in it."""
    return dest.parent / f".{dest.name}.ingest.json"


def _read_record(dest: Path) -> dict:
    try:
        record = json.loads(record_path(dest).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else {}


def _write_record(dest: Path, root: Path, inputs: str, facts: dict[str, list], dataset: str | None) -> None:
    """`dataset` None: a record of the files' facts only, for a run that stopped before writing."""
    path = record_path(dest)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": RECORD_FORMAT, "root": str(root), "inputs": inputs, "dataset": dataset, "files": facts}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, separators=(",", ":")))
    temporary.replace(path)


def _inputs(data: DataConfig, seed: int, root: Path) -> str:
    """A digest of every setting that shapes the prepared dataset, and the seed."""
    settings = data.model_dump(mode="json", exclude={"name", "version", "input_size", "mean", "std", "production", "holdout"})
    text = json.dumps({"data": settings, "seed": seed, "root": str(root)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _requarantine(root: Path, rejected: list[Rejected], folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # copies of an earlier run's rejects: the folder shows this run's only
    if rejected:
        quarantine(root, rejected, folder)


def prepare_dataset(data: DataConfig, seed: int, workspace: Path, dest: Path) -> Prepared:
    """Ingest `data` into `dest` (replaced). Raises DataError listing every problem found.

    When the source's files (path, size, modification time), the settings and the seed are those
    recorded beside `dest`, and `dest` is as that run left it, nothing is read or written but
    the quarantine folder: `dest` is the dataset this call would write."""
    root = source_root(data, workspace)
    files = chosen_classes(scan_class_folders(root), data.classes, root)
    inputs, record = _inputs(data, seed, root), _read_record(dest)
    facts = read_facts(root, files, record["files"] if record.get("root") == str(root) else {})
    unchanged = record.get("inputs") == inputs and facts == record["files"]
    if unchanged and record["dataset"] is not None and record["dataset"] == tree_digest(dest):
        prepared = load_prepared(dest)
        _requarantine(root, prepared.rejected, workspace / "quarantine" / data.name)
        return prepared

    good, rejected = validate_images(root, files, data.validation, facts)
    try:
        if rejected and data.validation.policy == "fail":
            raise DataError(
                f"{len(rejected)} invalid images in {root} (data.validation.policy=fail)",
                [f"{r.path}: {r.kind} ({r.detail})" for r in rejected],
            )
        problems = check_classes(good, data.validation)
        if problems:
            raise DataError(f"data {root} does not meet data.validation", problems)
    except DataError:
        _write_record(dest, root, inputs, facts, None)  # what was read is not read again once the data is fixed
        raise
    _requarantine(root, rejected, workspace / "quarantine" / data.name)

    classes = sorted(good)
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    capped = 0
    copies: list[tuple[Path, Path]] = []
    if dest.exists():
        shutil.rmtree(dest)
    for name in classes:
        parts, dropped = split_class(good[name], name, data, seed)
        capped += dropped
        for split, paths in parts.items():
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            copies += [(path, folder / "__".join(path.relative_to(root / name).parts)) for path in paths]
            counts[split][name] = len(paths)
    with ThreadPoolExecutor(THREADS) as pool:
        for _ in pool.map(lambda copy: shutil.copyfile(*copy), copies):
            pass

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
    _write_record(dest, root, inputs, facts, tree_digest(dest))
    return Prepared(dest, classes, counts, rejected, capped)


def load_prepared(path: Path) -> Prepared:
    manifest = json.loads((path / MANIFEST).read_text())
    counts = manifest["counts"]  # the manifest's keys are sorted: the splits in their own order, as ingest made them
    return Prepared(
        path,
        manifest["classes"],
        {split: counts[split] for split in SPLITS if split in counts} | counts,
        [Rejected(**r) for r in manifest["rejected"]],
        manifest["capped"],
        manifest.get("production"),
    )
