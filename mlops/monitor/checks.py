"""The monitor's checks over a window, one function per section: integrity, drift, performance,
telemetry and bias. Every check is a `mlops.checks.Check`; a check that cannot be judged (no
labels, no reference) is skipped with a note instead of giving a noisy verdict.
"""

from __future__ import annotations

import pandas as pd

from mlops.checks import Check, classification, compare, recall_gap_check, skipped
from mlops.config import MonitorSettings
from mlops.monitor.profiling import OUTPUTS, FeatureDrift, Reference, check_constraints, drift_scores, profile_frame
from mlops.monitor.window import Traffic
from mlops.serve.features import FEATURES


def integrity_checks(traffic: Traffic, config: MonitorSettings) -> list[Check]:
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


def drift_checks(traffic: Traffic, reference: Reference | None, config: MonitorSettings) -> tuple[list[Check], list[FeatureDrift]]:
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


def performance_checks(traffic: Traffic, classes: list[str], config: MonitorSettings) -> list[Check]:
    rules = config.performance
    frame = labelled(traffic)
    if len(frame) < rules.min_labels:
        note = f"not enough labels: {len(frame)} < {rules.min_labels}"
        return [skipped(name, note) for name in ("accuracy", "macro_precision", "macro_recall")]
    scores = classification(frame["label"], frame["prediction"], classes, present_only=True)
    note = f"{len(frame)} labelled requests"
    return [
        compare("accuracy", scores.accuracy, ">=", rules.min_accuracy, note),
        compare("macro_precision", scores.macro_precision, ">=", rules.min_macro_precision, note),
        compare("macro_recall", scores.macro_recall, ">=", rules.min_macro_recall, note),
    ]


def telemetry_checks(traffic: Traffic, metrics_text: str | None, config: MonitorSettings, max_p95_latency_ms: float) -> list[Check]:
    """Request rate over the window; p95 latency (against the service level) and error rate
    from the server's Prometheus counters."""
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
        compare("p95_latency_ms", p95 * 1000.0, "<=", max_p95_latency_ms, note + " (slo)"),
        compare("error_rate", errors / total if total else 0.0, "<=", rules.max_error_rate, "since the server started"),
    ]


def class_shares(predictions: pd.Series | list, classes: list[str]) -> dict[str, float]:
    series = pd.Series(list(predictions), dtype=object)
    counts = series.value_counts()
    total = max(len(series), 1)
    return {c: float(counts.get(c, 0)) / total for c in classes}


def bias_checks(traffic: Traffic, reference: Reference | None, classes: list[str], config: MonitorSettings) -> list[Check]:
    rules = config.bias
    checks = []
    frame = labelled(traffic)
    if len(frame) < config.performance.min_labels:
        checks.append(skipped("recall_gap", f"not enough labels: {len(frame)} < {config.performance.min_labels}"))
    else:
        scores = classification(frame["label"], frame["prediction"], classes)
        checks.append(recall_gap_check(scores.per_class, rules.max_recall_gap))
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
