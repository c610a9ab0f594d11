"""The monitor's HTML report: what its "over the window" plot really draws."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import matplotlib.dates as mdates
import pandas as pd
import pytest

from mlops.monitor import report
from mlops.monitor.window import Traffic

END = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
START = END - timedelta(minutes=30)


def served(rows: list[tuple[datetime, float, float]]) -> pd.DataFrame:
    return pd.DataFrame({
        "request_id": [f"{i:032x}" for i in range(len(rows))], "status": "ok", "prediction": "cat",
        "time": [when.isoformat() for when, _, _ in rows],
        "latency_ms": [latency for _, latency, _ in rows], "confidence": [confidence for _, _, confidence in rows],
    })


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """Every figure html_report renders, by the titles of its axes, kept open to be read."""
    import matplotlib.pyplot as plt

    kept = {}

    def keep(fig) -> str:
        kept[" | ".join(ax.get_title() for ax in fig.axes)] = fig
        return ""

    monkeypatch.setattr(report, "_png", keep)
    yield kept
    for fig in kept.values():
        plt.close(fig)


def plotted(ax) -> dict[datetime, float]:
    """The points a line of `ax` draws: time -> value, bins without a value left out."""
    (line,) = ax.get_lines()
    return {mdates.num2date(x).replace(microsecond=0): y for x, y in line.get_xydata() if not math.isnan(y)}


def test_the_window_plot_draws_every_bin_with_requests_on_the_windows_time_axis(figures):
    minute = timedelta(minutes=1)
    rows = [(START + 5 * minute + timedelta(seconds=s), latency, confidence)
            for s, latency, confidence in ((1, 10.0, 0.5), (20, 20.0, 0.7), (40, 60.0, 0.9))]
    rows.append((START + 12 * minute + timedelta(seconds=30), 4.0, 0.6))  # alone, empty bins on both sides
    traffic = Traffic(START, END, "3", served(rows), pd.DataFrame(), {}, [])
    page = report.html_report(report.MonitorReport(version="3", start=START, end=END, requests=4), traffic, None, ["cat"])

    assert "over the window" in page
    counts, latency, confidence = figures["requests per 1min | median latency (ms) | mean confidence"].axes
    first, second = START + 5 * minute, START + 12 * minute
    assert plotted(latency) == {first: 20.0, second: 4.0}
    assert plotted(confidence) == pytest.approx({first: 0.7, second: 0.6})
    counted = plotted(counts)
    assert len(counted) == 30 and {t: c for t, c in counted.items() if c} == {first: 3.0, second: 1.0}
    assert all(line.get_marker() == "o" for ax in (latency, confidence) for line in ax.get_lines())  # a lone bin shows
    for ax in (counts, latency, confidence):
        assert [mdates.num2date(x) for x in ax.get_xlim()] == [START, END]


def test_a_minute_of_traffic_is_plotted_inside_the_window(figures):
    rows = [(END - timedelta(seconds=50 - s), 5.0 + s, 0.8) for s in range(0, 40, 10)]
    traffic = Traffic(START, END, "3", served(rows), pd.DataFrame(), {}, [])
    report.html_report(report.MonitorReport(version="3", start=START, end=END, requests=4), traffic, None, ["cat"])

    counts, latency, confidence = figures["requests per 1min | median latency (ms) | mean confidence"].axes
    last = END - timedelta(minutes=1)
    assert plotted(latency) == {last: 20.0} and plotted(confidence) == pytest.approx({last: 0.8})
    assert [mdates.num2date(x) for x in counts.get_xlim()] == [START, END]  # not years around one point
