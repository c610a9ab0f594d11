"""The Prefect flows. `python -m flows.<name> --help` is answered before a flow's heavy imports,
and a command line run reports to the project's Prefect server when one runs (flows.startup)."""

from flows.startup import start

start()
