"""The monitor's report: the checks of every section over a window, as markdown and as a
self-contained HTML page with plots. `judge` assembles it from the window's facts.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from mlops.checks import Report, fmt
from mlops.config import MonitorSettings
from mlops.monitor.checks import (
    bias_checks,
    class_shares,
    drift_checks,
    estimated_accuracy,
    integrity_checks,
    labelled,
    performance_checks,
    telemetry_checks,
    vectors,
)
from mlops.monitor.profiling import FeatureDrift, Reference
from mlops.monitor.window import Traffic

DRIFT_HEADER = ("feature", "algorithm", "score", "drift if", "drift")


@dataclass(kw_only=True)
class MonitorReport(Report):
    version: str
    start: datetime
    end: datetime
    requests: int
    feature_drift: list[FeatureDrift] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    shadow: dict | None = None  # champion vs shadow on the same requests (mlops.deploy.canary.compare_shadow)

    @property
    def outcome(self) -> str:
        if self.requests == 0:
            return "no traffic"
        return "breach" if self.breaches else "healthy"

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "version": self.version, "start": self.start.isoformat(), "end": self.end.isoformat(),
            "requests": self.requests, "outcome": self.outcome, "unreadable": self.unreadable,
            "feature_drift": [asdict(d) for d in self.feature_drift], "shadow": self.shadow,
        }

    def shadow_rows(self) -> list[tuple[str, str, str]]:
        """(figure, served version, shadow version) rows of the shadow comparison."""
        s = self.shadow
        rows = [("requests answered by both", str(s["pairs"]), str(s["pairs"])),
                ("agreement (same prediction)", fmt(s["agreement"]), fmt(s["agreement"])),
                ("mean confidence", fmt(s["champion_confidence"]), fmt(s["shadow_confidence"]))]
        for key, name in (("p95_ms", "p95 latency, ms (shadow: model call only)"), ("error_rate", "error rate"),
                          ("labelled", "labelled (feedback)"), ("accuracy", "accuracy on feedback")):
            rows.append((name, fmt(s["champion"][key]), fmt(s["shadow"][key])))
        return rows

    def to_markdown(self) -> str:
        head = (f"**Monitor: {self.outcome.upper()}** — version {self.version}, {self.requests} requests"
                f" from {self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC\n")
        if self.unreadable:
            head += f"\n{len(self.unreadable)} unreadable record lines or files skipped (left in place).\n"
        body = super().to_markdown() if self.sections else ""
        if self.shadow:
            rows = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in self.shadow_rows())
            body += (f"\n### shadow: version {', '.join(self.shadow['versions'])} beside {self.version}\n\n"
                     f"| | v{self.version} (served) | shadow |\n|---|---|---|\n{rows}\n")
        if self.feature_drift:
            rows = "\n".join("| " + " | ".join(_drift_cells(d)) + " |" for d in self.feature_drift)
            body += (f"\n### drift per feature\n\n| {' | '.join(DRIFT_HEADER)} |\n|" + "---|" * len(DRIFT_HEADER)
                     + f"\n{rows}\n")
        return head + body


def judge(
    traffic: Traffic,
    reference: Reference | None,
    classes: list[str],
    settings: MonitorSettings,
    max_p95_latency_ms: float,
) -> MonitorReport:
    """Every section's checks over the window (none when it had no traffic)."""
    report = MonitorReport(version=traffic.version, start=traffic.start, end=traffic.end,
                           requests=traffic.requests, unreadable=traffic.unreadable)
    if traffic.shadow is not None:
        report.shadow = asdict(traffic.shadow) | {"versions": traffic.shadow_versions}
    if traffic.requests == 0:
        return report
    drift, report.feature_drift = drift_checks(traffic, reference, classes, settings)
    report.sections = {
        "integrity": integrity_checks(traffic, settings),
        "drift": drift,
        "performance": performance_checks(traffic, reference, classes, settings),
        "telemetry": telemetry_checks(traffic, settings, max_p95_latency_ms),
        "bias": bias_checks(traffic, reference, classes, settings),
    }
    return report


def _drift_cells(d: FeatureDrift) -> list[str]:
    bound = f"{'>' if d.algorithm == 'hellinger' else '<'} {d.threshold:g}"
    return [d.feature, d.algorithm, f"{d.score:.4g}", bound, "DRIFT" if d.drifted else "no"]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def window_rule(span: timedelta) -> str:
    """The width of a plotted time bin: a few dozen to a few hundred bins per window."""
    seconds = span.total_seconds()
    return "1min" if seconds <= 3 * 3600 else "15min" if seconds <= 2 * 86400 else "1h"


def over_the_window(served: pd.DataFrame, start: datetime, end: datetime) -> pd.DataFrame:
    """Requests, median latency and mean confidence per bin, every bin from `start` to `end`
    (no request: a count of 0, no latency or confidence: NaN)."""
    rule = window_rule(end - start)
    frame = served.assign(time=pd.to_datetime(served["time"], utc=True, format="ISO8601")).set_index("time")
    grouped = frame.resample(rule, origin=pd.Timestamp(start))  # bins start at the window's start
    bins = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq=rule, inclusive="left")
    series = pd.DataFrame({
        f"requests per {rule}": grouped.size(),
        "median latency (ms)": grouped["latency_ms"].median(),
        "mean confidence": grouped["confidence"].mean(),
    }).reindex(bins)
    return series.fillna({f"requests per {rule}": 0})


def window_figure(traffic: Traffic):
    """The three series over the window on a time axis spanning it; a point per bin with
    requests (with markers: a bin between empty ones is a point, not a line)."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series = over_the_window(traffic.served, traffic.start, traffic.end)
    x = mdates.date2num(series.index.to_pydatetime())
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    for ax, (title, values) in zip(axes, series.items()):
        ax.plot(x, values.to_numpy(dtype=float), marker="o", markersize=3)
        ax.set_title(title)
    locator = mdates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes[-1].set_xlim(mdates.date2num(traffic.start), mdates.date2num(traffic.end))
    axes[-1].set_xlabel("time (UTC)")
    return fig


def embedding_figure(reference: np.ndarray, current: np.ndarray):
    """The first two principal components (the projection's first two numbers): reference vs window."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(reference[:, 0], reference[:, 1], s=8, alpha=0.4, label=f"reference ({len(reference)})")
    ax.scatter(current[:, 0], current[:, 1], s=8, alpha=0.4, label=f"window ({len(current)})")
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title("embeddings")
    ax.legend()
    return fig


def accuracy_over_the_window(traffic: Traffic, temperature: float, chunks: int = 10) -> pd.DataFrame:
    """Estimated accuracy (CBPE, with its 95% interval) and realised accuracy (where feedback
    came back) per chunk of consecutive answered requests."""
    from mlops.monitor.estimate import calibrated, estimate_accuracy

    served = traffic.served[traffic.served["logits"].map(lambda v: isinstance(v, list))] if "logits" in traffic.served else traffic.served.iloc[:0]
    served = served.sort_values("time").reset_index(drop=True)
    truth = labelled(traffic).set_index("request_id")["label"] if traffic.labels else pd.Series(dtype=object)
    rows = []
    for chunk in np.array_split(np.arange(len(served)), min(chunks, len(served))):
        part = served.iloc[chunk]
        estimate = estimate_accuracy(calibrated(np.asarray(part["logits"].tolist(), dtype=np.float64), temperature))
        known = part[part["request_id"].isin(truth.index)]
        realised = float((known["prediction"] == truth[known["request_id"]].to_numpy()).mean()) if len(known) else np.nan
        rows.append({"time": pd.to_datetime(part["time"].iloc[-1], utc=True, format="ISO8601"), "estimated": estimate.accuracy,
                     "low": estimate.low, "high": estimate.high, "realised": realised, "labels": len(known)})
    return pd.DataFrame(rows)


def accuracy_figure(series: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    x = np.arange(len(series))
    ax.fill_between(x, series["low"], series["high"], alpha=0.25, label="estimated, 95% interval")
    ax.plot(x, series["estimated"], marker="o", markersize=3, label="estimated (CBPE)")
    ax.plot(x, series["realised"], marker="s", markersize=3, label="realised (feedback)")
    ax.set_xticks(x, [f"{t:%H:%M:%S}" for t in series["time"]], fontsize=7)
    ax.set_xlabel("chunk of requests, ending at (UTC)")
    ax.set_ylim(0, 1.02)
    ax.set_title("estimated vs realised accuracy")
    ax.legend(fontsize=7)
    return fig


def html_report(report: MonitorReport, traffic: Traffic, reference: Reference | None, classes: list[str]) -> str:
    """A self-contained page: the checks, reference-vs-current plots of drifted features and
    of predicted-class shares, and requests, latency and confidence over the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    drifted = [d.feature for d in report.feature_drift if d.drifted]
    if reference is not None and len(traffic.served):
        for feature in [f for f in drifted if f != "prediction"]:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.hist(reference.values[feature], bins=30, alpha=0.5, density=True, label="reference")
            ax.hist(traffic.served[feature].astype(float), bins=30, alpha=0.5, density=True, label="current")
            ax.set_title(f"{feature} (drifted)")
            ax.legend()
            images.append((f"{feature}: reference vs current", _png(fig)))
        fig, ax = plt.subplots(figsize=(6, 3))
        now, then = class_shares(traffic.served["prediction"], classes), class_shares(reference.values["prediction"], classes)
        x = np.arange(len(classes))
        ax.bar(x - 0.2, [then[c] for c in classes], 0.4, label="reference")
        ax.bar(x + 0.2, [now[c] for c in classes], 0.4, label="current")
        ax.set_xticks(x, classes)
        ax.set_title("predicted-class shares")
        ax.legend()
        images.append(("predicted-class shares", _png(fig)))
        current = vectors(traffic.served, "embedding")
        if reference.embedding is not None and len(current) and current.shape[1] == reference.embedding.shape[1]:
            images.append(("embeddings: reference vs window (first two principal components)",
                           _png(embedding_figure(reference.embedding, current))))
        if estimated_accuracy(traffic, reference) is not None:
            images.append(("estimated vs realised accuracy over the window",
                           _png(accuracy_figure(accuracy_over_the_window(traffic, reference.temperature)))))
    if len(traffic.served):
        images.append(("over the window", _png(window_figure(traffic))))

    sections = report.to_html()
    if report.shadow:
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in report.shadow_rows())
        sections += (f"<h3>shadow: version {html.escape(', '.join(report.shadow['versions']))} beside {report.version}</h3>"
                     f"<table><tr><th></th><th>v{report.version} (served)</th><th>shadow</th></tr>{rows}</table>")
    if report.feature_drift:
        rows = "".join(
            f"<tr class='{'fail' if d.drifted else 'pass'}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in _drift_cells(d)) + "</tr>"
            for d in report.feature_drift
        )
        head = "".join(f"<th>{h}</th>" for h in DRIFT_HEADER)
        sections += f"<h3>drift per feature</h3><table><tr>{head}</tr>{rows}</table>"
    plots = "".join(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(title)}</figcaption></figure>" for title, data in images)
    unreadable = "".join(f"<li>{html.escape(u)}</li>" for u in report.unreadable)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitor report v{report.version}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.fail td{{background:#fdd}}tr.skipped td{{color:#888}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Monitor report: {report.outcome}</h1>
<p>Model version {report.version}; {report.requests} requests from {report.start:%Y-%m-%d %H:%M:%S} to {report.end:%Y-%m-%d %H:%M:%S} UTC.</p>
{sections}<h2>plots</h2>{plots or '<p>no traffic to plot</p>'}
{f'<h2>unreadable records: {len(report.unreadable)} skipped, left in place</h2><ul>{unreadable}</ul>' if unreadable else ''}
</body></html>"""


