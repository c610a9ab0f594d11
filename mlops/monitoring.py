"""Monitor: checks over a window of served traffic, the HTML report, alerts and the retrain cool-down.

Every check is an `evaluation.Check` (value, bound, verdict), grouped by section: integrity,
drift, performance, telemetry, bias. A check that cannot be judged (no labels, no reference)
is skipped with a note instead of giving a noisy verdict.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from mlops.config import MonitorConfig
from mlops.evaluation import Check, compare
from mlops.features import FEATURES
from mlops.profiling import OUTPUTS, FeatureDrift, Reference, check_constraints, drift_scores, profile_frame
from mlops.records import read_window

log = logging.getLogger(__name__)

def parse_duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if not match:
        raise ValueError(f"'{text}' is not a duration like 30m, 1h, 24h or 7d")
    value, unit = float(match[1]), match[2]
    return timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: value})


# -- the window ----------------------------------------------------------------------------


@dataclass
class Traffic:
    start: datetime
    end: datetime
    version: str
    served: pd.DataFrame  # answered requests: features, prediction, confidence, latency_ms, time
    rejected: pd.DataFrame  # rejected requests: error kind, content type
    labels: dict[str, str]  # request id -> true label (feedback)
    unreadable: list[str]

    @property
    def requests(self) -> int:
        return len(self.served) + len(self.rejected)


def load_traffic(records_dir: Path, version: str, start: datetime, end: datetime) -> Traffic:
    requests = read_window(records_dir, "requests", start, end)
    feedback = read_window(records_dir, "feedback", start - timedelta(days=7), end)
    frame = pd.DataFrame([r for r in requests.records if str(r.get("model_version")) == version])
    if frame.empty:
        frame = pd.DataFrame(columns=["status", "request_id", "time"])
    served = frame[frame["status"] == "ok"].reset_index(drop=True)
    rejected = frame[frame["status"] != "ok"].reset_index(drop=True)
    labels = {r["request_id"]: r["label"] for r in feedback.records if "request_id" in r and "label" in r}
    return Traffic(start, end, version, served, rejected, labels, requests.unreadable + feedback.unreadable)


# -- checks --------------------------------------------------------------------------------


def skipped(name: str, note: str) -> Check:
    return Check(name, None, None, "", None, note)


def integrity_checks(traffic: Traffic, config: MonitorConfig) -> list[Check]:
    """whylogs constraints from `monitor.integrity` over the window's requests."""
    rules, checks = config.integrity, []
    if len(traffic.served):
        columns = [c for c in (*FEATURES, *OUTPUTS) if c in traffic.served]
        results = check_constraints(traffic.served[columns], [
            ("is_in_range", ("width", rules.min_width, rules.max_width)),
            ("is_in_range", ("height", rules.min_height, rules.max_height)),
            *[("no_missing_values", (column,)) for column in columns],
        ])
        for result in [r for r in results if "is in range" in r.name]:
            low, high = result.summary.get("min"), result.summary.get("max")
            checks.append(Check(result.name.split()[0] + "_range", high, None, "in range", result.passed,
                                f"whylogs: {result.name}; min {low}, max {high}"))
        missing = [r for r in results if "has no missing values" in r.name]
        nulls = sum(r.summary.get("null", 0) + r.summary.get("nan", 0) for r in missing)
        failed = [r.name.split()[0] for r in missing if not r.passed]
        checks.append(Check("no_missing_values", float(nulls), 0.0, "<=", not failed,
                            f"whylogs: no missing values in {len(missing)} columns" + (f"; missing in {failed}" if failed else "")))
    allowed = tuple(rules.allowed_content_types)
    types = [*traffic.served.get("content_type", []), *traffic.rejected.get("content_type", [])]
    family = [next((a for a in allowed if str(t).split(";")[0].strip().startswith(a)), str(t)) for t in types]
    frame = pd.DataFrame({"content_type": family, "rejected": [0] * len(traffic.served) + [1] * len(traffic.rejected)})
    results = check_constraints(frame, [
        ("frequent_strings_in_reference_set", ("content_type", set(allowed))),
        ("mean_between_range", ("rejected", 0.0, rules.max_rejected_share)),
    ])
    content = next(r for r in results if r.name.startswith("content_type"))
    rejected = next(r for r in results if r.name.startswith("rejected"))
    foreign = sorted({f for f in family if f not in allowed})
    checks.append(Check("allowed_content_types", float(len(foreign)), 0.0, "<=", content.passed,
                        f"whylogs: {content.name}" + (f"; found {', '.join(foreign)}" if foreign else "")))
    kinds = traffic.rejected["error"].value_counts().to_dict() if len(traffic.rejected) else {}
    checks.append(Check("rejected_share", round(float(rejected.summary.get("mean", 0.0)), 6), rules.max_rejected_share,
                        "<=", rejected.passed, f"whylogs: {rejected.name}; {kinds}"))
    return checks


def drift_checks(traffic: Traffic, reference: Reference | None, config: MonitorConfig) -> tuple[list[Check], list[FeatureDrift]]:
    rules = config.drift
    if reference is None:
        return [skipped("drifted_share", "the version has no reference profile: drift not computed")], []
    if len(traffic.served) < rules.min_requests:
        return [skipped("drifted_share", f"{len(traffic.served)} answered requests, minimum {rules.min_requests}")], []
    columns = [c for c in (*FEATURES, *OUTPUTS) if c in traffic.served]
    current = profile_frame(traffic.served[columns].astype({c: float for c in columns if c != "prediction"}))
    algorithms = {
        column: (rules.features[column].algorithm, rules.features[column].threshold)
        if column in rules.features
        else (rules.default_algorithm, rules.default_threshold)
        for column in columns
    }
    scores = drift_scores(current, reference.profile, algorithms)
    share = sum(s.drifted for s in scores) / len(scores) if scores else 0.0
    drifted = [s.feature for s in scores if s.drifted]
    note = f"{len(drifted)}/{len(scores)} features drifted: {', '.join(drifted) or 'none'}"
    return [compare("drifted_share", share, "<=", rules.max_drift_share, note)], scores


def labelled(traffic: Traffic) -> pd.DataFrame:
    served = traffic.served
    if not len(served):
        return served
    mask = served["request_id"].isin(traffic.labels.keys())
    frame = served[mask].copy()
    frame["label"] = frame["request_id"].map(traffic.labels)
    return frame


def performance_checks(traffic: Traffic, classes: list[str], config: MonitorConfig) -> list[Check]:
    rules = config.performance
    frame = labelled(traffic)
    if len(frame) < rules.min_labels:
        note = f"not enough labels: {len(frame)} < {rules.min_labels}"
        return [skipped(name, note) for name in ("accuracy", "macro_precision", "macro_recall")]
    precision, recall, _, _ = precision_recall_fscore_support(
        frame["label"], frame["prediction"], labels=classes, zero_division=0
    )
    present = [i for i, c in enumerate(classes) if c in set(frame["label"])]
    note = f"{len(frame)} labelled requests"
    return [
        compare("accuracy", float((frame["label"] == frame["prediction"]).mean()), ">=", rules.min_accuracy, note),
        compare("macro_precision", float(precision[present].mean()), ">=", rules.min_macro_precision, note),
        compare("macro_recall", float(recall[present].mean()), ">=", rules.min_macro_recall, note),
    ]


def scrape(url: str) -> str | None:
    try:
        answer = httpx.get(url, timeout=5)
        return answer.text if answer.status_code == 200 else None
    except httpx.TransportError:
        return None


def telemetry_checks(traffic: Traffic, metrics_text: str | None, config: MonitorConfig) -> list[Check]:
    rules = config.telemetry
    minutes = max((traffic.end - traffic.start).total_seconds() / 60.0, 1e-9)
    checks = [compare("request_rate_per_min", traffic.requests / minutes, ">=", rules.min_request_rate_per_min)]
    if metrics_text is None:
        note = "server /metrics not reachable"
        return checks + [skipped("p95_latency_ms", note), skipped("error_rate", note)]
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    total = errors = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint", "")
            if not endpoint.startswith("/predict"):
                continue
            if sample.name == "mlops_request_latency_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == "mlops_requests_total":
                total += sample.value
                errors += sample.value if int(sample.labels["status"]) >= 400 else 0.0
    count = buckets.get(float("inf"), 0.0)
    if count == 0:
        return checks + [skipped("p95_latency_ms", "no requests since the server started"), skipped("error_rate", "no requests")]
    p95 = next(le for le, cumulative in sorted(buckets.items()) if cumulative >= 0.95 * count)
    note = "since the server started (Prometheus histogram bucket bound)"
    return checks + [
        compare("p95_latency_ms", p95 * 1000.0, "<=", rules.max_p95_latency_ms, note),
        compare("error_rate", errors / total if total else 0.0, "<=", rules.max_error_rate, "since the server started"),
    ]


def class_shares(predictions: pd.Series | list, classes: list[str]) -> dict[str, float]:
    series = pd.Series(list(predictions), dtype=object)
    counts = series.value_counts()
    total = max(len(series), 1)
    return {c: float(counts.get(c, 0)) / total for c in classes}


def bias_checks(traffic: Traffic, reference: Reference | None, classes: list[str], config: MonitorConfig) -> list[Check]:
    rules = config.bias
    checks = []
    frame = labelled(traffic)
    if len(frame) < config.performance.min_labels:
        checks.append(skipped("recall_gap", f"not enough labels: {len(frame)} < {config.performance.min_labels}"))
    else:
        _, recall, _, support = precision_recall_fscore_support(frame["label"], frame["prediction"], labels=classes, zero_division=0)
        recalls = {c: r for c, r, s in zip(classes, recall, support) if s > 0}
        best, worst = max(recalls, key=recalls.get), min(recalls, key=recalls.get)
        checks.append(compare("recall_gap", recalls[best] - recalls[worst], "<=", rules.max_recall_gap,
                             f"'{best}' {recalls[best]:.2f} - '{worst}' {recalls[worst]:.2f}"))
    if reference is None or not len(traffic.served):
        checks.append(skipped("prediction_shift", "no reference or no answered requests"))
    else:
        now = class_shares(traffic.served["prediction"], classes)
        then = class_shares(reference.values["prediction"], classes)
        shift = 0.5 * sum(abs(now[c] - then[c]) for c in classes)  # total variation distance
        moved = max(classes, key=lambda c: abs(now[c] - then[c]))
        checks.append(compare("prediction_shift", shift, "<=", rules.max_prediction_shift,
                             f"largest change '{moved}': {then[moved]:.2f} -> {now[moved]:.2f}"))
    return checks


@dataclass
class MonitorReport:
    version: str
    start: datetime
    end: datetime
    requests: int
    sections: dict[str, list[Check]] = field(default_factory=dict)
    feature_drift: list[FeatureDrift] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if self.requests == 0:
            return "no traffic"
        return "breach" if self.breaches else "healthy"

    @property
    def breaches(self) -> list[tuple[str, Check]]:
        return [(section, c) for section, checks in self.sections.items() for c in checks if c.passed is False]

    def to_dict(self) -> dict:
        return {
            "version": self.version, "start": self.start.isoformat(), "end": self.end.isoformat(),
            "requests": self.requests, "outcome": self.outcome, "unreadable": self.unreadable,
            "sections": {s: [c.__dict__ | {"verdict": c.verdict} for c in checks] for s, checks in self.sections.items()},
            "feature_drift": [d.__dict__ for d in self.feature_drift],
        }

    def to_markdown(self) -> str:
        head = (f"**Monitor: {self.outcome.upper()}** — version {self.version}, {self.requests} requests"
                f" from {self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC\n")
        if self.unreadable:
            head += f"\n{len(self.unreadable)} unreadable record lines or files skipped (left in place).\n"
        body = ""
        for section, checks in self.sections.items():
            rows = "\n".join(f"| {c.name} | {_fmt(c.value)} | {c.op} {_fmt(c.bound)} | {c.verdict} | {c.note} |" for c in checks)
            body += f"\n### {section}\n\n| check | value | bound | verdict | note |\n|---|---|---|---|---|\n{rows}\n"
        if self.feature_drift:
            rows = "\n".join("| " + " | ".join(_drift_cells(d)) + " |" for d in self.feature_drift)
            body += f"\n### drift per feature\n\n| feature | algorithm | score | threshold | drift |\n|---|---|---|---|---|\n{rows}\n"
        return head + body


def _drift_cells(d: FeatureDrift) -> list[str]:
    bound = f"{'>' if d.algorithm == 'hellinger' else '<'} {d.threshold:g}"
    return [d.feature, d.algorithm, f"{d.score:.4g}", bound, "DRIFT" if d.drifted else "no"]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# -- the HTML report -----------------------------------------------------------------------


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


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
    if len(traffic.served):
        frame = traffic.served.assign(time=pd.to_datetime(traffic.served["time"], format="ISO8601")).set_index("time").sort_index()
        span = (traffic.end - traffic.start).total_seconds()
        rule = "1min" if span <= 3 * 3600 else "15min" if span <= 2 * 86400 else "1h"
        grouped = frame.resample(rule)
        fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
        grouped.size().plot(ax=axes[0], title=f"requests per {rule}")
        grouped["latency_ms"].median().plot(ax=axes[1], title="median latency (ms)")
        grouped["confidence"].mean().plot(ax=axes[2], title="mean confidence")
        images.append(("over the window", _png(fig)))

    sections = ""
    for section, checks in report.sections.items():
        rows = "".join(
            f"<tr class='{c.verdict.lower()}'><td>{html.escape(c.name)}</td><td>{_fmt(c.value)}</td>"
            f"<td>{html.escape(c.op)} {_fmt(c.bound)}</td><td>{c.verdict}</td><td>{html.escape(c.note)}</td></tr>"
            for c in checks
        )
        sections += f"<h2>{section}</h2><table><tr><th>check</th><th>value</th><th>bound</th><th>verdict</th><th>note</th></tr>{rows}</table>"
        if section == "drift" and report.feature_drift:
            rows = "".join(
                f"<tr class='{'fail' if d.drifted else 'pass'}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in _drift_cells(d)) + "</tr>"
                for d in report.feature_drift
            )
            sections += f"<h3>per feature</h3><table><tr><th>feature</th><th>algorithm</th><th>score</th><th>drift if</th><th>drift</th></tr>{rows}</table>"
    plots = "".join(f"<figure><img src='data:image/png;base64,{data}'><figcaption>{html.escape(title)}</figcaption></figure>" for title, data in images)
    unreadable = "".join(f"<li>{html.escape(u)}</li>" for u in report.unreadable)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Monitor report v{report.version}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
tr.fail td{{background:#fdd}}tr.skipped td{{color:#888}}figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>Monitor report: {report.outcome}</h1>
<p>Model version {report.version}; {report.requests} requests from {report.start:%Y-%m-%d %H:%M:%S} to {report.end:%Y-%m-%d %H:%M:%S} UTC.</p>
{sections}<h2>plots</h2>{plots or '<p>no traffic to plot</p>'}
{f'<h2>unreadable records (skipped, left in place)</h2><ul>{unreadable}</ul>' if unreadable else ''}
</body></html>"""


# -- alerts and the retrain cool-down ------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    section: str
    check: str
    value: float | None
    bound: float | None
    op: str
    version: str
    report: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.check}@v{self.version}"

    def text(self) -> str:
        return (f"[mlops] {self.section}/{self.check} = {_fmt(self.value)}, bound {self.op} {_fmt(self.bound)}"
                f" (model version {self.version}); report: {self.report}")


def load_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(path)


def due(state: dict, key: str, period: timedelta, now: datetime) -> bool:
    last = state.get(key)
    return last is None or now - datetime.fromisoformat(last) >= period


def send_alerts(alerts: list[Alert], sinks: dict[str, str | None], state_path: Path, quiet: timedelta, now: datetime) -> list[Alert]:
    """Send each alert not sent within the quiet period to every sink; returns what was sent.

    `sinks` maps sink name (log, webhook, slack) to its URL (None for log). A sink that fails is
    logged and does not stop the others.
    """
    state = load_state(state_path)
    fresh = [a for a in alerts if due(state, a.key, quiet, now)]
    if not fresh:
        return []
    for name, url in sinks.items():
        try:
            if name == "log":
                for alert in fresh:
                    log.warning("ALERT %s", alert.text())
            elif name == "webhook":
                httpx.post(url, json={"alerts": [a.__dict__ | {"text": a.text()} for a in fresh]}, timeout=10).raise_for_status()
            elif name == "slack":
                httpx.post(url, json={"text": "\n".join(a.text() for a in fresh)}, timeout=10).raise_for_status()
        except httpx.HTTPError as error:
            log.error("alert sink %s (%s) failed: %s", name, url, error)
    for alert in fresh:
        state[alert.key] = now.isoformat()
    save_state(state_path, state)
    return fresh
