"""Active labelling: the least confident captures out to a person (a folder, Label Studio) and
their labels back in as feedback that `collect` and the monitor read like any other."""

from __future__ import annotations

import csv
import io
import json
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from mlops.data.labelling import (
    export_folder,
    export_label_studio,
    import_labels,
    least_confident,
    read_label_studio_export,
    read_labelled_folder,
)
from mlops.data.production import Label, collect
from mlops.serve.capture import CaptureWriter

CLASSES = ("cat", "dog", "fox")
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Shot:
    request_id: str
    time: datetime
    confidence: float


def test_the_least_confident_come_first_ties_by_time_then_request_id():
    shots = [Shot("e", T0, 0.9), Shot("d", T0 + timedelta(minutes=1), 0.4), Shot("c", T0, 0.4),
             Shot("b", T0, 0.4), Shot("a", T0, 0.7)]
    assert [s.request_id for s in least_confident(shots, 4)] == ["b", "c", "d", "a"]
    assert [s.request_id for s in least_confident(shots, 50)] == ["b", "c", "d", "a", "e"]
    assert least_confident(shots, 0) == [] and least_confident(shots, -3) == [] and least_confident([], 5) == []


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (shade, 80, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def capture(url: str, guesses: list[tuple[str, float]]) -> list[str]:
    """Each (prediction, confidence) captured as a real server captures it; their request ids."""
    writer = CaptureWriter(url, sample_rate=1.0, max_mb=10, max_age_days=1)
    ids = []
    for index, (prediction, confidence) in enumerate(guesses):
        request_id = uuid.uuid4().hex
        assert writer.offer(request_id, png(20 * index), model="pets", model_version="3", endpoint="/predict",
                            content_type="image/png", prediction=prediction, confidence=confidence) == "queued"
        ids.append(request_id)
    assert writer.flush()
    writer.close()
    assert writer.counts()["stored"] == len(guesses)
    return ids


@pytest.fixture
def store(tmp_path):
    """Five captures in a real capture store (confidences 0.9, 0.3, 0.6, 0.2, 0.5), an empty records folder."""
    start = datetime.now(UTC) - timedelta(minutes=1)
    url, records = str(tmp_path / "captures"), tmp_path / "records"
    ids = capture(url, [("cat", 0.9), ("dog", 0.3), ("fox", 0.6), ("cat", 0.2), ("dog", 0.5)])
    return url, records, ids, start


def labelled_as(url: str, records: Path, start: datetime, on_conflict: str = "last") -> dict[str, str]:
    collected = collect(url, records, CLASSES, on_conflict, start)
    assert collected.unreadable == []
    return {sample.capture.request_id: sample.label for sample in collected.joined.labelled}


def test_a_folder_export_labelled_by_moving_files_comes_back_as_feedback(store, tmp_path):
    url, records, ids, start = store
    unlabelled = collect(url, records, CLASSES, "last", start).joined.unlabelled
    chosen = least_confident(unlabelled, 3)
    assert [c.request_id for c in chosen] == [ids[3], ids[1], ids[4]]  # 0.2, 0.3, 0.5

    dest = export_folder(chosen, CLASSES, tmp_path / "export", import_command="python -m flows.label import from={dest}")
    images = dest / "unlabelled"
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{c.request_id}.png" for c in chosen)
    assert all((images / f"{c.request_id}.png").read_bytes() == c.read_bytes() for c in chosen)
    assert sorted(p.name for p in (dest / "labelled").iterdir()) == list(CLASSES)
    assert not any((dest / "labelled").rglob("*.png"))
    with (dest / "tasks.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["request_id"], r["prediction"], float(r["confidence"]), r["file"]) for r in rows] == [
        (c.request_id, c.prediction, c.confidence, f"unlabelled/{c.request_id}.png") for c in chosen]
    assert f"python -m flows.label import from={dest}" in (dest / "README.txt").read_text()

    # the person: the least confident is a fox, the next a dog; the third stays undecided
    shutil.move(images / f"{ids[3]}.png", dest / "labelled" / "fox")
    shutil.move(images / f"{ids[1]}.png", dest / "labelled" / "dog")
    labels, problems = read_labelled_folder(dest, CLASSES)  # the export folder itself, or its labelled/
    assert problems == []
    assert sorted((label.request_id, label.label) for label in labels) == sorted([(ids[3], "fox"), (ids[1], "dog")])
    assert all(label.time.tzinfo is not None and label.time >= start for label in labels)
    assert import_labels(labels, records, max_mb=10, max_age_days=1, source=f"import:{dest}") == 2

    assert labelled_as(url, records, start) == {ids[3]: "fox", ids[1]: "dog"}
    lines = [json.loads(line) for path in sorted((records / "feedback").rglob("*.jsonl")) for line in path.read_text().splitlines()]
    assert {line["source"] for line in lines} == {f"import:{dest}"} and len(lines) == 2

    from mlops.monitor.window import load_traffic  # the monitor's performance section reads the same records

    traffic = load_traffic(records, "3", start, datetime.now(UTC) + timedelta(minutes=1))
    assert {ids[3]: "fox", ids[1]: "dog"}.items() <= traffic.labels.items()

    # a second thought: the fox was a cat. Moving it again makes its label the latest one
    shutil.move(dest / "labelled" / "fox" / f"{ids[3]}.png", dest / "labelled" / "cat")
    labels, problems = read_labelled_folder(dest / "labelled", CLASSES)
    assert import_labels(labels, records, max_mb=10, max_age_days=1, source="import:again") == 2
    assert labelled_as(url, records, start, "last") == {ids[3]: "cat", ids[1]: "dog"}
    with pytest.raises(ValueError, match="no timezone"):
        import_labels([Label("abc", "cat", datetime(2026, 1, 1))], records, max_mb=10, max_age_days=1, source="x")


LS_ANNOTATION = {"id": 1, "completed_by": 1, "ground_truth": False, "lead_time": 3.2, "result_count": 0, "task": 1}


def annotation(choice: str, updated: str, cancelled: bool = False, number: int = 1) -> dict:
    """One annotation as Label Studio exports it (docs: guide/task_format, "Label Studio JSON format of annotated tasks")."""
    return LS_ANNOTATION | {
        "id": number, "was_cancelled": cancelled, "created_at": "2026-11-01T09:00:00.000000Z", "updated_at": updated,
        "result": [{"id": f"r{number}", "from_name": "label", "to_name": "image", "type": "choices", "origin": "manual",
                    "value": {"choices": [choice]}}],
    }


def test_a_label_studio_export_round_trip(store, tmp_path):
    url, records, ids, start = store
    chosen = least_confident(collect(url, records, CLASSES, "last", start).joined.unlabelled, 5)
    root = tmp_path / "labelling"
    dest = export_label_studio(chosen, CLASSES, root / "batch-1")

    tasks = json.loads((dest / "tasks.json").read_text())
    assert [t["data"]["request_id"] for t in tasks] == [c.request_id for c in chosen]
    for task, shot in zip(tasks, chosen, strict=True):
        reference = task["data"]["image"]
        assert reference == f"/data/local-files/?d=batch-1/images/{shot.request_id}.png"
        assert (root / reference.split("?d=", 1)[1]).read_bytes() == shot.read_bytes()  # under the document root
        [prediction] = task["predictions"]
        assert prediction["score"] == shot.confidence and prediction["model_version"] == "3"
        [result] = prediction["result"]
        assert (result["type"], result["from_name"], result["to_name"]) == ("choices", "label", "image")
        assert result["value"] == {"choices": [shot.prediction]}
    config = ET.fromstring((dest / "label_config.xml").read_text())
    image, choices = config.find("Image"), config.find("Choices")
    assert (image.get("name"), image.get("value")) == ("image", "$image")
    assert (choices.get("name"), choices.get("toName"), choices.get("choice")) == ("label", "image", "single")
    assert [c.get("value") for c in choices.findall("Choice")] == list(CLASSES)
    assert "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=" + str(root.resolve()) in (dest / "README.txt").read_text()

    # what Label Studio exports once a person labelled them (data kept as imported, annotations added)
    base = datetime.now(UTC).replace(microsecond=0)

    def at(minutes: int) -> str:
        return (base + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    export = [
        {"id": 11, "data": tasks[0]["data"], "predictions": tasks[0]["predictions"], "annotations": [
            annotation("cat", at(1), number=1),
            annotation("dog", at(3), number=2),  # the latest one not cancelled wins
            annotation("fox", at(5), cancelled=True, number=3),  # skipped: ignored
            annotation("cat", at(2), number=4),
        ]},
        {"id": 12, "data": tasks[1]["data"], "annotations": [annotation("cow", at(1))]},
        {"id": 13, "data": tasks[2]["data"], "annotations": []},
        {"id": 14, "data": tasks[3]["data"], "annotations": [annotation("cat", at(1), cancelled=True)]},
        {"id": 15, "data": {"image": "/data/local-files/?d=elsewhere/x.png"}, "annotations": [annotation("cat", at(1))]},
        {"id": 16, "data": tasks[4]["data"], "annotations": [  # another timezone's offset
            annotation("fox", (base + timedelta(minutes=2)).astimezone(timezone(timedelta(hours=2))).isoformat())]},
    ]
    path = tmp_path / "project-1-at-2026-11-02.json"
    path.write_text(json.dumps(export))
    labels, problems = read_label_studio_export(path, CLASSES)
    assert [(label.request_id, label.label, label.time) for label in labels] == [
        (chosen[0].request_id, "dog", base + timedelta(minutes=3)),
        (chosen[4].request_id, "fox", base + timedelta(minutes=2)),
    ]
    assert len(problems) == 4 and all(p.startswith(f"{path}: task ") for p in problems)
    assert "task 12" in problems[0] and "'cow' is not a class" in problems[0]
    assert "task 13" in problems[1] and "not labelled yet" in problems[1]
    assert "task 14" in problems[2] and "cancelled" in problems[2]
    assert "task 15" in problems[3] and "request_id" in problems[3]

    assert import_labels(labels, records, max_mb=10, max_age_days=1, source=f"import:{path}") == 2
    assert labelled_as(url, records, start) == {chosen[0].request_id: "dog", chosen[4].request_id: "fox"}


def test_a_json_min_or_non_json_file_is_reported_not_guessed(tmp_path):
    minimal = tmp_path / "min.json"
    minimal.write_text(json.dumps([{"id": 3, "image": "x.png", "request_id": "abc", "label": "cat"}]))
    labels, problems = read_label_studio_export(minimal, CLASSES)
    assert labels == [] and "JSON-MIN" in problems[0]
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_label_studio_export(broken, CLASSES)


def test_an_export_never_writes_into_a_folder_that_holds_anything(store, tmp_path):
    url, records, _, start = store
    chosen = least_confident(collect(url, records, CLASSES, "last", start).joined.unlabelled, 2)
    dest = tmp_path / "earlier"
    dest.mkdir()
    (dest / "work.txt").write_text("a person's earlier labels")
    for export in (export_folder, export_label_studio):
        with pytest.raises(FileExistsError, match=str(dest)):
            export(chosen, CLASSES, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["work.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_folder(chosen, CLASSES, empty) / "tasks.csv").exists()  # an empty folder is fine


def test_a_folder_that_is_not_laid_out_as_classes_gives_one_problem_line_each(tmp_path):
    root = tmp_path / "labelled"
    for relative in ("cat/good_1.png", "dog/good-2.jpg", "cow/abc.png", "cat/bad name!.png", "cat/noext", "stray.png",
                     "fox/twice.png", "dog/twice.png", "cat/.DS_Store", f"fox/{'x' * 65}.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"image")
    (root / "cat" / "nested").mkdir()
    labels, problems = read_labelled_folder(root, CLASSES)
    assert sorted((label.request_id, label.label) for label in labels) == [("good-2", "dog"), ("good_1", "cat")]
    expected = {  # a path each, and what is wrong
        root / "cow": "not a class", root / "cat" / "bad name!.png": "not named", root / "cat" / "noext": "not named",
        root / "stray.png": "not in a class folder", root / "cat" / "nested": "a folder inside",
        root / "fox" / f"{'x' * 65}.png": "not named",
    }
    assert len(problems) == len(expected) + 1
    for path, reason in expected.items():
        assert any(p.startswith(f"{path}: ") and reason in p for p in problems), (path, problems)
    [twice] = [p for p in problems if "twice" in p]
    assert "more than one class" in twice and str(root / "dog" / "twice.png") in twice
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_labelled_folder(tmp_path / "missing", CLASSES)


# -- the command line and the monitor's export ----------------------------------------------


def config_for(workspace: Path, url: str, *overrides: str):
    from flows.config import load_config

    return load_config("monitor", "test", [f"paths.workspace={workspace}", f"captures.url={url}", *overrides])


def test_the_monitor_exports_each_unlabelled_capture_once(tmp_path):
    from flows.label import export_for_monitor

    url = str(tmp_path / "captures")
    ids = capture(url, [("cat", 0.9), ("dog", 0.3), ("fox", 0.6)])
    now = datetime.now(UTC)
    assert export_for_monitor(config_for(tmp_path, url), list(CLASSES), now) is None  # monitor.labelling.export: 0
    config = config_for(tmp_path, url, "monitor.labelling.export=2")
    first = export_for_monitor(config, list(CLASSES), now)
    assert first.parent == config.monitor.labelling.dir
    assert sorted(p.stem for p in (first / "unlabelled").iterdir()) == sorted([ids[1], ids[2]])
    assert f"paths.workspace={tmp_path}" in (first / "README.txt").read_text()
    second = export_for_monitor(config_for(tmp_path, url, "monitor.labelling.export=2", "monitor.labelling.format=label_studio"),
                                list(CLASSES), now + timedelta(seconds=1))
    assert [t["data"]["request_id"] for t in json.loads((second / "tasks.json").read_text())] == [ids[0]]
    assert export_for_monitor(config, list(CLASSES), now + timedelta(seconds=2)) is None  # each went out once


def test_the_command_line_refuses_bad_input_with_exit_2(tmp_path, capsys):
    from flows.label import main

    workspace = f"paths.workspace={tmp_path}"
    cases = [
        (["import", "env=test", workspace, f"from={tmp_path / 'missing'}"], "no such file or folder"),
        (["import", "env=test", workspace], "import needs from=PATH"),
        (["import", "env=test", workspace, "n=3"], "n= is an option of export"),
        (["export", "env=test", workspace, "from=x"], "from= is an option of import"),
        (["export", "env=test", workspace, "n=many"], "n=many: expected a whole number"),
        (["export", "env=test", workspace, "format=csv"], "format=csv: one of folder, label_studio"),
        (["export", "env=test", workspace, "window=soon"], "window=soon"),
        (["label", "env=test"], "the first word is export or import"),
        (["import", "env=test", "monitor.nonsense=1", f"from={tmp_path}"], "monitor.nonsense"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)


@pytest.mark.slow  # a real MLflow store: the served version's classes come from its registered model
def test_the_command_line_exports_and_imports_with_the_served_versions_classes(tiny_onnx, tmp_path, capsys):
    from conftest import register_tiny

    from flows.label import main

    _, version = register_tiny(tiny_onnx, tmp_path)
    url = str(tmp_path / "captures" / "test")  # captures.url of env=test under this workspace
    ids = capture(url, [("cat", 0.9), ("dog", 0.3), ("fox", 0.6), ("cat", 0.1)])
    start = datetime.now(UTC) - timedelta(minutes=5)
    given = ["env=test", f"paths.workspace={tmp_path}", f"captures.url={url}", f"monitor.version={version}"]
    assert main(["export", *given, "n=2"]) == 0
    out = capsys.readouterr().out
    [dest] = (tmp_path / "monitor" / "test" / "labelling").iterdir()
    assert "exported 2 of 4 unlabelled captures" in out and str(dest) in out
    assert sorted(p.stem for p in (dest / "unlabelled").iterdir()) == sorted([ids[3], ids[1]])

    empty_labels = main(["import", *given, f"from={dest}"])  # nothing moved yet
    assert empty_labels == 2 and "not one usable label" in capsys.readouterr().err
    shutil.move(dest / "unlabelled" / f"{ids[3]}.png", dest / "labelled" / "fox")
    (dest / "labelled" / "wolf").mkdir()
    assert main(["import", *given, f"from={dest}"]) == 0
    captured = capsys.readouterr()
    assert "imported 1 labels" in captured.out and "'wolf' is not a class" in captured.err
    assert labelled_as(url, tmp_path / "records" / "test", start) == {ids[3]: "fox"}

    # the next export: neither the labelled one nor the one still out with a person
    assert main(["export", *given, "n=5", "format=label_studio", "window=all", f"dest={tmp_path / 'ls'}"]) == 0
    assert "1 more went out in earlier exports" in capsys.readouterr().out
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["request_id"] for t in tasks] == [ids[2], ids[0]]
