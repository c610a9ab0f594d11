"""The window the monitor judges: what the server recorded for one version between two times."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

from mlops.deploy.canary import Role, ShadowComparison, compare_shadow
from mlops.serve.records import read_window


def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not match:
        raise ValueError(f"'{text}' is not a duration like 30m, 1h, 24h or 7d")
    value, unit = float(match[1]), match[2]
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: value})


def window_start(window: str, now: datetime) -> datetime | None:
    """Where a window such as `24h` (back from `now`) starts; None for `all` (no bound)."""
    return None if window == "all" else now - parse_duration(window)


@dataclass
class Traffic:
    start: datetime
    end: datetime
    version: str
    served: pd.DataFrame  # answered requests: features, prediction, confidence, probabilities, embedding, latency_ms, time
    rejected: pd.DataFrame  # rejected requests: error kind, content type
    labels: dict[str, str]  # request id -> true label (feedback)
    unreadable: list[str]
    failed: pd.DataFrame = field(default_factory=pd.DataFrame)  # requests whose model call failed (a 500)
    shadow: ShadowComparison | None = None  # a shadow version's answers to the same requests
    shadow_versions: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.served) + len(self.rejected) + len(self.failed)


def load_traffic(records: Path | str, version: str, start: datetime, end: datetime) -> Traffic:
    """`records`: the local folder or the store the servers ship to (`records.store`)."""
    requests = read_window(records, "requests", start, end)
    feedback = read_window(records, "feedback", start - timedelta(days=7), end)
    mine = [r for r in requests.records if str(r.get("model_version")) == version and r.get("role") != Role.SHADOW]
    shadows = [r for r in requests.records if r.get("role") == Role.SHADOW]
    frame = pd.DataFrame(mine)
    if frame.empty:
        frame = pd.DataFrame(columns=["status", "request_id", "time"])
    served = frame[frame["status"] == "ok"].reset_index(drop=True)
    rejected = frame[frame["status"] == "rejected"].reset_index(drop=True)
    failed = frame[frame["status"] == "error"].reset_index(drop=True)
    labels = {r["request_id"]: r["label"] for r in feedback.records if "request_id" in r and "label" in r}
    shadow = None
    if shadows:
        shadow = compare_shadow(mine + shadows, labels)  # pairs only the requests this version answered
    return Traffic(start, end, version, served, rejected, labels, requests.unreadable + feedback.unreadable, failed,
                   shadow, sorted({str(r["model_version"]) for r in shadows}))
