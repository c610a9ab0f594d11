"""What a flow run tells the person who started it, at its end: one markdown text for the console
and the run's Prefect artifact. Pure functions of what the run produced."""

from __future__ import annotations

from mlops.checks import Check, Report, fmt
from mlops.serve.capture import redact


def build_summary(
    *,
    model: str,
    data_version: str,
    counts: dict[str, dict[str, int]],
    quarantined: int,
    quarantine_dir: str,
    capped: int,
    max_per_class: int | None,
    production: dict | None,
    metrics: dict[str, float | None],
    report: Report,
    version: str | None,
    alias: str | None,
    tracking_uri: str,
    run_id: str,
    note: str | None = None,
) -> str:
    """The build's result: data, model version, test metrics, the gate per check, where to look."""
    splits = ", ".join(f"{split} {sum(c.values())}" for split, c in counts.items())
    lines = [f"## Build: {'registered ' + model + ' version ' + version if version else 'nothing registered'}", "",
             f"- data version `{data_version}`: {splits} images"]
    if quarantined:
        lines.append(f"- {quarantined} invalid images quarantined in {quarantine_dir} (report.json says why)")
    if capped:
        lines.append(f"- {capped} valid images left out by data.max_per_class={max_per_class}"
                     " (data.max_per_class=null keeps them all)")
    if production:
        added = sum(sum(c.values()) for c in production["counts"].values())
        lines.append(f"- {added} labelled production images added (window {production['window']}) on base data"
                     f" version `{production['base_version']}`")
    shown = ", ".join(f"{name.replace('_', ' ')} {fmt(value)}" for name, value in metrics.items() if value is not None)
    lines += [f"- test split: {shown}", "",
              f"**Gate: {'PASSED' if report.passed else 'FAILED'}**", "", "| section | check | value | bound | verdict |",
              "|---|---|---:|---|---|"]
    lines += [f"| {section} | {c.name} | {fmt(c.value)} | {f'{c.op} {fmt(c.bound)}' if c.bound is not None else c.note or '-'} | {c.verdict} |"
              for section, checks in report.sections.items() for c in checks]
    lines.append("")
    if version:
        lines.append(f"- alias `{alias}` -> version {version}")
    if note:
        lines.append(f"- {note}")
    lines.append(f"- look further: `mlflow ui --backend-store-uri {redact(tracking_uri)}`, run `{run_id}`")
    return "\n".join(lines) + "\n"


def deploy_summary(environment: str, action: str, version: str, url: str | None, *, previous: str | None = None,
                   figures: dict[str, float] | None = None, manifests: str | None = None, chained: str | None = None) -> str:
    """What is live where after a deploy run, with the application-test figures when it ran them."""
    if not version:
        return f"## Deploy {environment}: {action}, nothing was recorded as live\n"
    lines = [f"## Deploy {environment}: {action} version {version}", ""]
    if manifests:
        lines.append(f"- manifests in {manifests}: `kubectl apply -f {manifests}`")
    elif action == "stop":
        lines.append(f"- stopped the server of version {version} ({url})")
    else:
        lines.append(f"- live on {url}" if url else "- no server kept (deploy.keep_test_server=true keeps it)")
    if previous:
        lines.append(f"- replaced version {previous} (action=rollback puts it back)")
    if figures:
        lines.append("- application tests: " + ", ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in figures.items()))
    if chained:
        lines.append(f"- started flow run {chained}")
    return "\n".join(lines) + "\n"


def section_verdict(checks: list[Check]) -> str:
    """"FAIL: <the failed checks>", "pass" when some check passed, else "not judged"."""
    failed = [c.name for c in checks if c.passed is False]
    if failed:
        return "FAIL: " + ", ".join(failed)
    return "pass" if any(c.passed for c in checks) else "not judged"


def monitor_summary(environment: str, version: str, outcome: str, requests: int, verdicts: dict[str, str], report: str,
                    alerts: list[str], retrain: str | None) -> str:
    """The monitor's verdict per section, what it sent and started, and where the report is."""
    lines = [f"## Monitor {environment}: version {version}, {outcome} ({requests} requests)", "",
             "| section | verdict |", "|---|---|", *(f"| {s} | {v} |" for s, v in verdicts.items()), "",
             f"- alerts sent: {', '.join(alerts) or 'none'}"]
    if retrain:
        lines.append(f"- retraining: {retrain}")
    lines.append(f"- report: {report}")
    return "\n".join(lines) + "\n"
