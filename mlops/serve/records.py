"""Request records: what the model server saw and answered, for the monitor to read by time window.

Records are JSON lines in one file per hour, `<dir>/<kind>/<YYYY-MM-DD>/<HH>.jsonl` (kind is
`requests` or `feedback`), so a window is read by listing files, and disk use is bounded by
deleting the oldest hours past `max_mb` or `max_age_days`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)


def hour_file(root: Path, kind: str, when: datetime) -> Path:
    return root / kind / when.strftime("%Y-%m-%d") / f"{when:%H}.jsonl"


class RecordWriter:
    """Buffered, thread-safe appends; flushes every `flush_s` seconds or `flush_n` records."""

    def __init__(self, root: Path, max_mb: float, max_age_days: float, flush_s: float = 1.0, flush_n: int = 256):
        self.root, self.max_bytes, self.max_age = root, int(max_mb * 2**20), timedelta(days=max_age_days)
        self.flush_s, self.flush_n = flush_s, flush_n
        self._buffer: dict[str, list[str]] = {}
        self._count = 0
        self._lock = threading.Lock()
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
        with self._lock:
            buffer, self._buffer, self._count = self._buffer, {}, 0
        now = datetime.now(UTC)
        for kind, lines in buffer.items():
            path = hour_file(self.root, kind, now)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as handle:
                handle.write("\n".join(lines) + "\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                if time.monotonic() - last_prune > 60:
                    prune(self.root, self.max_bytes, self.max_age)
                    last_prune = time.monotonic()
            except OSError as error:  # a full disk must not take the server down
                log.error("writing records under %s failed: %s", self.root, error)


def prune(root: Path, max_bytes: int, max_age: timedelta) -> list[Path]:
    """Delete the oldest hour files past the age limit or the size budget; returns what went."""
    files = sorted(root.glob("*/*/*.jsonl"), key=lambda p: (p.parent.name, p.name))
    cutoff = (datetime.now(UTC) - max_age).strftime("%Y-%m-%d/%H")
    sizes = {path: path.stat().st_size for path in files}
    total, removed = sum(sizes.values()), []
    for path in files[:-1] if files else []:  # never the newest hour being written
        if f"{path.parent.name}/{path.stem}" < cutoff or total > max_bytes:
            total -= sizes[path]
            path.unlink()
            removed.append(path)
    return removed


@dataclass
class Window:
    records: list[dict]
    unreadable: list[str]  # "path:line: reason"; the files are left as they are


def read_window(root: Path, kind: str, start: datetime, end: datetime) -> Window:
    """Records of `kind` with start <= time < end; bad lines and files are reported, not fatal."""
    records, unreadable = [], []
    hour = start.replace(minute=0, second=0, microsecond=0)
    while hour <= end:  # one hour past: a file is named by when its buffer was flushed
        path = hour_file(root, kind, hour)
        hour += timedelta(hours=1)
        if not path.exists():
            continue
        try:
            lines = path.read_bytes().splitlines()
        except OSError as error:
            unreadable.append(f"{path}: {type(error).__name__}: {error}")
            continue
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line.decode())
                stamp = datetime.fromisoformat(record["time"])
            except (ValueError, KeyError, TypeError) as error:  # UnicodeDecodeError is a ValueError
                unreadable.append(f"{path}:{number}: {type(error).__name__}: {error}")
                continue
            if start <= stamp < end:
                records.append(record)
    return Window(records, unreadable)
