"""The pure rules that turn captured requests and feedback into labelled production samples."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from mlops.data.production import HOLDOUT, Label, Labelled, join_labels, split_production, time_split

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
CLASSES = ("cat", "dog")


@dataclass(frozen=True)
class Shot:
    request_id: str
    time: datetime


def shots(n: int) -> list[Shot]:
    return [Shot(f"r{i:02d}", T0 + timedelta(minutes=i)) for i in range(n)]


def label(request_id: str, value: str, minute: int = 0) -> Label:
    return Label(request_id, value, T0 + timedelta(hours=1, minutes=minute))


def test_each_captured_request_gets_its_label_and_the_rest_are_unlabelled():
    joined = join_labels(shots(4), [label("r01", "dog"), label("r03", "cat")], CLASSES, "last")
    assert [(s.capture.request_id, s.label) for s in joined.labelled] == [("r01", "dog"), ("r03", "cat")]
    assert [c.request_id for c in joined.unlabelled] == ["r00", "r02"]
    assert joined.problems == [] and joined.counts() == {"cat": 1, "dog": 1}


def test_unknown_classes_and_labels_without_a_capture_are_reported_not_used():
    joined = join_labels(shots(2), [label("r00", "cow"), label("r99", "cat"), label("r01", "x" * 5000)], CLASSES, "last")
    assert joined.labelled == []
    assert joined.problem_counts() == {"not_captured": 1, "unknown_class": 2}
    assert all(len(p.detail) < 200 for p in joined.problems), "a label was quoted in full"


def test_a_repeated_label_counts_once():
    joined = join_labels(shots(1), [label("r00", "dog", 1), label("r00", "dog", 2)], CLASSES, "drop")
    assert [s.label for s in joined.labelled] == ["dog"] and joined.problems == []


@pytest.mark.parametrize(("on_conflict", "expected"), [("last", ["cat"]), ("drop", [])])
def test_conflicting_labels_follow_the_config_and_are_reported(on_conflict, expected):
    given = [label("r00", "cat", 5), label("r00", "dog", 1)]  # the later one says cat
    joined = join_labels(shots(1), given, CLASSES, on_conflict)
    assert [s.label for s in joined.labelled] == expected
    assert len(joined.unlabelled) == 1 - len(expected)  # a dropped one waits for a person to settle it
    assert [p.kind for p in joined.problems] == ["conflicting"]
    assert "'cat'" in joined.problems[0].detail or "neither" in joined.problems[0].detail


def test_the_time_split_holds_out_the_newest_share():
    joined = join_labels(list(reversed(shots(10))), [label(f"r{i:02d}", "cat") for i in range(10)], CLASSES, "last")
    train, holdout = time_split(joined.labelled, 0.3)
    assert [s.capture.request_id for s in holdout] == ["r07", "r08", "r09"]
    assert len(train) == 7 and max(s.capture.time for s in train) < min(s.capture.time for s in holdout)
    assert time_split(joined.labelled, 0.0) == (joined.labelled, [])
    assert [len(part) for part in time_split(joined.labelled[:2], 0.1)] == [1, 1]
    assert [len(part) for part in time_split(joined.labelled[:1], 0.5)] == [1, 0]
    with pytest.raises(ValueError, match="holdout_share"):
        time_split(joined.labelled, 1.0)


def test_collect_joins_what_a_real_server_captured_with_the_feedback_it_recorded(tiny_onnx, tmp_path):
    """A server on 127.0.0.1 captures every answered image and records feedback; `collect` reads both."""
    import io
    import time

    import httpx
    from conftest import LiveApp
    from PIL import Image

    from mlops.config.serve import default_serve_config
    from mlops.data.production import collect
    from mlops.serve.app import ServedModel, create_app
    from mlops.serve.capture import CaptureWriter
    from mlops.serve.inference import OnnxClassifier
    from mlops.serve.records import RecordWriter

    def png(shade: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), (shade, 40, 90)).save(buffer, "PNG")
        return buffer.getvalue()

    start = datetime.now(UTC) - timedelta(seconds=1)
    captures, records = tmp_path / "captures", tmp_path / "records"
    app = create_app(
        ServedModel("pets", "4", OnnxClassifier(tiny_onnx)), default_serve_config(), None,
        RecordWriter(records, max_mb=10, max_age_days=1, flush_s=0.1),
        CaptureWriter(str(captures), sample_rate=1.0, max_mb=10, max_age_days=1),
    )
    with LiveApp(app) as url:
        ids = [httpx.post(url + "/predict", content=png(10 * i), headers={"content-type": "image/png"}).json()["request_id"]
               for i in range(5)]
        for request_id, label in [(ids[0], "cat"), (ids[1], "dog"), (ids[1], "fox"), (ids[2], "cow"), ("f" * 32, "cat")]:
            assert httpx.post(url + "/feedback", json={"request_id": request_id, "label": label}).status_code in (202, 422)
        time.sleep(0.5)  # the record writer flushes every 0.1 s
    collected = collect(str(captures), records, ("cat", "dog", "fox"), "drop", start)
    joined = collected.joined
    assert [(s.capture.request_id, s.label) for s in joined.labelled] == [(ids[0], "cat")]
    assert {c.request_id for c in joined.unlabelled} == set(ids[1:])  # ids[1]: conflicting, dropped
    assert joined.problem_counts() == {"conflicting": 1, "not_captured": 1}  # "cow" was refused by the server
    assert joined.labelled[0].capture.read_bytes() == png(0) and collected.unreadable == []
    everything = collect(str(captures), records, ("cat", "dog", "fox"), "drop", None)  # data.production=all
    assert everything.joined.labelled == joined.labelled


def labelled(n_per_class: int, classes=CLASSES) -> list[Labelled]:
    found, minute = [], 0
    for name in classes:
        for _ in range(n_per_class):
            found.append(Labelled(Shot(f"r{minute:03d}", T0 + timedelta(minutes=minute)), name))
            minute += 1
    return found


def test_the_production_split_holds_out_by_time_or_by_class_and_is_deterministic():
    samples = labelled(10)  # cats first: the newest 30% are all dogs
    by_time = split_production(samples, "time", 0.3, 0.2, seed=1)
    assert {s.label for s in by_time[HOLDOUT]} == {"dog"} and len(by_time[HOLDOUT]) == 6
    newest = min(s.capture.time for s in by_time[HOLDOUT])
    assert all(s.capture.time < newest for part in ("train", "val") for s in by_time[part])

    stratified = split_production(samples, "stratified", 0.3, 0.2, seed=1)
    assert {label: sum(s.label == label for s in stratified[HOLDOUT]) for label in CLASSES} == {"cat": 3, "dog": 3}
    assert {label: sum(s.label == label for s in stratified["val"]) for label in CLASSES} == {"cat": 1, "dog": 1}
    assert split_production(list(reversed(samples)), "stratified", 0.3, 0.2, seed=1) == stratified
    assert split_production(samples, "stratified", 0.3, 0.2, seed=2) != stratified
    every = [s.capture.request_id for part in stratified.values() for s in part]
    assert sorted(every) == sorted(s.capture.request_id for s in samples)  # each sample once

    few = split_production(labelled(1) + labelled(2, ("fox",)), "stratified", 0.3, 0.2, seed=1)
    assert [s.label for s in few[HOLDOUT]] == ["fox"]  # a class of one is never held out whole
