"""Retake docs/images/approval-form.png: the Prefect UI's approval form of a paused release.

Needs Debian's chromium (`apt-get install chromium`) and playwright (`pip install playwright`,
no browser download: it drives /usr/bin/chromium), a Prefect server, and a release paused for
approval, e.g. from the project root:

    export PREFECT_HOME=/tmp/shot/prefect PREFECT_API_URL=http://127.0.0.1:4300/api WS=/tmp/shot/ws
    prefect server start --host 127.0.0.1 --port 4300 &
    python -m flows.build env=test paths.workspace=$WS && python -m flows.deploy env=test paths.workspace=$WS
    MLFLOW_TRACKING_URI=sqlite:///$WS/mlflow.db DVC_REMOTE_URL=$WS/dvc-remote MLOPS_WORKSPACE=$WS \\
        MLOPS_API_TOKEN=change-me python -m flows.deploy env=production &
    python docs/images/approval_form.py [--submit]

It opens the newest paused flow run, fills in the form and takes the picture; `--submit` then
approves for real, and the paused release goes on.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

API = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4300/api")
OUT = Path(__file__).with_name("approval-form.png")


def newest_paused_run(timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = httpx.post(f"{API}/flow_runs/filter", json={
            "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1}).json()
        if runs:
            return runs[0]["id"]
        time.sleep(1)
    sys.exit(f"no paused flow run on {API}")


def main() -> None:
    run = newest_paused_run()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(API.removesuffix("/api") + f"/runs/flow-run/{run}")
        page.get_by_role("button", name="Resume").first.click()
        page.wait_for_timeout(2500)
        page.locator("[role=dialog] .p-toggle__control").first.click()
        boxes = page.locator("[role=dialog] textarea")
        boxes.nth(0).fill("Ana Reviewer")
        boxes.nth(1).fill("Accuracy and latency as in the build; checked the sevens by hand.")
        page.screenshot(path=str(OUT))
        if "--submit" in sys.argv:
            page.get_by_role("button", name="Submit").click()
            page.wait_for_timeout(3000)
        browser.close()
    print(f"{OUT} (flow run {run})")


if __name__ == "__main__":
    main()
