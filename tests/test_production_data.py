"""Labelled production images into a dataset version: validation, provenance, reproducibility."""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from mlops.config import ValidationPolicy
from mlops.data.ingest import MANIFEST, load_prepared
from mlops.data.layout import dataset_dir
from mlops.data.production import HOLDOUT, PREFIX, Label, add_production, join_labels, production_tags
from mlops.data.versioning import checkout_dataset, commit_dataset
from mlops.serve.capture import CaptureWriter, read_captures

POLICY = ValidationPolicy(policy="quarantine", allowed_modes=["L", "RGB"], min_image_size=8,
                          min_images_per_class=3, max_class_imbalance=3.0)


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def base_dataset(repo):
    """A prepared dataset as `prepare_dataset` leaves it: two classes, three splits, a manifest."""
    root = dataset_dir(repo, "pets")
    counts = {}
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        counts[split] = {}
        for label in ("cat", "dog"):
            for index in range(n):
                (root / split / label).mkdir(parents=True, exist_ok=True)
                (root / split / label / f"{index}.png").write_bytes(png(hash((split, label, index)) % 1000))
            counts[split][label] = n
    manifest = {"classes": ["cat", "dog"], "counts": counts, "rejected": [], "capped": 0}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def capture(store, images: list[bytes]) -> list:
    """Captures written by the server's own writer: (request id -> bytes), all sampled."""
    writer = CaptureWriter(str(store), sample_rate=1.0, max_mb=10, max_age_days=1)
    for index, data in enumerate(images):
        writer.offer(f"req{index:03d}", data, model="pets", model_version="3", endpoint="/predict",
                     content_type="image/png", prediction="cat", confidence=0.4)
    assert writer.flush()
    writer.close()
    return read_captures(str(store)).captured


def test_production_images_join_a_dataset_with_their_provenance_and_bad_ones_are_quarantined(tmp_path):
    root = base_dataset(tmp_path / "dvc")
    before = {p: p.read_bytes() for p in root.rglob("*.png")}
    images = [png(100 + i) for i in range(10)] + [b"not an image at all", png(200, size=4)]
    captured = capture(tmp_path / "captures", images)
    changed = captured[1]
    with open(changed.image_url.removeprefix("file://"), "wb") as handle:
        handle.write(png(999))
    labels = [Label(c.request_id, "cat" if i % 2 else "dog", c.time + timedelta(minutes=1)) for i, c in enumerate(captured)]
    joined = join_labels(captured, labels, ["cat", "dog"], "last")

    provenance = {"window": "24h", "first": "a", "last": "b", "base_version": "0" * 32}
    added = add_production(root, joined.labelled, "time", 0.3, 0.2, seed=1, policy=POLICY,
                           quarantine_dir=tmp_path / "quarantine", provenance=provenance)

    assert {r["kind"] for r in added.rejected} == {"unreadable", "too_small", "changed"}
    assert {r["request_id"] for r in added.rejected} == {"req010", "req011", changed.request_id}
    assert json.loads((tmp_path / "quarantine" / "report.json").read_text()) == added.rejected
    assert (tmp_path / "quarantine" / "too_small" / f"{PREFIX}req011.png").is_file()
    assert added.total == 9 and sum(added.counts[HOLDOUT].values()) == 3
    assert {p: p.read_bytes() for p in root.rglob("*.png") if not p.name.startswith(PREFIX)} == before  # source splits untouched

    prepared = load_prepared(root)
    files = {f["file"]: f for f in prepared.production["files"]}
    assert len(files) == 9 and prepared.production["window"] == "24h"
    for name, entry in files.items():
        stored = (root / name).read_bytes()
        origin = next(c for c in captured if c.request_id == entry["request_id"])
        assert entry["sha256"] == origin.sha256 and stored == images[int(entry["request_id"][3:])]
        assert entry["time"] == origin.time.isoformat() and entry["model_version"] == "3"
        assert name.split("/")[1] == entry["label"]
    newest_held = sorted(f["time"] for f in files.values() if f["file"].startswith(HOLDOUT))
    assert newest_held == sorted(f["time"] for f in files.values())[-3:]  # the time split
    assert prepared.counts["train"]["cat"] == 4 + added.counts["train"].get("cat", 0)
    assert [path.name for path, _ in prepared.files(HOLDOUT)] == sorted(
        n.split("/")[-1] for n in files if n.startswith(HOLDOUT + "/cat")) + sorted(
        n.split("/")[-1] for n in files if n.startswith(HOLDOUT + "/dog"))
    tags = production_tags(prepared.production)
    assert tags["data_base_version"] == "0" * 32 and tags["data_production_holdout"] == "3"
    assert sum(json.loads(tags["data_production_counts"]).values()) == 9


def test_a_version_with_production_images_is_rebuilt_by_hash_after_the_captures_expire(tmp_path):
    repo, remote = tmp_path / "dvc", str(tmp_path / "remote")
    root = base_dataset(repo)
    captured = capture(tmp_path / "captures", [png(300 + i) for i in range(6)])
    labels = [Label(c.request_id, "cat", datetime.now(UTC)) for c in captured]
    add_production(root, join_labels(captured, labels, ["cat", "dog"], "last").labelled, "stratified", 0.3, 0.2, 1,
                   POLICY, tmp_path / "quarantine", {"window": "all", "first": "a", "last": "b", "base_version": "1" * 32})
    version = commit_dataset(repo, remote, "pets")
    snapshot = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    shutil.rmtree(tmp_path / "captures")  # retention removed them
    shutil.rmtree(repo)  # and this machine's copy is gone: a fresh DVC cache
    restored = checkout_dataset(tmp_path / "dvc-again", remote, "pets", version)
    assert {str(p.relative_to(restored)): p.read_bytes() for p in restored.rglob("*") if p.is_file()} == snapshot
    assert len(load_prepared(restored).files(HOLDOUT)) == 2
