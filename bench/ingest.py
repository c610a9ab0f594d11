"""Ingest at the size of a real dataset (Kaggle cats-vs-dogs: 25,000 JPEGs of about 500x375).

    python bench/ingest.py [--images 25000] [--corrupt 5] [--added 1000] [--dir PATH]
                           [--batches 50] [--batch-size 64] [--workers N]

The source is an image folder like Kaggle's PetImages: two class folders of synthetic JPEGs
(smooth random gradients plus noise, quality 90, so they compress like photographs) and
`--corrupt` broken files (truncated JPEG bytes, a text file named .jpg). It is generated once,
untimed, and kept under `workspace/bench-ingest/` (or `--dir`) for the next run.

Timed with the build flow's own library calls (`prepare_data` and `version_data` call
`ingest.prepare_dataset` and `versioning.commit_dataset`), in a fresh workspace, on a config
composed as the flow composes it (env=test, data=imagefolder, data.max_per_class=null):
  1. the first ingest: validation, split and DVC versioning of every image;
  2. the unchanged re-run (it must not read every image again);
  3. the re-run after `--added` new images were put into the class folders (taken out again at
     the end, so the cached source stays as generated);
  4. the training input pipeline: images/s of the training's DataLoader (`training.data_loader`,
     `train.num_workers` workers as conf/train/default.yaml sets them) against a bare
     `torch.utils.data.DataLoader` over the same files (PIL open + resize + to-tensor) with the
     same workers and batch size; `--batches` batches after a warm-up.
Goals on 2 cores: first ingest within 3 minutes per 25,000 images, unchanged re-run within 10 s,
input pipeline at least 0.9x the bare loop.
"""

from __future__ import annotations

import offline  # noqa: F401  bench/offline.py: before anything imports Prefect

import argparse
import logging
import os
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from table import print_table  # bench/table.py
from torch.utils.data import DataLoader, Dataset

from flows.config import load_config
from flows.startup import CONF_DIR
from mlops.data import ingest, versioning
from mlops.data.layout import MARKER, dataset_dir

CLASSES = ("Cat", "Dog")
ADDED = "added-"  # name prefix of the images step 3 puts into the source (and takes out again)
FIRST_GOAL_S, UNCHANGED_GOAL_S, PIPELINE_GOAL = 180.0, 10.0, 0.9  # first ingest: per 25,000 images


# -- the synthetic source (not timed) ------------------------------------------------------


def write_jpeg(job: tuple[Path, int]) -> None:
    """A photograph-like JPEG: a smooth gradient of random colours plus noise, about 500x375."""
    path, seed = job
    rng = np.random.default_rng(seed)
    width, height = 500, int(rng.integers(280, 376))
    if rng.random() < 0.25:  # some portraits, as in the real set
        width, height = height, width
    corners = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    smooth = np.asarray(corners.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-10, 11, smooth.shape, dtype=np.int16)
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate(root: Path, count: int, corrupt: int, prefix: str, seed: int) -> Path:
    """`count` JPEGs split over the class folders and `corrupt` broken files, once: a folder
    with its marker is reused as it is."""
    if (root / MARKER).exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    jobs = [(root / CLASSES[i % 2] / f"{prefix}{i}.jpg", seed * 10_000_000 + i) for i in range(count)]
    started = time.perf_counter()
    with Pool(min(2, os.cpu_count() or 1)) as pool:
        pool.map(write_jpeg, jobs, chunksize=64)
    for i in range(corrupt):
        path = root / CLASSES[i % 2] / f"{prefix}broken-{i}.jpg"
        if i % 2 == 0:  # a download cut short
            data = jobs[i][0].read_bytes()
            path.write_bytes(data[: len(data) // 3])
        else:  # an error page saved with the image's name
            path.write_text("<html><body>404 Not Found</body></html>\n")
    (root / MARKER).touch()
    size = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    print(f"generated {count:,} JPEGs + {corrupt} broken files in {root} ({size / 2**20:,.0f} MiB,"
          f" {time.perf_counter() - started:.0f} s)")
    return root


def put_added(source: Path, added: Path) -> None:
    for path in sorted(added.rglob(f"{ADDED}*")):
        os.link(path, source / path.relative_to(added))


def take_added(source: Path) -> None:
    for path in source.rglob(f"{ADDED}*"):
        path.unlink()


# -- the timed steps -----------------------------------------------------------------------


def ingest_once(config) -> tuple[float, ingest.Prepared, str]:
    """What the build flow's prepare_data and version_data tasks do, timed together."""
    started = time.perf_counter()
    prepared = ingest.prepare_dataset(config.data, config.seed, config.paths.workspace,
                                      dataset_dir(config.dvc.repo, config.data.name))
    version = versioning.commit_dataset(config.dvc.repo, config.dvc.remote, config.data.name)
    return time.perf_counter() - started, prepared, version


class BareImages(Dataset):
    """What a user writes by hand: PIL open, resize, to-tensor."""

    def __init__(self, files: list[tuple[Path, int]], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.functional import to_tensor

        path, label = self.files[index]
        with Image.open(path) as image:
            return to_tensor(image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)), label


def images_per_s(loader: DataLoader, batches: int, warmup: int) -> float:
    """Images/s over `batches` batches after `warmup` (workers started, caches warm); a new epoch
    starts whenever one ends."""
    epoch = iter(loader)

    def batch() -> int:
        nonlocal epoch
        try:
            return len(next(epoch)[1])
        except StopIteration:
            epoch = iter(loader)
            return len(next(epoch)[1])

    for _ in range(warmup):
        batch()
    started = time.perf_counter()
    images = sum(batch() for _ in range(batches))
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=25_000, help="valid JPEGs in the source")
    parser.add_argument("--corrupt", type=int, default=5, help="broken files in the source")
    parser.add_argument("--added", type=int, default=1_000, help="images added before step 3")
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent.parent / "workspace" / "bench-ingest",
                        help="where the generated source is kept between runs, and the runs' workspaces"
                             " (default: workspace/bench-ingest of the project)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per input pipeline")
    parser.add_argument("--batch-size", type=int, default=64)
    default_workers = yaml.safe_load((CONF_DIR / "train" / "default.yaml").read_text())["num_workers"]
    parser.add_argument("--workers", type=int, default=default_workers,
                        help="data-loader workers (default: train.num_workers of conf/train/default.yaml)")
    parser.add_argument("--keep", action="store_true", help="keep the run's workspace (DVC project, cache, remote)")
    args = parser.parse_args()
    logging.getLogger("dvc").setLevel(logging.WARNING)

    cache = args.dir.resolve()
    source = generate(cache / f"source-{args.images}-{args.corrupt}", args.images, args.corrupt, "", seed=1)
    added = generate(cache / f"added-{args.added}", args.added, 0, ADDED, seed=2)
    take_added(source)  # left behind by an interrupted run
    workspace = Path(tempfile.mkdtemp(prefix="run-", dir=cache))
    config = load_config("build", "test", [
        "data=imagefolder", "data.name=pets", f"data.path={source}", "data.max_per_class=null",
        f"paths.workspace={workspace}", f"train.num_workers={args.workers}", f"train.batch_size={args.batch_size}",
    ])
    try:
        first, prepared, version = ingest_once(config)
        unchanged, again, same = ingest_once(config)
        if same != version or again.counts != prepared.counts:
            raise SystemExit(f"the unchanged re-run gave data version {same}, the first {version}")
        put_added(source, added)
        try:
            grown, bigger, new_version = ingest_once(config)
        finally:
            take_added(source)
        if new_version == version:
            raise SystemExit("adding images did not change the data version")
        images = sum(sum(c.values()) for c in prepared.counts.values())
        more = sum(sum(c.values()) for c in bigger.counts.values()) - images

        from mlops.train import training

        files = bigger.files("train")
        spec = training.model_spec(config, bigger.classes)
        warmup = 2 * max(1, args.workers) + 2
        ours = images_per_s(training.data_loader(files, spec, config.train, train=True), args.batches, warmup)
        bare = images_per_s(DataLoader(BareImages(files, spec.input_size), batch_size=args.batch_size, shuffle=True,
                                       num_workers=args.workers, persistent_workers=args.workers > 0),
                            args.batches, warmup)
    finally:
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)

    first_goal = FIRST_GOAL_S * args.images / 25_000
    print(f"\n{args.images:,} JPEGs + {args.corrupt} broken files ({len(prepared.rejected)} quarantined),"
          f" {images:,} ingested, then {more:,} added; data version {version}; {os.cpu_count()} cores,"
          f" {args.workers} data-loader workers, batch {args.batch_size}, input size {spec.input_size},"
          f" {args.batches} timed batches\n")

    def met(ok: bool) -> str:
        return "yes" if ok else "NO"

    print_table(["step", "result", "goal", "met?"], [
        ["1. first ingest: validate, split, DVC add + push", f"{first:.1f} s",
         f"<= {first_goal:.0f} s ({FIRST_GOAL_S:.0f} s per 25,000)", met(first <= first_goal)],
        ["2. unchanged re-run", f"{unchanged:.2f} s", f"<= {UNCHANGED_GOAL_S:.0f} s", met(unchanged <= UNCHANGED_GOAL_S)],
        [f"3. re-run after adding {more:,} images", f"{grown:.1f} s", "-", "-"],
        ["4. training input pipeline (training.data_loader)", f"{ours:.0f} images/s",
         f">= {PIPELINE_GOAL}x bare = {PIPELINE_GOAL * bare:.0f} images/s", met(ours >= PIPELINE_GOAL * bare)],
        ["   bare DataLoader: PIL open + resize + to_tensor", f"{bare:.0f} images/s", "-", f"{ours / bare:.2f}x"],
    ])


if __name__ == "__main__":
    main()
