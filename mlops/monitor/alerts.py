"""Alerts: which breaches alert, where they go, and the quiet period that keeps an ongoing
breach from being resent. `alerts_for`, `resolve_sinks` and `due_alerts` are pure rules;
`deliver` does the sending.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import httpx

from mlops.checks import Check, fmt
from mlops.config.monitor import AlertPolicy

log = logging.getLogger(__name__)


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
        return (f"[mlops] {self.section}/{self.check} = {fmt(self.value)}, bound {self.op} {fmt(self.bound)}"
                f" (model version {self.version}); report: {self.report}")


def alerts_for(breaches: list[tuple[str, Check]], sections: list[str], version: str, report: str) -> list[Alert]:
    """One alert per breached check in the alerting `sections`."""
    return [Alert(s, c.name, c.value, c.bound, c.op, version, report) for s, c in breaches if s in sections]


def waiting_for_labels(labelled: int, min_labelled: int, version: str, report: str) -> Alert:
    """Retraining is due but waits: too few labelled production images to train on."""
    return Alert("retrain", "labelled_production_images", labelled, min_labelled, ">=", version, report)


def resolve_sinks(policy: AlertPolicy, environ: Mapping[str, str]) -> tuple[dict[str, str | None], list[str]]:
    """sink name -> URL (None for `log`) of every configured sink, and a problem line for each
    sink whose variable is unset (that sink is left out, the others still get the alerts)."""
    sinks: dict[str, str | None] = {}
    problems = []
    for sink in policy.sinks:
        variable = {"webhook": policy.webhook_url_env, "slack": policy.slack_url_env}.get(sink)
        if sink == "prefect":  # one sink per notification block; the flow loads it by name
            sinks |= {f"prefect:{block}": block for block in policy.prefect_blocks}
        elif variable is None:
            sinks[sink] = None
        elif environ.get(variable):
            sinks[sink] = environ[variable]
        else:
            problems.append(f"alert sink {sink}: environment variable {variable} is not set; skipped")
    return sinks, problems


def due_alerts(alerts: list[Alert], sent: Mapping[str, str], quiet: timedelta, now: datetime) -> list[Alert]:
    """The alerts not sent within the quiet period (`sent`: alert key -> ISO time last sent)."""
    return [a for a in alerts if a.key not in sent or now - datetime.fromisoformat(sent[a.key]) >= quiet]


def message(alerts: list[Alert]) -> tuple[str, str]:
    """(subject, body) of one notification carrying `alerts` (a Prefect notification block's)."""
    versions = ", ".join(sorted({a.version for a in alerts}))
    subject = f"[mlops] {len(alerts)} alert(s) on model version {versions}"
    return subject, "\n".join(a.text() for a in alerts)


def deliver(alerts: list[Alert], sink: str, url: str | None) -> None:
    """Send `alerts` to one sink; raises httpx.HTTPError when the sink refuses or is unreachable."""
    if sink == "log":
        for alert in alerts:
            log.warning("ALERT %s", alert.text())
    elif sink == "webhook":
        httpx.post(url, json={"alerts": [asdict(a) | {"text": a.text()} for a in alerts]}, timeout=10).raise_for_status()
    elif sink == "slack":
        httpx.post(url, json={"text": "\n".join(a.text() for a in alerts)}, timeout=10).raise_for_status()
    else:
        raise ValueError(f"unknown alert sink '{sink}'")
