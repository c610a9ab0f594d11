"""What capturing inputs costs the model server: throughput with capture off, at its default rate and at 100%.

    python bench/capture.py [--requests 4000] [--clients 16] [--rounds 2]

One run builds a model (the build flow, env=test, 1 epoch, in a temporary workspace) and starts
`python -m mlops.serve` on it three times, with the default settings of `conf/serve/default.yaml`
except `serve.capture`: off (`enabled: false`), at the default `sample_rate` and at 1.0, each
capturing to its own folder of the workspace. The same load (`--requests` single-image requests,
the digits test PNGs, from `--clients` threads with one `httpx.Client` each) goes to each server
in turn, `--rounds` times (off, default, all, off, ...), so that a slower moment of the machine
is shared out. Reported per server: requests per second (the mean over the rounds) and as a
ratio to capture off, the latency percentiles of all its requests, the capture outcomes from
/metrics and what `read_captures` finds in the folder afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from hardening import built, load  # noqa: E402
from serving import ALIAS, MODEL, free_port, start_server, stop_server, wait_ready  # noqa: E402
from table import print_table  # noqa: E402

from mlops.config.serve import default_serve_config  # noqa: E402
from mlops.serve.capture import read_captures  # noqa: E402


def captures_metric(url: str) -> dict[str, int]:
    found = {}
    for line in httpx.get(url + "/metrics", trust_env=False).text.splitlines():
        if line.startswith("mlops_captures_total{"):
            found[line.split('outcome="')[1].split('"')[0]] = int(float(line.split()[-1]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="requests per load")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="loads per server, taken in turn")
    args = parser.parse_args()
    if not 1 <= args.requests <= 50_000 or not 1 <= args.clients <= 128 or not 1 <= args.rounds <= 10:
        parser.error("--requests must be in [1, 50000], --clients in [1, 128] and --rounds in [1, 10]")

    workspace, tracking_uri, pngs = built("bench-capture-")
    defaults = default_serve_config()
    rate = defaults.capture.sample_rate
    variants = {"capture off": (False, 0.0), f"default ({rate:g})": (True, rate), "all (1.0)": (True, 1.0)}
    servers = {}
    try:
        for name, (enabled, sample_rate) in variants.items():
            port = free_port()
            store = workspace / "captures" / name.split()[0]
            capture = defaults.capture.model_copy(update={"enabled": enabled, "sample_rate": sample_rate, "url": str(store)})
            settings = defaults.model_copy(update={"port": port, "capture": capture})
            command = [
                sys.executable, "-m", "mlops.serve", "--tracking-uri", tracking_uri, "--model", MODEL, "--alias", ALIAS,
                "--settings", settings.model_dump_json(), "--cache-dir", str(workspace / "serving-cache"),
            ]
            log = workspace / f"server-{port}.log"
            servers[name] = (start_server(command, os.environ.copy(), log), f"http://127.0.0.1:{port}", store)
            wait_ready(servers[name][0], servers[name][1] + "/ready", log)

        results: dict[str, list[dict]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, (server, url, _) in servers.items():
                print(f"round {round_ + 1}, {name}: {args.requests} requests from {args.clients} clients ...", flush=True)
                results[name].append(load(url, server.pid, pngs, args.requests, args.clients))
        time.sleep(2)  # the writers catch up
        outcomes = {name: captures_metric(url) for name, (_, url, _) in servers.items()}
    finally:
        for server, _, _ in servers.values():
            stop_server(server)

    base = np.mean([r["per_s"] for r in results["capture off"]])
    rows = []
    for name, runs in results.items():
        per_s = np.mean([r["per_s"] for r in runs])
        errors = sum(r["errors"] for r in runs)
        store = servers[name][2]
        found = read_captures(str(store)) if store.exists() else None
        counts = outcomes[name]
        rows.append([
            name, f"{sum(r['requests'] for r in runs):,}", errors, f"{per_s:,.0f}", f"{per_s / base:.2f}x",
            f"{np.mean([r['p50'] for r in runs]):.1f}", f"{np.mean([r['p95'] for r in runs]):.1f}",
            ", ".join(f"{k} {v:,}" for k, v in counts.items() if v) or "-",
            f"{len(found):,}" if found is not None else "-",
        ])
    print(f"\n{os.cpu_count()} CPU cores; {len(pngs)} PNGs of {np.mean([len(p) for p in pngs]):,.0f} bytes on average; "
          f"latency in ms (the mean over {args.rounds} round(s))\n")
    print_table(["server", "requests", "errors", "req/s", "vs off", "p50", "p95", "captures (/metrics)", "in the store"], rows)
    shutil.rmtree(workspace)  # kept, with the servers' logs, when anything above failed


if __name__ == "__main__":
    main()
