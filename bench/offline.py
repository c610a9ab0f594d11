"""Imported first by every benchmark that runs a flow or a Prefect server: Prefect's telemetry
(its server's and its SDK's) stays off, so that a benchmark's only traffic goes to 127.0.0.1."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
