#!/usr/bin/env bash
# The local stack on 127.0.0.1: Prefect server, MLflow tracking server, the Prefect deployments
# of prefect.yaml (work pools mlops-process and mlops-k8s) and a process worker that runs them.
#
#   deployments/stack.sh start     # start what is not running, then deploy
#   deployments/stack.sh status    # which parts run (exit 0 either way)
#   deployments/stack.sh stop      # TERM, then KILL after STOP_TIMEOUT_S
#
# Settings (environment variables):
#   MLOPS_VENV           virtual environment with prefect and mlflow (default <project root>/.venv;
#                        empty: take them from PATH)
#   MLOPS_WORKSPACE      workspace of the flows (default: <project root>/workspace)
#   PREFECT_PORT         Prefect API and UI port (default 4200)
#   MLFLOW_PORT          MLflow tracking server port (default 5000)
#   MLFLOW_BACKEND_URI   MLflow backend store (default: the flows' sqlite file,
#                        sqlite:///$WORKSPACE/mlflow.db; postgresql://... in production)
#   MLFLOW_ARTIFACTS     artifact destination served by MLflow (default $WORKSPACE/mlartifacts;
#                        s3://... in production)
#   PREFECT_SERVER_DATABASE_CONNECTION_URL   Prefect's database (default: sqlite under
#                        $WORKSPACE/stack; postgresql+asyncpg://... in production)
#   WAIT_S               how long to wait for each server's health endpoint (default 90)
#   STOP_TIMEOUT_S       how long `stop` waits after TERM before KILL (default 20)
#
# Each process gets $WORKSPACE/stack/<part>.pid and <part>.log. The model servers are not part
# of this stack: the deploy flow starts and stops them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"   # prefect deploy reads ./prefect.yaml; the worker runs the flows from here
VENV="${MLOPS_VENV-$ROOT/.venv}"   # prefect and mlflow come from here, else from PATH
if [[ -n "$VENV" && -x "$VENV/bin/prefect" ]]; then
    PATH="$VENV/bin:$PATH"
fi

WORKSPACE="${MLOPS_WORKSPACE:-$PWD/workspace}"
STACK="$WORKSPACE/stack"
PREFECT_PORT="${PREFECT_PORT:-4200}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_BACKEND_URI="${MLFLOW_BACKEND_URI:-sqlite:///$WORKSPACE/mlflow.db}"
MLFLOW_ARTIFACTS="${MLFLOW_ARTIFACTS:-$WORKSPACE/mlartifacts}"
WAIT_S="${WAIT_S:-90}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-20}"
POOL=mlops-process
K8S_POOL=mlops-k8s
PARTS=(worker mlflow prefect-server)   # stop order; start order is the reverse

export PREFECT_API_URL="http://127.0.0.1:$PREFECT_PORT/api"

# The pid in <part>.pid if that process still runs, else nothing.
running_pid() {
    local file="$STACK/$1.pid" pid
    [[ -f "$file" ]] || return 1
    pid="$(<"$file")"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

# launch PART COMMAND...: run in the background in its own session (so stop reaches its children).
launch() {
    local part="$1" pid
    shift
    if pid="$(running_pid "$part")"; then
        echo "$part: already running (pid $pid)"
        return 0
    fi
    setsid "$@" >>"$STACK/$part.log" 2>&1 </dev/null &
    echo $! >"$STACK/$part.pid"
    echo "$part: started (pid $!), log $STACK/$part.log"
}

# wait_healthy PART URL: poll URL until it answers 2xx, at most WAIT_S seconds.
wait_healthy() {
    local part="$1" url="$2" waited=0
    until curl -fs -o /dev/null --max-time 2 "$url"; do
        if ! running_pid "$part" >/dev/null; then
            echo "$part: exited while starting; last lines of $STACK/$part.log:" >&2
            tail -n 20 "$STACK/$part.log" >&2
            return 1
        fi
        if (( waited >= WAIT_S )); then
            echo "$part: $url not healthy after ${WAIT_S}s (see $STACK/$part.log)" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "$part: healthy at $url"
}

start() {
    mkdir -p "$STACK" "$MLFLOW_ARTIFACTS"

    PREFECT_SERVER_DATABASE_CONNECTION_URL="${PREFECT_SERVER_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$STACK/prefect.db}" \
        launch prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    launch mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "$MLFLOW_BACKEND_URI" --artifacts-destination "$MLFLOW_ARTIFACTS"
    wait_healthy prefect-server "$PREFECT_API_URL/health"
    echo "$PREFECT_API_URL" >"$STACK/prefect-api-url"   # python -m flows.* reports here (flows/startup.py)
    wait_healthy mlflow "http://127.0.0.1:$MLFLOW_PORT/health"

    if ! prefect work-pool inspect "$POOL" >/dev/null 2>&1; then
        prefect work-pool create "$POOL" --type process
    fi
    # prefect.yaml also has deployments for clusters; their pool waits for a Kubernetes worker.
    if ! prefect work-pool inspect "$K8S_POOL" >/dev/null 2>&1; then
        prefect work-pool create "$K8S_POOL" --type kubernetes \
            --base-job-template deployments/kubernetes/work-pool-template.json
    fi
    prefect --no-prompt deploy --all

    # What the flows read: the same workspace; env=production's services default to this stack.
    export MLOPS_WORKSPACE="$WORKSPACE"
    export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT}"
    export DVC_REMOTE_URL="${DVC_REMOTE_URL:-$WORKSPACE/dvc-remote}"
    if [[ -z "${MLOPS_API_TOKEN:-}" ]]; then
        echo "note: MLOPS_API_TOKEN is not set; env=production deploy runs need it in the worker's environment" >&2
    fi
    launch worker prefect worker start --pool "$POOL"

    echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT  MLflow UI: http://127.0.0.1:$MLFLOW_PORT"
    echo "run a flow: PREFECT_API_URL=$PREFECT_API_URL prefect deployment run build/build-test"
}

stop() {
    local part pid waited
    for part in "${PARTS[@]}"; do
        if ! pid="$(running_pid "$part")"; then
            rm -f "$STACK/$part.pid"
            echo "$part: not running"
            continue
        fi
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        waited=0
        while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT_S )); do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            echo "$part: killed (pid $pid)"
        else
            echo "$part: stopped (pid $pid)"
        fi
        rm -f "$STACK/$part.pid"
    done
    rm -f "$STACK/prefect-api-url"
}

status() {
    local part pid
    for part in prefect-server mlflow worker; do
        if pid="$(running_pid "$part")"; then
            echo "$part: running (pid $pid)"
        else
            echo "$part: not running"
        fi
    done
    echo "workspace: $WORKSPACE"
    echo "PREFECT_API_URL=$PREFECT_API_URL  MLflow: http://127.0.0.1:$MLFLOW_PORT"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
