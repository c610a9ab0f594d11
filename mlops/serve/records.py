"""Request records: what the model server saw and answered, for the monitor to read by time window.

Records are JSON lines, one schema per kind (`RequestRecord` for `requests`, `FeedbackRecord`
for `feedback`), in numbered parts per hour, `<dir>/<kind>/<YYYY-MM-DD>/<HH>-<n>.jsonl`, each
part at most 1/20 of the budget (`max_mb`), so a window is read by listing files and disk use
is bounded at any load by deleting whole parts, oldest first (`prune`). Files of the earlier
layout, one per hour (`<HH>.jsonl`), are still read and pruned.

The folder is local (S3 has no append): with `upload_url` (`records.url`, e.g. `s3://bucket/records`,
credentials from the AWS_* variables) the writer ships it for readers on other machines, each
part it appended to uploaded whole every `upload_s` seconds and at close, to
`<url>/<writer>/<kind>/<day>/<part>`; `<writer>` is the host and the folder, so servers sharing a
folder overwrite one key with the whole file and two folders never collide. Only the local folder
is pruned: the bucket's own lifecycle rule bounds the store. `read_window` reads either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger(__name__)

PARTS_PER_BUDGET = 20  # a part is at most 1/20 of the budget: the parts being written stay small
PRUNE_SHARE = 50  # prune after every 1/50 of the budget written: the budget is overshot by ~2%
PRUNE_EVERY_S = 60.0  # and at least this often, for the age limit of an idle server
PART_NAME = re.compile(r"(?P<hour>\d{2})(?:-(?P<part>\d+))?\.jsonl")


# -- schemas --------------------------------------------------------------------------------


def _iso_text(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time text with a timezone")  # noqa: TRY004 - pydantic reports ValueErrors
    return value


Time = Annotated[AwareDatetime, BeforeValidator(_iso_text)]
Number = Annotated[float, Field(strict=True)]  # a JSON number: not "12", not true


class RequestRecord(BaseModel):
    """One answered or rejected image, as the server's `record(...)` writes it."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    time: Time
    model: str
    model_version: str
    endpoint: str
    status: Literal["ok", "rejected", "error"]  # error: the model call failed (the client got a 500)
    role: Literal["champion", "canary", "shadow"] | None = None  # who answered (mlops.deploy.canary); None: champion
    content_type: str = ""
    bytes: Annotated[int, Field(strict=True, ge=0)] = 0
    error: str | None = None
    prediction: str | None = None
    confidence: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None
    latency_ms: Annotated[float, Field(strict=True, ge=0.0)] | None = None
    width: Number | None = None
    height: Number | None = None
    aspect_ratio: Number | None = None
    brightness: Number | None = None
    contrast: Number | None = None
    saturation: Number | None = None
    sharpness: Number | None = None
    logits: list[Number] | None = None  # the model's logits, in its class order (softmax: the probabilities)
    embedding: list[Number] | None = None  # the model's `projection` output (models exported with one)

    @model_validator(mode="after")
    def _answer_or_error(self) -> RequestRecord:
        if self.status == "ok":
            missing = [name for name in ("prediction", "confidence", "latency_ms") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"an ok record needs {', '.join(missing)}")
        elif self.error is None:
            raise ValueError(f"a {self.status} record needs its error")
        return self


class FeedbackRecord(BaseModel):
    """The true label of an earlier request, as the server's `/feedback` writes it."""

    model_config = ConfigDict(extra="allow")

    request_id: str
    label: str
    time: Time
    model: str | None = None
    model_version: str | None = None


SCHEMAS: dict[str, type[BaseModel]] = {"requests": RequestRecord, "feedback": FeedbackRecord}


def validation_problem(error: ValidationError) -> str:
    """Where and what, never the value itself (a line can be megabytes)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in error.errors())


# -- files ----------------------------------------------------------------------------------


def hour_file(root: Path, kind: str, when: datetime) -> Path:
    """The one file per hour of the earlier layout (still read and pruned)."""
    return root / kind / when.strftime("%Y-%m-%d") / f"{when:%H}.jsonl"


def part_file(root: Path, kind: str, when: datetime, part: int) -> Path:
    return root / kind / when.strftime("%Y-%m-%d") / f"{when:%H}-{part}.jsonl"


def sort_key(path: Path) -> tuple[str, str, int] | None:
    """(day, hour, part) of a record file, the earlier layout's hour file first; None: not ours."""
    match = PART_NAME.fullmatch(path.name)
    if not match:
        return None
    return path.parent.name, match["hour"], int(match["part"]) if match["part"] is not None else -1


def record_files(root: Path, kind: str) -> list[Path]:
    """Every record file of `kind`, oldest first."""
    found = [(key, path) for path in (root / kind).glob("*/*.jsonl") if (key := sort_key(path))]
    return [path for _, path in sorted(found)]


def hour_files(root: Path, kind: str, hour: datetime) -> list[Path]:
    """The files of one hour, in writing order."""
    prefix = f"{hour:%H}"
    found = [(key, path) for path in (root / kind / f"{hour:%Y-%m-%d}").glob(f"{prefix}*.jsonl")
             if (key := sort_key(path)) and key[1] == prefix]
    return [path for _, path in sorted(found)]


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # pruned meanwhile by another server sharing the folder
        return 0


def current_part(root: Path, kind: str, when: datetime, part_bytes: int) -> Path:
    """The part to append to: the hour's last part while under `part_bytes`, else a new one."""
    parts = [p for p in hour_files(root, kind, when) if sort_key(p)[2] >= 0]
    if parts and size_of(parts[-1]) < part_bytes:
        return parts[-1]
    return part_file(root, kind, when, sort_key(parts[-1])[2] + 1 if parts else 0)


# -- the budget -----------------------------------------------------------------------------


def hour_of(path: Path) -> str:
    """"YYYY-MM-DD/HH" of a record file: its records are from that hour (or flushed then)."""
    day, hour, _ = sort_key(path)
    return f"{day}/{hour}"


def oldest_to_delete(files: list[Path], sizes: dict[Path, int], total: int, max_bytes: int, may_go=lambda _: True) -> list[Path]:
    """The oldest of `files` (oldest first) to delete until `total` is within `max_bytes`;
    never the newest (being written), and none from the first that may not go."""
    chosen = []
    for path in files[:-1]:
        if total <= max_bytes or not may_go(path):
            break
        chosen.append(path)
        total -= sizes[path]
    return chosen


def first_time(path: Path) -> datetime:
    """When the first request of a file was made; unreadable: an hour before the file's hour
    (earlier than any of its records: more feedback is kept, never less)."""
    try:
        with path.open("rb") as handle:
            return parse_line(handle.readline(), "requests")[1]
    except (OSError, ValueError):
        day, hour, _ = sort_key(path)
        return datetime.strptime(f"{day} {hour}", "%Y-%m-%d %H").replace(tzinfo=UTC) - timedelta(hours=1)


def last_write(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:  # pruned meanwhile by another server sharing the folder
        return datetime.min.replace(tzinfo=UTC)


def prune(root: Path, max_bytes: int, max_age: timedelta, now: datetime | None = None) -> list[Path]:
    """Delete record files past the age limit, then past the size budget; returns what went.

    For the budget, requests go first, oldest first, never the newest part (being written).
    Feedback labels requests made before it, so a feedback file goes only when it was last
    written before the first request kept was made (the budget is then overshot by at most
    that newest part of requests); only feedback alone over the budget (a client flooding
    /feedback) makes older feedback go, oldest first, never the newest part.
    """
    cutoff = ((now or datetime.now(UTC)) - max_age).strftime("%Y-%m-%d/%H")
    requests, feedback = record_files(root, "requests"), record_files(root, "feedback")
    sizes = {path: size_of(path) for path in requests + feedback}
    removed = [path for path in requests + feedback if hour_of(path) < cutoff]
    requests = [path for path in requests if path not in removed]
    feedback = [path for path in feedback if path not in removed]
    total = sum(sizes[path] for path in requests + feedback)

    gone = oldest_to_delete(requests, sizes, total, max_bytes)
    removed, total, requests = removed + gone, total - sum(sizes[p] for p in gone), requests[len(gone):]
    if total > max_bytes:
        first_kept = first_time(requests[0]) if requests else datetime.max.replace(tzinfo=UTC)
        gone = oldest_to_delete(feedback, sizes, total, max_bytes, lambda path: last_write(path) < first_kept)
        removed, total, feedback = removed + gone, total - sum(sizes[p] for p in gone), feedback[len(gone):]
    feedback_bytes = sum(sizes[path] for path in feedback)
    if feedback_bytes > max_bytes:
        log.warning("feedback records alone exceed the budget of %d bytes under %s: deleting the oldest", max_bytes, root)
        removed += oldest_to_delete(feedback, sizes, feedback_bytes, max_bytes)
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def writer_name(root: Path) -> str:
    """This writer's folder in the store: the host and the local folder (servers sharing a folder
    ship the same files to the same keys)."""
    return f"{socket.gethostname()}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"


def redact(text: str) -> str:
    """`text` with the user part of any URL in it (user:password@) hidden, for logs."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


def store_of(url: str, what: str = "records store") -> tuple[Any, str]:
    """(fsspec filesystem, root path) of a store (records, captures); ValueError naming `what`
    and the URL if unusable."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown protocol; its package not installed
        raise ValueError(f"{what} {redact(url)}: {error}") from None
    return fs, root.rstrip("/")


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class RecordWriter:
    """Buffered, thread-safe appends; flushes every `flush_s` seconds or `flush_n` records.

    The size of the part being written is checked at every flush (a new part past 1/20 of the
    budget), and the folder is pruned after every 1/50 of the budget written (and every
    minute), so disk use stays within a few percent of `max_mb` at any load.

    With `upload_url`, the parts appended to are shipped whole by the background thread (never
    in a request) every `upload_s` seconds and at `close`; a failed upload is logged and retried.
    """

    def __init__(self, root: Path, max_mb: float, max_age_days: float, flush_s: float = 1.0, flush_n: int = 256,
                 upload_url: str | None = None, upload_s: float = 30.0):
        self.root, self.max_bytes, self.max_age = root, int(max_mb * 2**20), timedelta(days=max_age_days)
        self.part_bytes = max(self.max_bytes // PARTS_PER_BUDGET, 1)
        self.prune_bytes = max(self.max_bytes // PRUNE_SHARE, 1)
        self.flush_s, self.flush_n = flush_s, flush_n
        self.upload_url, self.upload_s = upload_url, upload_s
        self._store = store_of(upload_url) if upload_url else None  # an unusable URL fails here, at the start
        self.writer = writer_name(root)
        self.dirty: set[Path] = set()  # parts appended to since their last upload
        self._last_upload = float("-inf")
        self._buffer: dict[str, list[str]] = {}
        self._count = 0
        self._parts: dict[str, tuple[str, Path]] = {}  # kind -> (hour, part being written)
        self.bytes_written = 0  # since the start, for the record
        self.bytes_uploaded = 0
        self._written, self._last_prune = 0, float("-inf")  # since the last prune (the first flush prunes)
        self._lock = threading.Lock()  # the buffer
        self._io = threading.Lock()  # the files: one flush at a time
        self._shipping = threading.Lock()  # one upload at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="record-writer", daemon=True)
        self._thread.start()

    def write(self, kind: str, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._buffer.setdefault(kind, []).append(line)
            self._count += 1
            full = self._count >= self.flush_n
        if full:
            self.flush()

    def flush(self) -> None:
        """Append the buffer, then prune if due; a failing disk is logged, never raised."""
        with self._lock:
            buffer, self._buffer, self._count = self._buffer, {}, 0
        with self._io:
            try:
                now = datetime.now(UTC)
                for kind, lines in buffer.items():
                    data = ("\n".join(lines) + "\n").encode()
                    path = self._part(kind, now)
                    with path.open("ab", buffering=0) as handle:  # one write: whole lines beside other servers'
                        handle.write(data)
                    if self._store:
                        self.dirty.add(path)
                    self._written += len(data)
                    self.bytes_written += len(data)
                if self._written >= self.prune_bytes or time.monotonic() - self._last_prune >= PRUNE_EVERY_S:
                    self._written, self._last_prune = 0, time.monotonic()
                    prune(self.root, self.max_bytes, self.max_age, now)
            except OSError as error:  # a full disk must not take the server down
                log.error("writing records under %s failed: %s", self.root, error)

    def upload(self) -> None:
        """Ship each part appended to since its last upload, whole (one PUT: atomic, overwriting
        the earlier upload of a growing part); a failure is logged, the part left for the next try."""
        if not self._store:
            return
        fs, base = self._store
        with self._shipping:
            self._last_upload = time.monotonic()
            with self._io:
                dirty, self.dirty = sorted(self.dirty), set()
            for number, path in enumerate(dirty):
                try:
                    self.bytes_uploaded += self._ship(fs, f"{base}/{self.writer}/{path.relative_to(self.root).as_posix()}", path)
                except Exception as error:  # noqa: BLE001 - a store failure must not take the server down
                    log.error("uploading records to %s failed: %s", redact(self.upload_url),
                              redact(f"{type(error).__name__}: {error}")[:300])
                    with self._io:
                        self.dirty.update(dirty[number:])
                    return

    def _ship(self, fs, key: str, path: Path) -> int:
        try:
            with self._io:  # never half a write of this writer's
                data = path.read_bytes()
        except FileNotFoundError:  # pruned meanwhile: nothing left to ship
            return 0
        if is_local(fs):
            fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(key, data)
        return len(data)

    def _part(self, kind: str, now: datetime) -> Path:
        hour = f"{now:%Y-%m-%d %H}"
        known = self._parts.get(kind)
        if known is None or known[0] != hour or size_of(known[1]) >= self.part_bytes:
            path = current_part(self.root, kind, now, self.part_bytes)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._parts[kind] = known = (hour, path)
        return known[1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()
        self.upload()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
            if time.monotonic() - self._last_upload >= self.upload_s:
                self.upload()


# -- reading --------------------------------------------------------------------------------


@dataclass
class Window:
    records: list[dict]
    unreadable: list[str]  # "path:line: reason"; the files are left as they are


def parse_line(line: bytes, kind: str) -> tuple[dict, datetime]:
    """The record of one line, its time in UTC; ValueError (with the reason) if it is not one."""
    try:
        record = json.loads(line.decode())
    except ValueError as error:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{type(error).__name__}: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a {kind} record: a JSON {type(record).__name__}")  # noqa: TRY004 - a bad line, as the others
    try:
        stamp = SCHEMAS[kind].model_validate(record).time.astimezone(UTC)
    except ValidationError as error:
        raise ValueError(f"invalid {kind} record: {validation_problem(error)}") from None
    return record | {"time": stamp.isoformat()}, stamp


def store_files(url: str, kind: str, hours: list[datetime]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) of the files of `hours` in a store, directly under it and in each writer's
    folder; the listings are fresh (a monitor reads a growing store again and again)."""
    fs, root = store_of(url)
    fs.invalidate_cache()
    try:
        bases = [root] + [entry["name"].rstrip("/") for entry in fs.ls(root, detail=True)
                          if entry["type"] == "directory" and entry["name"].rstrip("/").rsplit("/", 1)[-1] not in SCHEMAS]
    except FileNotFoundError:
        return
    days: dict[tuple[str, str], list[str]] = {}
    for hour in hours:
        day, prefix = f"{hour:%Y-%m-%d}", f"{hour:%H}"
        found = []
        for base in bases:
            if (base, day) not in days:
                try:
                    days[base, day] = fs.ls(f"{base}/{kind}/{day}", detail=False)
                except FileNotFoundError:
                    days[base, day] = []
            found += [(key, path) for path in days[base, day] if (key := sort_key(Path(path))) and key[1] == prefix]
        for _, path in sorted(found):
            yield fs.unstrip_protocol(path), lambda path=path: fs.cat_file(path)


def read_window(root: Path | str, kind: str, start: datetime, end: datetime) -> Window:
    """Valid records of `kind` with start <= time < end (time in UTC); bad lines and files are
    reported as "path:line: reason" and skipped, never fatal.

    `root`: a local folder (a Path), or a store (a URL or path text: `records.url`, read with fsspec).
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind '{kind}': one of {sorted(SCHEMAS)}")
    hours, hour = [], start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    while hour <= end:  # one hour past: a file is named by when its buffer was flushed
        hours.append(hour)
        hour += timedelta(hours=1)
    if isinstance(root, Path):
        files = ((str(path), path.read_bytes) for each in hours for path in hour_files(root, kind, each))
    else:
        files = store_files(root, kind, hours)
    records, unreadable = [], []
    for name, read in files:
        try:
            lines = read().splitlines()
        except Exception as error:  # noqa: BLE001 - a store may raise anything; an unreadable file is reported
            unreadable.append(f"{name}: {type(error).__name__}: {error}")
            continue
        for number, line in enumerate(lines, 1):
            try:
                record, stamp = parse_line(line, kind)
            except ValueError as error:
                unreadable.append(f"{name}:{number}: {error}")
                continue
            if start <= stamp < end:
                records.append(record)
    return Window(records, unreadable)
