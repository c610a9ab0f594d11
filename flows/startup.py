"""What `python -m flows.<name>` does before the flow module's imports (torch, MLflow, Prefect:
seconds): answer Hydra's `--help`, `--cfg` and `--info` by Hydra alone, report to the project's
Prefect server when `deployments/stack.sh start` runs one, and otherwise start Prefect's
temporary API server while the imports load; at exit, skip Python's last garbage collection.
Only for that command line: importing a flow from Python, a test or a Prefect worker is left as
it is."""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RUNS_A_FLOW = {"build", "deploy", "monitor", "traffic", "demo"}  # `flows.label` runs none
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--shell-completion", "-sc"}


def command_line_flow(orig_argv: list[str]) -> str | None:
    """`build` for `python -m flows.build ...`, None for any other command."""
    for i, arg in enumerate(orig_argv[:-1]):
        if arg == "-m":
            module = orig_argv[i + 1]
            return module.removeprefix("flows.") if module.startswith("flows.") else None
    return None


def stack_api_url(workspace: Path) -> str | None:
    """The API of the Prefect server `deployments/stack.sh start` runs for `workspace`, if it runs."""
    stack = workspace / "stack"
    try:
        pid = int((stack / "prefect-server.pid").read_text().strip())
        url = (stack / "prefect-api-url").read_text().strip()
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return url or None


def workspace_of(args: list[str], environ: dict[str, str]) -> Path:
    """The workspace a command line's flow will use: `paths.workspace=`, else as conf/base.yaml says."""
    for arg in args:
        if arg.startswith("paths.workspace="):
            return Path(arg.partition("=")[2]).expanduser()
    return Path(environ.get("MLOPS_WORKSPACE") or "workspace").expanduser()


def use_stack_server(args: list[str], environ: dict[str, str]) -> str | None:
    """Point Prefect at the stack's server (PREFECT_API_URL) unless the user chose an API already."""
    if environ.get("PREFECT_API_URL"):
        return None
    url = stack_api_url(workspace_of(args, environ))
    if url:
        environ["PREFECT_API_URL"] = url
        print(f"reporting to the project's Prefect server {url} (deployments/stack.sh start);"
              " PREFECT_API_URL chooses another", file=sys.stderr)
    return url


def answer_without_running(config_name: str) -> None:
    """Hydra's help, config or info output for `config_name` (its overrides checked as a run's
    are), then exit."""
    import hydra

    from flows.config import ConfigError, check_overrides

    try:
        check_overrides(config_name, [arg for arg in sys.argv[1:] if not arg.startswith("-")])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.argv.append(f"hydra.job.name={config_name}")  # Hydra would name the app after this module

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base=None)
    def show(cfg) -> None:  # never called for an information flag
        raise SystemExit(f"error: {sys.argv[1:]} ran a job")

    show()
    sys.exit(0)


_temporary_api: threading.Thread | None = None


def start_temporary_api() -> None:
    """Start the temporary API server that Prefect starts at a process's first flow call when no
    API is configured (a uvicorn process: seconds), in a thread, so that it comes up while the
    flow module imports torch, Lightning and MLflow. `api_ready` waits for it. The server's module
    (2.5 s) is imported here, before those imports: imported in the thread beside them, it
    started the server process 3.3 s into a build's command instead of 2.2 s."""
    global _temporary_api
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    import prefect.main  # noqa: F401  Prefect's logging set up, as `from prefect import flow` does: its start is logged
    from prefect.server.api.server import SubprocessASGIServer

    def start_server() -> None:
        try:
            SubprocessASGIServer().start()  # the one Prefect's client finds (one per process)
        except Exception:  # noqa: BLE001  the first flow call starts it again and reports why not
            pass

    _temporary_api = threading.Thread(target=start_server, name="prefect-temporary-api", daemon=True)
    _temporary_api.start()


def api_ready() -> None:
    """Wait for the server `start_temporary_api` is starting (at once when none is): a flow call
    before it answers would find it marked running and fail to connect."""
    if _temporary_api is not None:
        _temporary_api.join()


def skip_the_last_collection() -> None:
    """At the command's exit, freeze every object instead of letting Python's last garbage
    collection walk all that torch, Lightning, MLflow and Prefect made: 2.8 s after a build, for a
    process that is ending. Registered before anything else, so it runs last (exit handlers run
    last-registered first): Prefect has stopped its temporary server and logging has flushed by then."""
    atexit.register(gc.freeze)


def start() -> None:
    name = command_line_flow(getattr(sys, "orig_argv", []))
    if name is None:
        return
    args = sys.orig_argv[sys.orig_argv.index("-m") + 2:]
    if INFO_FLAGS.intersection(args) and (CONF_DIR / f"{name}.yaml").is_file():
        sys.argv = [f"flows.{name}", *args]
        answer_without_running(name)
    skip_the_last_collection()
    use_stack_server(args, os.environ)
    if name in RUNS_A_FLOW and not os.environ.get("PREFECT_API_URL"):
        start_temporary_api()
