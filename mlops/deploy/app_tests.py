"""Application tests: the served model over HTTP on its own test split, as a client would use it."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlops.checks import Report, classification, compare
from mlops.clients import auth_headers, in_threads, predict
from mlops.config import AppTests


@dataclass
class ApplicationResult:
    requests: int
    errors: int
    error_rate: float
    accuracy: float
    macro_precision: float
    macro_recall: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_rps: float
    statuses: dict[str, int]

    def metrics(self, prefix: str = "app_") -> dict[str, float]:
        keys = ("error_rate", "accuracy", "macro_precision", "macro_recall", "latency_p50_ms", "latency_p95_ms", "throughput_rps")
        return {prefix + key: float(getattr(self, key)) for key in keys}


def run_application_tests(
    url: str,
    files: list[tuple[Path, int]],
    classes: list[str],
    concurrency: int,
    token: str | None = None,
    verify: ssl.SSLContext | str | bool = True,
) -> ApplicationResult:
    """Send every image as a client would (raw bytes to POST /predict) and score the answers.

    `verify`: how an https server's certificate is checked (`LiveServer.verify`)."""
    headers = auth_headers(token)
    started = time.perf_counter()
    replies = in_threads(
        files, concurrency, 30.0, lambda client, _, item: predict(client, url, item[0].read_bytes(), headers), verify
    )
    elapsed = time.perf_counter() - started

    index = {name: i for i, name in enumerate(classes)}
    predicted = [index.get(r.prediction, -1) if r.status == 200 else -1 for r in replies]
    scores = classification([label for _, label in files], predicted, range(len(classes)), classes)
    latencies = [r.latency_ms for r in replies if r.status == 200] or [float("inf")]
    statuses: dict[str, int] = {}
    for reply in replies:
        statuses[str(reply.status)] = statuses.get(str(reply.status), 0) + 1
    errors = sum(1 for r in replies if r.status != 200)
    return ApplicationResult(
        requests=len(replies),
        errors=errors,
        error_rate=errors / max(len(replies), 1),
        accuracy=scores.accuracy,
        macro_precision=scores.macro_precision,
        macro_recall=scores.macro_recall,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        throughput_rps=len(replies) / elapsed,
        statuses=statuses,
    )


def application_gate(result: ApplicationResult, bounds: AppTests, max_p95_latency_ms: float) -> Report:
    """The application tests' verdict; the latency bound is the service level (`slo`)."""
    note = f"{result.requests} requests, statuses {result.statuses}"
    return Report({"application tests": [
        compare("app_accuracy", result.accuracy, ">=", bounds.min_accuracy, note),
        compare("app_macro_precision", result.macro_precision, ">=", bounds.min_macro_precision),
        compare("app_macro_recall", result.macro_recall, ">=", bounds.min_macro_recall),
        compare("app_p95_latency_ms", result.latency_p95_ms, "<=", max_p95_latency_ms, "HTTP, end to end (slo)"),
        compare("app_error_rate", result.error_rate, "<=", bounds.max_error_rate, f"statuses {result.statuses}"),
    ]}, title="Application tests")
