"""Request records on disk: size rotation, the budget at full load, what pruning keeps, the
schema each line must follow. Real files under tmp_path, tiny budgets."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from mlops.serve.records import RecordWriter, current_part, hour_file, part_file, prune, read_window, record_files

NOW = datetime(2026, 11, 21, 12, 30, tzinfo=UTC)
DAY = timedelta(days=1)


def request(number: int, when: datetime | None = None, **fields) -> dict:
    """A record as the server writes an answered request."""
    return {
        "request_id": f"{number:032x}", "time": (when or datetime.now(UTC)).isoformat(), "model": "pets",
        "model_version": "3", "endpoint": "/predict", "content_type": "image/png", "bytes": 812, "status": "ok",
        "error": None, "prediction": "cat", "confidence": 0.93, "latency_ms": 2.5, "width": 32.0, "height": 32.0,
        "aspect_ratio": 1.0, "brightness": 0.41, "contrast": 0.2, "saturation": 0.1, "sharpness": 0.3,
    } | fields


def feedback(number: int, when: datetime | None = None, **fields) -> dict:
    return {"request_id": f"{number:032x}", "label": "dog", "time": (when or datetime.now(UTC)).isoformat(),
            "model": "pets", "model_version": "3"} | fields


def disk_use(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*.jsonl"))


def make(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def records_file(path: Path, records: list[dict]) -> Path:
    """Records as JSON lines, the file last written at the time of its last record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    written = datetime.fromisoformat(records[-1]["time"]).timestamp()
    os.utime(path, (written, written))
    return path


def test_the_budget_holds_at_full_load_and_the_newest_records_stay(tmp_path):
    budget = 256 * 1024
    writer = RecordWriter(tmp_path, max_mb=budget / 2**20, max_age_days=1, flush_s=3600, flush_n=16)
    peak, low, count = 0, budget, 12_000  # ~4 MB written, 16 times the budget
    for number in range(count):
        writer.write("requests", request(number))
        if number % 16 == 15:
            used = disk_use(tmp_path)
            peak = max(peak, used)
            low = min(low, used) if peak > budget * 0.9 else low
    writer.close()
    assert budget * 0.9 < peak <= budget * 1.1
    assert low > budget * 0.8  # once full, it stays nearly full: pruning deletes small parts
    assert disk_use(tmp_path) <= budget * 1.1
    window = read_window(tmp_path, "requests", datetime.now(UTC) - DAY, datetime.now(UTC) + DAY)
    numbers = [int(r["request_id"], 16) for r in window.records]
    assert window.unreadable == [] and numbers[-1] == count - 1
    assert numbers == list(range(numbers[0], count))  # what is kept is the newest, without a gap


def test_parts_rotate_by_size_and_are_read_in_order(tmp_path):
    writer = RecordWriter(tmp_path, max_mb=1, max_age_days=1, flush_s=3600, flush_n=100)  # parts of 52 KB
    for number in range(1000):  # ~400 KB
        writer.write("requests", request(number))
    writer.close()
    parts = record_files(tmp_path, "requests")
    flush = 100 * (len(json.dumps(request(0), separators=(",", ":"))) + 1)
    assert len(parts) >= disk_use(tmp_path) // (writer.part_bytes + flush) >= 4
    assert all(p.name.endswith(f"-{n}.jsonl") for n, p in enumerate(parts))
    assert all(p.stat().st_size < writer.part_bytes + flush for p in parts)  # a part plus at most one flush
    window = read_window(tmp_path, "requests", datetime.now(UTC) - DAY, datetime.now(UTC) + DAY)
    assert [int(r["request_id"], 16) for r in window.records] == list(range(1000))


def test_the_part_to_write_is_the_last_one_of_the_hour_until_full(tmp_path):
    assert current_part(tmp_path, "requests", NOW, 100) == part_file(tmp_path, "requests", NOW, 0)
    make(hour_file(tmp_path, "requests", NOW), 500)  # the earlier layout's file is not appended to
    make(part_file(tmp_path, "requests", NOW, 0), 100)
    make(part_file(tmp_path, "requests", NOW, 1), 99)
    assert current_part(tmp_path, "requests", NOW, 100) == part_file(tmp_path, "requests", NOW, 1)
    make(part_file(tmp_path, "requests", NOW, 1), 100)
    assert current_part(tmp_path, "requests", NOW, 100) == part_file(tmp_path, "requests", NOW, 2)
    assert current_part(tmp_path, "requests", NOW + timedelta(hours=1), 100).name == "13-0.jsonl"


def test_records_of_the_earlier_one_file_per_hour_layout_are_still_read(tmp_path):
    when = datetime.now(UTC) - timedelta(minutes=1)
    make(hour_file(tmp_path, "requests", when), 0).write_text(json.dumps(request(1, when)) + "\n")
    make(part_file(tmp_path, "requests", when, 0), 0).write_text(json.dumps(request(2, when)) + "\n")
    make(part_file(tmp_path, "requests", when, 10), 0).write_text(json.dumps(request(4, when)) + "\n")
    make(part_file(tmp_path, "requests", when, 2), 0).write_text(json.dumps(request(3, when)) + "\n")
    window = read_window(tmp_path, "requests", when - timedelta(minutes=1), when + timedelta(minutes=1))
    assert [int(r["request_id"], 16) for r in window.records] == [1, 2, 3, 4]


def test_requests_go_oldest_first_and_the_part_being_written_stays(tmp_path):
    paths = [make(part_file(tmp_path, "requests", NOW - timedelta(hours=h), 0), 1000) for h in (50, 3, 2, 1, 0)]
    removed = prune(tmp_path, max_bytes=2500, max_age=DAY, now=NOW)
    assert removed == paths[:3]  # past the age limit, then the oldest until within 2,500 bytes
    assert [p.exists() for p in paths] == [False, False, False, True, True]
    assert prune(tmp_path, max_bytes=0, max_age=DAY, now=NOW) == [paths[3]]  # never the newest


def test_feedback_stays_while_it_can_label_a_request_kept(tmp_path):
    hours = (14, 3, 1, 0)  # 14 h ago is yesterday: the order holds across days
    requests = [records_file(part_file(tmp_path, "requests", NOW - timedelta(hours=h), 0), [request(h, NOW - timedelta(hours=h))])
                for h in hours]
    labels = [records_file(part_file(tmp_path, "feedback", NOW - timedelta(hours=h), 0),
                           [feedback(h, NOW - timedelta(hours=h) + timedelta(seconds=1))]) for h in hours]
    r, f = requests[0].stat().st_size, labels[0].stat().st_size
    assert prune(tmp_path, max_bytes=2 * r + 4 * f, max_age=DAY, now=NOW) == requests[:2]  # requests first
    assert prune(tmp_path, max_bytes=r + f, max_age=DAY, now=NOW) == [requests[2], *labels[:3]]  # then older feedback
    assert prune(tmp_path, max_bytes=0, max_age=DAY, now=NOW) == []  # newer than the request kept: it may label it
    assert requests[3].exists() and labels[3].exists()


def test_feedback_goes_only_once_written_before_the_first_request_kept(tmp_path):
    ago = [NOW - timedelta(minutes=m) for m in (30, 20, 10)], [NOW - timedelta(minutes=m) for m in (25, 15, 5, 2)]
    requests = [records_file(part_file(tmp_path, "requests", NOW, n), [request(n, when)]) for n, when in enumerate(ago[0])]
    labels = [records_file(part_file(tmp_path, "feedback", NOW, n), [feedback(n, when)]) for n, when in enumerate(ago[1])]
    r, f = requests[0].stat().st_size, labels[0].stat().st_size
    assert prune(tmp_path, max_bytes=r + 3 * f, max_age=DAY, now=NOW) == [*requests[:2], labels[0]]
    assert prune(tmp_path, max_bytes=r + f, max_age=DAY, now=NOW) == [labels[1]]  # before the request made 10 min ago
    assert prune(tmp_path, max_bytes=r, max_age=DAY, now=NOW) == []  # after it: it may label it
    assert labels[2].exists() and labels[3].exists()


def test_the_current_hours_feedback_is_kept_when_its_requests_are_over_the_budget(tmp_path):
    requests = records_file(part_file(tmp_path, "requests", NOW, 0), [request(n, NOW) for n in range(20)])
    labels = records_file(part_file(tmp_path, "feedback", NOW, 0), [feedback(1, NOW + timedelta(seconds=1))])
    assert prune(tmp_path, max_bytes=1000, max_age=DAY, now=NOW) == []
    assert requests.exists() and labels.exists()


def test_feedback_alone_over_the_budget_loses_its_oldest_parts(tmp_path, caplog):
    request_file = records_file(part_file(tmp_path, "requests", NOW, 0), [request(1, NOW)])
    labels = [records_file(part_file(tmp_path, "feedback", NOW, n), [feedback(n, NOW + timedelta(seconds=1))] * 10)
              for n in range(4)]
    f = labels[0].stat().st_size
    with caplog.at_level(logging.WARNING, logger="mlops.serve.records"):
        assert prune(tmp_path, max_bytes=2 * f + 500, max_age=DAY, now=NOW) == labels[:2]
    assert "feedback records alone exceed the budget" in caplog.text
    assert request_file.exists() and labels[3].exists()


def test_feedback_past_the_age_limit_goes(tmp_path):
    old = make(part_file(tmp_path, "feedback", NOW - timedelta(days=8), 0), 10)
    request = make(part_file(tmp_path, "requests", NOW - timedelta(days=9), 0), 10)
    kept = make(part_file(tmp_path, "feedback", NOW - timedelta(days=6), 0), 10)
    assert prune(tmp_path, max_bytes=10**6, max_age=timedelta(days=7), now=NOW) == [request, old]
    assert kept.exists()


def test_a_failing_disk_is_logged_not_raised_into_the_request(tmp_path, caplog):
    blocked = tmp_path / "records"
    blocked.write_text("a file where the folder should be")
    writer = RecordWriter(blocked, max_mb=1, max_age_days=1, flush_s=3600, flush_n=2)
    with caplog.at_level(logging.ERROR, logger="mlops.serve.records"):
        writer.write("requests", request(1))
        writer.write("requests", request(2))  # flushes in the caller's thread
        writer.close()
    assert f"writing records under {blocked} failed" in caplog.text


def test_wrong_lines_are_reported_with_the_field_and_skipped(tmp_path):
    when = datetime.now(UTC) - timedelta(minutes=1)
    naive = when.replace(tzinfo=None).isoformat()
    lines = {
        "requests": [
            request(1, when),
            request(2, when, time=naive),
            request(3, when, width="abc"),
            request(4, when, confidence="0.9"),
            request(5, when, status="maybe"),
            request(6, when, prediction=None),
            {k: v for k, v in request(7, when).items() if k != "model_version"},
            request(8, when, time=1_700_000_000),
            [1, 2],
            request(9, when, status="rejected", error="not_an_image", prediction=None, confidence=None, latency_ms=None),
            request(10, when.astimezone(timezone(timedelta(hours=2)))),
        ],
        "feedback": [feedback(1, when), feedback(2, when, label={"class": "dog"}), feedback(3, when, time=naive)],
    }
    for kind, records in lines.items():
        path = make(part_file(tmp_path, kind, when, 0), 0)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    start, end = when - timedelta(minutes=1), when + timedelta(minutes=1)

    requests = read_window(tmp_path, "requests", start, end)
    assert [int(r["request_id"], 16) for r in requests.records] == [1, 9, 10]
    assert requests.records[2]["time"] == when.isoformat()  # in UTC, as every other record
    path = part_file(tmp_path, "requests", when, 0)
    assert requests.unreadable == [
        f"{path}:2: invalid requests record: time: Input should have timezone info",
        f"{path}:3: invalid requests record: width: Input should be a valid number",
        f"{path}:4: invalid requests record: confidence: Input should be a valid number",
        f"{path}:5: invalid requests record: status: Input should be 'ok', 'rejected' or 'error'",
        f"{path}:6: invalid requests record: record: Value error, an ok record needs prediction",
        f"{path}:7: invalid requests record: model_version: Field required",
        f"{path}:8: invalid requests record: time: Value error, must be an ISO 8601 time text with a timezone",
        f"{path}:9: not a requests record: a JSON list",
    ]
    labels = read_window(tmp_path, "feedback", start, end)
    assert [r["request_id"] for r in labels.records] == [f"{1:032x}"]
    assert [u.split(": ", 1)[1] for u in labels.unreadable] == [
        "invalid feedback record: label: Input should be a valid string",
        "invalid feedback record: time: Input should have timezone info",
    ]


def test_unreadable_lines_and_files_are_reported_and_kept(tmp_path):
    writer = RecordWriter(tmp_path, max_mb=1, max_age_days=1)
    writer.write("requests", request(1))
    writer.close()
    (good,) = record_files(tmp_path, "requests")
    with good.open("a") as handle:
        handle.write("{not json\n")
    binary = good.with_name("00.jsonl") if not good.name.startswith("00") else good.with_name("01.jsonl")
    binary.write_bytes(b"\xff\xfe\x00garbage")
    window = read_window(tmp_path, "requests", datetime.now(UTC) - DAY, datetime.now(UTC) + timedelta(hours=1))
    assert len(window.records) == 1
    assert any(":2: JSONDecodeError" in problem for problem in window.unreadable)
    assert any("UnicodeDecodeError" in problem for problem in window.unreadable)
    assert good.exists() and binary.exists()


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown record kind 'request': one of"):
        read_window(Path("."), "request", NOW, NOW)
