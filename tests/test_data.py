from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image

from mlops.config import DataConfig
from mlops.data.ingest import DataError, load_prepared, materialize_digits, prepare_dataset


def data_config(path: Path, **changes) -> DataConfig:
    validation = {
        "policy": "quarantine",
        "allowed_modes": ["RGB", "L"],
        "min_image_size": 8,
        "min_images_per_class": 5,
        "max_class_imbalance": 3.0,
    } | changes.pop("validation", {})
    raw = {
        "source": "imagefolder",
        "name": "pets",
        "path": path,
        "input_size": 16,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "validation": validation,
        "holdout": {"split": "time", "share": 0.3},
    } | changes
    return DataConfig.model_validate(raw)


@pytest.fixture
def broken_folder(image_folder: Path) -> Path:
    """The cats-vs-dogs failure modes: truncated, empty, not an image, CMYK, tiny."""
    data = (image_folder / "cat" / "00.jpg").read_bytes()
    (image_folder / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (image_folder / "cat" / "empty.jpg").write_bytes(b"")
    (image_folder / "dog" / "Thumbs.db").write_bytes(b"\x00not an image at all")
    write_image(image_folder / "dog" / "cmyk.jpg", mode="CMYK")
    write_image(image_folder / "dog" / "tiny.png", size=(4, 4))
    return image_folder


EXPECTED_REJECTS = {
    "cat/truncated.jpg": "corrupt",
    "cat/empty.jpg": "empty",
    "dog/Thumbs.db": "unreadable",
    "dog/cmyk.jpg": "mode",
    "dog/tiny.png": "too_small",
}


def test_quarantine_policy_reports_and_copies_every_bad_file(broken_folder, tmp_path):
    before = sorted(p.relative_to(broken_folder) for p in broken_folder.rglob("*"))
    prepared = prepare_dataset(data_config(broken_folder), 7, tmp_path / "ws", tmp_path / "out")

    assert {r.path: r.kind for r in prepared.rejected} == EXPECTED_REJECTS
    quarantine = tmp_path / "ws" / "quarantine" / "pets"
    for path, kind in EXPECTED_REJECTS.items():
        assert (quarantine / kind / path).read_bytes() == (broken_folder / path).read_bytes()
    report = json.loads((quarantine / "report.json").read_text())
    assert {r["path"] for r in report} == set(EXPECTED_REJECTS)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {r["path"] for r in manifest["rejected"]} == set(EXPECTED_REJECTS)
    # the source is untouched and only valid images were used
    assert sorted(p.relative_to(broken_folder) for p in broken_folder.rglob("*")) == before
    assert sum(sum(c.values()) for c in prepared.counts.values()) == 24


def test_the_quarantine_folder_shows_the_last_run_only(broken_folder, tmp_path):
    prepare_dataset(data_config(broken_folder), 7, tmp_path / "ws", tmp_path / "out")
    quarantine = tmp_path / "ws" / "quarantine" / "pets"
    fixed = next(iter(EXPECTED_REJECTS))
    (broken_folder / fixed).unlink()  # the user removed one bad file
    prepared = prepare_dataset(data_config(broken_folder), 7, tmp_path / "ws", tmp_path / "out")
    copies = {str(p.relative_to(quarantine)) for p in quarantine.rglob("*") if p.is_file() and p.name != "report.json"}
    assert copies == {f"{r.kind}/{r.path}" for r in prepared.rejected} and fixed not in {r.path for r in prepared.rejected}
    assert len(json.loads((quarantine / "report.json").read_text())) == len(EXPECTED_REJECTS) - 1


def test_fail_policy_lists_every_bad_file(broken_folder, tmp_path):
    config = data_config(broken_folder, validation={"policy": "fail"})
    with pytest.raises(DataError) as caught:
        prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "out")
    message = str(caught.value)
    for path, kind in EXPECTED_REJECTS.items():
        assert f"{path}: {kind}" in message
    assert not (tmp_path / "out").exists()


def test_class_size_and_balance_limits(image_folder, tmp_path):
    for index in range(9, 12):
        (image_folder / "cat" / f"{index:02d}.jpg").unlink()
    config = data_config(image_folder, validation={"min_images_per_class": 10, "max_class_imbalance": 1.2})
    with pytest.raises(DataError) as caught:
        prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "out")
    assert caught.value.problems == [
        "class 'cat': 9 valid images, minimum 10",
        "class imbalance 1.33 (largest 12 / smallest 9) exceeds max_class_imbalance 1.2",
    ]


def test_one_class_is_not_a_dataset(tmp_path):
    write_image(tmp_path / "src" / "only" / "a.png")
    with pytest.raises(DataError, match="needs at least 2 class folders"):
        prepare_dataset(data_config(tmp_path / "src"), 7, tmp_path / "ws", tmp_path / "out")


def test_split_is_stratified_disjoint_and_deterministic(image_folder, tmp_path):
    config = data_config(image_folder)
    first = prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "a")
    second = prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "b")
    other_seed = prepare_dataset(config, 8, tmp_path / "ws", tmp_path / "c")

    names = {split: [p.name + str(label) for p, label in first.files(split)] for split in ("train", "val", "test")}
    assert first.counts == {s: {"cat": n, "dog": n} for s, n in (("train", 8), ("val", 2), ("test", 2))}
    assert len(set().union(*map(set, names.values()))) == 24  # disjoint
    assert [p.name for p, _ in first.files("test")] == [p.name for p, _ in second.files("test")]
    assert [p.name for p, _ in first.files("test")] != [p.name for p, _ in other_seed.files("test")]
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert load_prepared(tmp_path / "a").counts == first.counts


def test_max_per_class_caps_deterministically(image_folder, tmp_path):
    prepared = prepare_dataset(data_config(image_folder, max_per_class=5), 7, tmp_path / "ws", tmp_path / "out")
    assert prepared.capped == 14
    assert all(sum(c[name] for c in prepared.counts.values()) == 5 for name in ("cat", "dog"))


def test_data_classes_keeps_only_the_named_folders(image_folder, tmp_path):
    for index in range(12):
        write_image(image_folder / "fox" / f"{index:02d}.jpg", seed=200 + index)
    prepared = prepare_dataset(data_config(image_folder, classes=["fox", "cat"]), 7, tmp_path / "ws", tmp_path / "out")
    assert prepared.classes == ["cat", "fox"] and "dog" not in prepared.counts["train"]
    with pytest.raises(DataError) as caught:
        prepare_dataset(data_config(image_folder, classes=["cat", "cow"]), 7, tmp_path / "ws", tmp_path / "out2")
    assert caught.value.problems == ["no class folder 'cow'; found ['cat', 'dog', 'fox']"]
    assert data_config(image_folder, classes=[0, 1]).classes == ["0", "1"]  # digit folders from the command line


def test_digits_ship_with_scikit_learn_as_png_class_folders(tmp_path):
    root = materialize_digits(tmp_path / "digits")
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in root.rglob("*.png")) == 1797
