"""Whether the request records stay within their disk budget when written at full speed.

    python bench/records.py [--budget-mb 8 64] [--seconds 30] [--feedback-share 0.5]

`mlops.serve.records.RecordWriter` gets records as the model server writes them (an answered
request with its features, and a feedback label for a share of them) from one thread as fast as
it takes them, against a budget much smaller than what is written. After every flush the bytes
of the record files on disk are summed: the peak and the end are reported against the budget,
with the records written per second (the time spent summing excluded), and how many of the
requests still on disk lost the label written for them (feedback pruned too early).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from table import print_table  # bench/table.py

from mlops.serve.records import RecordWriter, read_window

FLUSH_N = 256  # the server's default


def request(number: int) -> dict:
    return {
        "request_id": uuid.uuid4().hex, "time": datetime.now(UTC).isoformat(), "model": "image-classifier",
        "model_version": "1", "endpoint": "/predict", "content_type": "image/png", "bytes": 812, "status": "ok",
        "error": None, "prediction": "7", "confidence": 0.93 + number % 7 / 100, "latency_ms": 2.5 + number % 13,
        "width": 8.0, "height": 8.0, "aspect_ratio": 1.0, "brightness": 0.41, "contrast": 0.2, "saturation": 0.0,
        "sharpness": 0.3,
    }


def disk_use(root: Path) -> int:
    total = 0
    for path in root.rglob("*.jsonl"):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


def labels_lost(root: Path, labelled: set[str]) -> int:
    """Requests still on disk that were given a label whose feedback record is gone."""
    now = datetime.now(UTC)
    kept = {r["request_id"] for r in read_window(root, "requests", now - timedelta(days=1), now + timedelta(hours=1)).records}
    labels = {r["request_id"] for r in read_window(root, "feedback", now - timedelta(days=1), now + timedelta(hours=1)).records}
    return len((kept & labelled) - labels)


def run(budget_mb: float, seconds: float, feedback_share: float) -> list[object]:
    with tempfile.TemporaryDirectory(prefix="bench-records-") as folder:
        root = Path(folder)
        writer = RecordWriter(root, max_mb=budget_mb, max_age_days=7, flush_n=FLUSH_N)
        written = feedback = peak = 0
        labelled: set[str] = set()
        measuring = 0.0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(FLUSH_N):
                record = request(written)
                writer.write("requests", record)
                written += 1
                if feedback < written * feedback_share:
                    writer.write("feedback", {"request_id": record["request_id"], "label": "7", "time": record["time"],
                                              "model": "image-classifier", "model_version": "1"})
                    feedback += 1
                    labelled.add(record["request_id"])
            measured = time.perf_counter()
            peak = max(peak, disk_use(root))
            measuring += time.perf_counter() - measured
        writer.close()
        elapsed = time.perf_counter() - start - measuring
        end = disk_use(root)
        budget = int(budget_mb * 2**20)
        files = len(list(root.rglob("*.jsonl")))
        lost = labels_lost(root, labelled)
        return [f"{budget_mb:g}", f"{written:,}", f"{feedback:,}", f"{(written + feedback) / elapsed:,.0f}",
                f"{writer.bytes_written / 2**20:,.0f}", f"{peak / 2**20:.2f}", f"{100 * peak / budget:.1f}",
                f"{end / 2**20:.2f}", f"{100 * end / budget:.1f}", files, f"{lost:,}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-mb", type=float, nargs="+", default=[8.0, 64.0])
    parser.add_argument("--seconds", type=float, default=30.0, help="writing time per budget")
    parser.add_argument("--feedback-share", type=float, default=0.5, help="feedback records per request")
    args = parser.parse_args()
    rows = [run(budget, args.seconds, args.feedback_share) for budget in args.budget_mb]
    print_table(["budget MB", "requests", "feedback", "records/s", "MB written", "peak MB", "peak % of budget",
                 "end MB", "end % of budget", "files at end",
                 "labels lost of kept requests"], rows)


if __name__ == "__main__":
    main()
