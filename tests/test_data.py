from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_image
from PIL import Image

from mlops.config import DataConfig
from mlops.data.ingest import (
    DataError,
    _decoded_facts,
    image_facts,
    load_prepared,
    materialize_digits,
    prepare_dataset,
    record_path,
)


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


# -- re-runs: the record beside the prepared dataset ---------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The names of the files PIL opens from now on."""
    names, real = [], Image.open

    def spy(fp, *args, **kwargs):
        names.append(Path(fp).name)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return names


def test_the_fast_check_agrees_with_the_full_decode_on_every_failure_mode(broken_folder):
    for path in sorted(p for p in broken_folder.rglob("*") if p.is_file() and p.stat().st_size):
        assert tuple(image_facts(path)) == tuple(_decoded_facts(path)), path.name


def test_an_unchanged_source_opens_no_image_and_writes_nothing(broken_folder, tmp_path, monkeypatch):
    config, workspace, out = data_config(broken_folder), tmp_path / "ws", tmp_path / "out"
    first = prepare_dataset(config, 7, workspace, out)
    before = snapshot(out)
    quarantine = workspace / "quarantine" / "pets"
    shutil.rmtree(quarantine)  # written again all the same, from the manifest

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", refuse)
    again = prepare_dataset(config, 7, workspace, out)
    assert snapshot(out) == before
    assert (again.counts, again.rejected, again.capped, again.classes) == (first.counts, first.rejected, first.capped, first.classes)
    assert list(again.counts) == list(first.counts)  # train, val, test: as a fresh run orders them
    assert {f"{r.kind}/{r.path}" for r in again.rejected} == {
        str(p.relative_to(quarantine)) for p in quarantine.rglob("*") if p.is_file() and p.name != "report.json"}


def test_a_changed_file_is_read_again_and_only_it(image_folder, tmp_path, opened):
    config, workspace = data_config(image_folder), tmp_path / "ws"
    prepare_dataset(config, 7, workspace, tmp_path / "out")
    cut = image_folder / "cat" / "03.jpg"
    cut.write_bytes(cut.read_bytes()[:200])  # other bytes, other size
    touched = image_folder / "dog" / "05.jpg"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same bytes, a new modification time
    opened.clear()
    prepared = prepare_dataset(config, 7, workspace, tmp_path / "out")
    assert sorted(set(opened)) == ["03.jpg", "05.jpg"]
    assert [(r.path, r.kind) for r in prepared.rejected] == [("cat/03.jpg", "corrupt")]
    # the same dataset as a first run on this source
    fresh = prepare_dataset(config, 7, tmp_path / "ws2", tmp_path / "fresh")
    assert {k: v[0] for k, v in snapshot(tmp_path / "out").items()} == {k: v[0] for k, v in snapshot(tmp_path / "fresh").items()}
    assert fresh.rejected == prepared.rejected


def test_other_settings_or_a_changed_dataset_folder_make_it_again_without_reading_images(image_folder, tmp_path, opened):
    workspace, out = tmp_path / "ws", tmp_path / "out"
    prepare_dataset(data_config(image_folder), 7, workspace, out)
    opened.clear()
    other_seed = prepare_dataset(data_config(image_folder), 8, workspace, out)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 8
    assert [p.name for p, _ in other_seed.files("test")] == [p.name for p, _ in prepare_dataset(
        data_config(image_folder), 8, tmp_path / "ws2", tmp_path / "fresh").files("test")]
    capped = prepare_dataset(data_config(image_folder, max_per_class=5), 8, workspace, out)
    assert capped.capped == 14
    stray = out / "train" / "cat" / "production-extra.png"  # what add_production or a checkout leaves
    write_image(stray)
    again = prepare_dataset(data_config(image_folder, max_per_class=5), 8, workspace, out)
    assert not stray.exists() and again.counts == capped.counts
    assert len(opened) == 24  # by the first run into `fresh` only, once per image
    record_path(out).write_text("{not json")  # a damaged record: a first run
    assert prepare_dataset(data_config(image_folder), 7, workspace, out).counts["train"] == {"cat": 8, "dog": 8}


def test_a_source_that_fails_validation_fails_every_time(image_folder, tmp_path):
    config = data_config(image_folder, validation={"min_images_per_class": 10})
    prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "out")
    for index in range(3):
        (image_folder / "cat" / f"{index:02d}.jpg").unlink()
    for _ in range(2):  # not the dataset of the earlier, valid source
        with pytest.raises(DataError, match="class 'cat': 9 valid images, minimum 10"):
            prepare_dataset(config, 7, tmp_path / "ws", tmp_path / "out")
