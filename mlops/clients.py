"""Clients of a model server: many requests from a few threads, one HTTP connection each.

The application tests and the traffic replay tool both send images this way; a failure is an
answer with a status (0: no HTTP answer, -1: a 200 that is not a prediction), never an exception.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx

T = TypeVar("T")
R = TypeVar("R")


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


@dataclass(frozen=True)
class Reply:
    status: int  # HTTP status; 0: no answer; -1: a 200 whose body is not a prediction
    latency_ms: float
    request_id: str | None = None
    prediction: str | None = None


def predict(client: httpx.Client, url: str, body: bytes, headers: dict[str, str], content_type: str = "image/png") -> Reply:
    """POST one raw image to `{url}/predict`."""
    start = time.perf_counter()
    try:
        answer = client.post(url + "/predict", content=body, headers=headers | {"content-type": content_type})
    except httpx.HTTPError:
        return Reply(0, (time.perf_counter() - start) * 1000.0)
    latency = (time.perf_counter() - start) * 1000.0
    if answer.status_code != 200:
        return Reply(answer.status_code, latency)
    try:
        payload = answer.json()
        return Reply(200, latency, str(payload["request_id"]), str(payload["prediction"]))
    except (ValueError, KeyError, TypeError):
        return Reply(-1, latency)


def in_threads(
    jobs: Sequence[T],
    concurrency: int,
    timeout_s: float,
    work: Callable[[httpx.Client, int, T], R],
    verify: ssl.SSLContext | str | bool = True,
) -> list[R]:
    """work(client, index, job) for every job, from `concurrency` threads with one client each.

    `verify`: how an https server's certificate is checked (httpx's argument: a context such as
    `LiveServer.verify`, a CA bundle file, or True for the system's CAs)."""
    results: list = [None] * len(jobs)
    lock, position = threading.Lock(), iter(range(len(jobs)))

    def worker() -> None:
        with httpx.Client(timeout=timeout_s, verify=verify) as client:
            while True:
                with lock:
                    index = next(position, None)
                if index is None:
                    return
                results[index] = work(client, index, jobs[index])

    threads = max(1, min(concurrency, len(jobs)))
    with ThreadPoolExecutor(threads, thread_name_prefix="client") as pool:
        for future in [pool.submit(worker) for _ in range(threads)]:
            future.result()  # a bug in a worker surfaces here
    return results
