"""Links between flows: start a Prefect deployment's run without waiting for it."""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

log = logging.getLogger("prefect.flows.chain")


def deployment_exists(name: str) -> bool:
    """Whether the Prefect API knows deployment `name` ("flow/deployment")."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def start_deployment(name: str, parameters: dict | None = None) -> str | None:
    """Start a run of deployment `name` ("flow/deployment"); None when no such deployment exists.

    The run gets the deployment's own parameters, merged with `parameters`.
    """
    try:
        run = run_deployment(name=name, parameters=parameters or {}, timeout=0)
    except ObjectNotFound:
        log.warning("no Prefect deployment %s: nothing started", name)
        return None
    log.info("started flow run %s of deployment %s", run.id, name)
    return str(run.id)
