"""Request records shipped to a store (`records.url`): the local folder stays the spool, the
writer uploads each part it appended to whole, readers read the store. fsspec's in-memory
filesystem stands in for the bucket."""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta

import fsspec
import pytest
from pydantic import ValidationError
from test_records import feedback, request

from mlops.config.common import RecordsConfig
from mlops.serve.records import RecordWriter, read_window, record_files, writer_name

DAY = timedelta(days=1)


@pytest.fixture
def bucket():
    url = f"memory://records-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def uploaded(url: str) -> dict[str, bytes]:
    """Every file under the store, by its path relative to `url`."""
    fs, root = fsspec.core.url_to_fs(url)
    return {path[len(root) + 1:]: fs.cat_file(path) for path in fs.find(root)}


def writer_for(tmp_path, bucket, **options) -> RecordWriter:
    return RecordWriter(tmp_path / "spool", max_mb=10, max_age_days=1, flush_s=3600, upload_url=bucket,
                        upload_s=0.01, **options)


def window(root, kind="requests"):
    return read_window(root, kind, datetime.now(UTC) - DAY, datetime.now(UTC) + DAY)


def test_each_part_is_uploaded_whole_under_the_writers_folder(tmp_path, bucket):
    writer = writer_for(tmp_path, bucket)
    writer.write("requests", request(1))
    writer.write("feedback", feedback(1))
    writer.flush()
    writer.upload()
    local = record_files(writer.root, "requests") + record_files(writer.root, "feedback")
    name = writer_name(writer.root)
    assert name.endswith(writer_name(tmp_path / "spool")[-8:]) and name != writer_name(tmp_path)
    assert uploaded(bucket) == {f"{name}/{p.relative_to(writer.root).as_posix()}": p.read_bytes() for p in local}
    assert all(key.split("/")[-1] == f"{datetime.now(UTC):%H}-0.jsonl" for key in uploaded(bucket))  # (not at xx:59:59)
    assert writer.bytes_uploaded == sum(len(data) for data in uploaded(bucket).values())
    before = writer.bytes_uploaded

    writer.write("requests", request(2))  # the part grows: uploaded again, whole
    writer.flush()
    writer.upload()
    part = record_files(writer.root, "requests")[0]
    assert uploaded(bucket)[f"{name}/{part.relative_to(writer.root).as_posix()}"] == part.read_bytes()
    assert part.read_bytes().count(b"\n") == 2 and not writer.dirty
    assert writer.bytes_uploaded == before + part.stat().st_size  # only the part that grew
    writer.close()


def test_the_store_is_read_from_writer_folders_and_the_flat_layout(tmp_path, bucket):
    first = writer_for(tmp_path, bucket)
    second = RecordWriter(tmp_path / "other", max_mb=10, max_age_days=1, flush_s=3600, upload_url=bucket)
    first.write("requests", request(1))
    second.write("requests", request(2))
    first.close()
    second.close()
    fs, root = fsspec.core.url_to_fs(bucket)
    now = datetime.now(UTC)
    flat = f"{root}/requests/{now:%Y-%m-%d}/{now:%H}-0.jsonl"  # the layout of a folder copied to the store
    fs.pipe_file(flat, (json.dumps(request(3)) + "\n" + json.dumps({"not": "a record"}) + "\n").encode())

    found = window(bucket)
    assert sorted(r["request_id"] for r in found.records) == [f"{n:032x}" for n in (1, 2, 3)]
    assert len(found.unreadable) == 1
    assert found.unreadable[0].startswith(f"{fs.unstrip_protocol(flat)}:2: invalid requests record: request_id: Field required")
    assert window(bucket, "feedback").records == []
    assert window(f"{bucket}/nothing-here").records == []


def test_a_failed_upload_is_logged_and_retried(tmp_path, bucket, monkeypatch, caplog):
    writer = writer_for(tmp_path, bucket)
    fs = type(writer._store[0])

    def down(self, path, value, **kwargs):
        raise OSError("the store is down")

    with monkeypatch.context() as patch:
        patch.setattr(fs, "pipe_file", down)
        writer.write("requests", request(1))
        writer.flush()
        with caplog.at_level(logging.ERROR, logger="mlops.serve.records"):
            writer.upload()  # never raises
    assert "the store is down" in caplog.text and len(writer.dirty) == 1 and uploaded(bucket) == {}

    writer.flush()  # nothing new: still shipped on the next try
    writer.upload()
    assert not writer.dirty and window(bucket).records == window(writer.root).records != []
    writer.close()


def test_close_uploads_what_is_dirty(tmp_path, bucket):
    writer = RecordWriter(tmp_path / "spool", max_mb=10, max_age_days=1, flush_s=3600, upload_url=bucket, upload_s=3600)
    writer.write("feedback", feedback(7))
    writer.close()
    assert [r["request_id"] for r in window(bucket, "feedback").records] == [f"{7:032x}"]


def test_the_background_thread_uploads_every_upload_s(tmp_path, bucket):
    writer = RecordWriter(tmp_path / "spool", max_mb=10, max_age_days=1, flush_s=0.02, upload_url=bucket, upload_s=0.05)
    writer.write("requests", request(3))
    for _ in range(200):
        if window(bucket).records:
            break
        time.sleep(0.02)
    assert [r["request_id"] for r in window(bucket).records] == [f"{3:032x}"]
    writer.close()


def test_no_upload_url_writes_only_the_folder(tmp_path):
    writer = RecordWriter(tmp_path, max_mb=10, max_age_days=1, flush_s=3600)
    writer.write("requests", request(1))
    writer.close()
    assert not writer.dirty and writer.bytes_uploaded == 0 and len(window(tmp_path).records) == 1


def test_an_unusable_upload_url_fails_at_the_start(tmp_path):
    with pytest.raises(ValueError, match="records store"):
        RecordWriter(tmp_path, max_mb=10, max_age_days=1, upload_url="nosuchprotocol://b/records")


def test_records_url_is_checked_and_readers_use_it():
    base = {"dir": "/srv/records", "max_mb": 1, "max_age_days": 1}
    with pytest.raises(ValidationError, match="the URL holds a password"):
        RecordsConfig(**base, url="s3://key:secret@bucket/records")
    config = RecordsConfig(**base, url="s3://bucket/records")
    assert config.url == config.store == "s3://bucket/records" and config.upload_s == 30.0
    assert str(RecordsConfig(**base).store) == "/srv/records"
    with pytest.raises(ValidationError):
        RecordsConfig(**base, upload_s=0)


def test_imported_labels_are_shipped_where_the_monitor_reads(tmp_path, bucket, monkeypatch):
    from mlops.data.labelling import import_labels
    from mlops.data.production import Label

    label = Label(f"{5:032x}", "dog", datetime.now(UTC))
    assert import_labels([label], tmp_path / "spool", 10, 1, "import:test", upload_url=bucket) == 1
    assert [r["label"] for r in window(bucket, "feedback").records] == ["dog"]

    monkeypatch.setattr(type(fsspec.filesystem("memory")), "pipe_file", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(OSError, match="could not be uploaded"):
        import_labels([label], tmp_path / "spool", 10, 1, "import:test", upload_url=bucket)
