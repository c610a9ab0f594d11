"""The monitor's checks over a window, one function per section: integrity, drift, performance,
telemetry and bias. Every check is a `mlops.checks.Check`; a check that cannot be judged (no
labels, no reference) is skipped with a note instead of giving a noisy verdict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlops.checks import Check, classification, compare, recall_gap_check, skipped
from mlops.config import MonitorSettings
from mlops.monitor.estimate import Estimate, calibrated, estimate_accuracy
from mlops.monitor.profiling import OUTPUTS, FeatureDrift, Reference, check_constraints, drift_scores, profile_frame
from mlops.monitor.shift import bbsd_test, embedding_test
from mlops.serve.inference import softmax
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


def vectors(served: pd.DataFrame, column: str) -> np.ndarray:
    """The rows of a list-valued record column (`logits`, `embedding`) that have it."""
    if column not in served:
        return np.zeros((0, 0))
    rows = [row for row in served[column] if isinstance(row, list)]
    return np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, 0))


def distinct(rows: np.ndarray) -> tuple[np.ndarray, str]:
    """`rows` with repeats counted once, and a note saying how many were dropped.

    A two-sample test assumes independent draws; the same image sent again (a retry, a client
    replaying a folder) is not a new draw, and repeats alone would make the tests flag drift.
    """
    unique = np.unique(rows, axis=0) if len(rows) else rows
    repeats = len(rows) - len(unique)
    return unique, f"; {repeats} repeated requests counted once" if repeats else ""


def drift_checks(traffic: Traffic, reference: Reference | None, classes: list[str],
                 config: MonitorSettings) -> tuple[list[Check], list[FeatureDrift]]:
    """Image statistics (whylogs), the predicted class (chi-square), the softmax vector (BBSD)
    and the embedding (MMD or a domain classifier), each against the version's reference."""
    rules = config.drift
    names = ("drifted_share", "prediction_drift", "output_drift", "embedding_drift")
    if reference is None:
        return [skipped(name, "the version has no reference profile: drift not computed") for name in names], []
    if len(traffic.served) < rules.min_requests:
        note = f"{len(traffic.served)} answered requests, minimum {rules.min_requests}"
        return [skipped(name, note) for name in names], []
    columns = [c for c in (*FEATURES, "prediction") if c in traffic.served]
    current = profile_frame(traffic.served[columns].astype({c: float for c in columns if c != "prediction"}))
    algorithms = {
        column: (rules.features[column].algorithm, rules.features[column].threshold)
        if column in rules.features
        else (rules.default_algorithm, rules.default_threshold)
        for column in columns
    }
    scores = drift_scores(current, reference.profile, algorithms)
    pixels = [s for s in scores if s.feature != "prediction"]
    share = sum(s.drifted for s in pixels) / len(pixels) if pixels else 0.0
    drifted = [s.feature for s in pixels if s.drifted]
    note = f"{len(drifted)}/{len(pixels)} image statistics drifted: {', '.join(drifted) or 'none'}"
    checks = [compare("drifted_share", share, "<=", rules.max_drift_share, note)]
    prediction = next((s for s in scores if s.feature == "prediction"), None)
    if prediction is None:
        checks.append(skipped("prediction_drift", "no predictions in the window or the reference"))
    else:
        checks.append(compare("prediction_drift", prediction.score, ">=", prediction.threshold, "chi-square p-value of the predicted class"))
    checks.append(output_drift(traffic, reference, classes, rules))
    checks.append(embedding_drift(traffic, reference, rules))
    return checks, scores


def output_drift(traffic: Traffic, reference: Reference, classes: list[str], rules) -> Check:
    current, repeats = distinct(vectors(traffic.served, "logits"))
    if reference.logits is None:
        return skipped("output_drift", "the reference has no softmax outputs (built before they were kept)")
    if len(current) < rules.min_requests or current.shape[1] != len(classes):
        return skipped("output_drift", f"{len(current)} distinct requests recorded their logits, minimum {rules.min_requests}")
    test = bbsd_test(softmax(reference.logits.astype(np.float64)), softmax(current), classes, rules.outputs.alpha)
    return compare("output_drift", test.p_value, ">=", rules.outputs.alpha, f"BBSD p-value: {test.detail}{repeats}")


def embedding_drift(traffic: Traffic, reference: Reference, rules) -> Check:
    current, repeats = distinct(vectors(traffic.served, "embedding"))
    if reference.embedding is None:
        return skipped("embedding_drift", "the version has no reference embeddings (exported before embeddings)")
    if len(current) < rules.min_requests:
        return skipped("embedding_drift", f"{len(current)} distinct requests recorded an embedding, minimum {rules.min_requests}")
    settings = rules.embedding
    test = embedding_test(settings.method, reference.embedding, current, settings.alpha, settings.permutations)
    return compare("embedding_drift", test.p_value, ">=", settings.alpha, f"{settings.method} p-value: {test.detail}{repeats}")


def estimated_accuracy(traffic: Traffic, reference: Reference | None) -> Estimate | None:
    """CBPE over the window's recorded logits, calibrated with the reference's temperature."""
    current = vectors(traffic.served, "logits")
    if reference is None or reference.temperature is None or not len(current):
        return None
    return estimate_accuracy(calibrated(current, reference.temperature))


def labelled(traffic: Traffic) -> pd.DataFrame:
    served = traffic.served
    if not len(served):
        return served
    mask = served["request_id"].isin(traffic.labels.keys())
    frame = served[mask].copy()
    frame["label"] = frame["request_id"].map(traffic.labels)
    return frame


def performance_checks(traffic: Traffic, reference: Reference | None, classes: list[str], config: MonitorSettings) -> list[Check]:
    """Accuracy and macro precision/recall from feedback labels; estimated accuracy (CBPE)
    from the calibrated confidences, before any label arrives."""
    rules = config.performance
    frame = labelled(traffic)
    if len(frame) < rules.min_labels:
        note = f"not enough labels: {len(frame)} < {rules.min_labels}"
        checks = [skipped(name, note) for name in ("accuracy", "macro_precision", "macro_recall")]
    else:
        scores = classification(frame["label"], frame["prediction"], classes, present_only=True)
        note = f"{len(frame)} labelled requests"
        checks = [
            compare("accuracy", scores.accuracy, ">=", rules.min_accuracy, note),
            compare("macro_precision", scores.macro_precision, ">=", rules.min_macro_precision, note),
            compare("macro_recall", scores.macro_recall, ">=", rules.min_macro_recall, note),
        ]
    if not rules.estimate:
        return checks
    estimate = estimated_accuracy(traffic, reference)
    if estimate is None:
        checks.append(skipped("estimated_accuracy", "no calibration in the reference or no recorded softmax vectors"))
    elif estimate.n < config.drift.min_requests:
        checks.append(skipped("estimated_accuracy", f"{estimate.n} requests, minimum {config.drift.min_requests}"))
    else:
        checks.append(compare("estimated_accuracy", estimate.accuracy, ">=", rules.min_accuracy,
                              f"CBPE, 95% interval {estimate.low:.3f}-{estimate.high:.3f} over {estimate.n} requests"
                              f" (temperature {reference.temperature:.3g})"))
    return checks


def telemetry_checks(traffic: Traffic, config: MonitorSettings, max_p95_latency_ms: float) -> list[Check]:
    """Request rate, p50/p95 latency (against the service level) and error rate over the window
    itself, from the request records (the server's /metrics counters run since it started)."""
    rules = config.telemetry
    minutes = max((traffic.end - traffic.start).total_seconds() / 60.0, 1e-9)
    checks = [compare("request_rate_per_min", traffic.requests / minutes, ">=", rules.min_request_rate_per_min)]
    latency = traffic.served["latency_ms"].astype(float) if "latency_ms" in traffic.served else pd.Series(dtype=float)
    if not len(latency):
        checks.append(skipped("p95_latency_ms", "no answered requests in the window"))
    else:
        p50, p95 = np.percentile(latency, [50, 95])
        checks.append(compare("p95_latency_ms", p95, "<=", max_p95_latency_ms,
                              f"p50 {p50:.1f} ms; {len(latency)} answered requests (slo)"))
    failed = len(traffic.failed) + len(traffic.rejected)
    checks.append(compare("error_rate", failed / traffic.requests if traffic.requests else 0.0, "<=", rules.max_error_rate,
                          f"{len(traffic.rejected)} rejected, {len(traffic.failed)} failed of {traffic.requests} requests"))
    return checks


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
        checks.append(recall_gap_check(scores.per_class, rules.max_recall_gap, rules.class_recall_confidence))
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
