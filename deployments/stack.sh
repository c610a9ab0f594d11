#!/usr/bin/env bash
# The local stack on 127.0.0.1: Prefect server, MLflow tracking server, the Prefect deployments
# of prefect.yaml (work pools mlops-process and mlops-k8s) and a process worker that runs them.
# With --production, the services a team runs in production, on loopback: PostgreSQL (one
# database for MLflow, one for Prefect), an S3-compatible object store (moto_server) holding
# MLflow's artifacts, DVC's remote, the model servers' records and captures.
#
#   deployments/stack.sh start [--production]   # start what is not running, then deploy
#   deployments/stack.sh status                 # which parts run (exit 0 either way)
#   deployments/stack.sh stop                   # TERM, then KILL after STOP_TIMEOUT_S
#
# Settings (environment variables):
#   MLOPS_VENV           virtual environment with prefect and mlflow (default <project root>/.venv;
#                        empty: take them from PATH)
#   MLOPS_WORKSPACE      workspace of the flows (default: <project root>/workspace)
#   PREFECT_PORT         Prefect API and UI port (default 4200)
#   MLFLOW_PORT          MLflow tracking server port (default 5000)
#   MLFLOW_BACKEND_URI   MLflow backend store (default: the flows' sqlite file,
#                        sqlite:///$WORKSPACE/mlflow.db; --production: the PostgreSQL database)
#   MLFLOW_ARTIFACTS     artifact destination served by MLflow (default $WORKSPACE/mlartifacts;
#                        --production: s3://$MLOPS_BUCKET/mlflow)
#   PREFECT_SERVER_DATABASE_CONNECTION_URL   Prefect's database (default: sqlite under
#                        $WORKSPACE/stack; --production: the PostgreSQL database)
#   WAIT_S               how long to wait for each server's health endpoint (default 90)
#   STOP_TIMEOUT_S       how long `stop` waits after TERM before KILL (default 20)
# --production only:
#   PG_PORT              PostgreSQL port (default 5433); PG_BIN its binaries (default: the newest
#                        /usr/lib/postgresql/*/bin, Debian's package `postgresql`)
#   PGUSER, PGPASSWORD   its role; the password is generated into $WORKSPACE/stack/pg-password
#                        (mode 600) unless set, and only the MLflow and Prefect servers get it
#   S3_PORT              the object store's port (default 9000); MLOPS_BUCKET its bucket (default mlops)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLOPS_API_TOKEN   generated unless set
# The clients' variables (MLFLOW_TRACKING_URI, DVC_REMOTE_URL, MLOPS_RECORDS_URL, MLOPS_CAPTURE_URL,
# AWS_*, PREFECT_API_URL, MLOPS_API_TOKEN) go to $WORKSPACE/stack/production.env (mode 600):
# `source` it in a shell, or copy it to a second machine; the worker gets the same.
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
MLFLOW_ARTIFACTS_GIVEN="${MLFLOW_ARTIFACTS:-}"
MLFLOW_ARTIFACTS="${MLFLOW_ARTIFACTS:-$WORKSPACE/mlartifacts}"
WAIT_S="${WAIT_S:-90}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-20}"
POOL=mlops-process
K8S_POOL=mlops-k8s
PARTS=(worker mlflow prefect-server s3 postgres)   # stop order; start order is the reverse
PG_PORT="${PG_PORT:-5433}"
PGUSER="${PGUSER:-mlops}"
S3_PORT="${S3_PORT:-9000}"
BUCKET="${MLOPS_BUCKET:-mlops}"

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

# A secret: the variable's value if set, else the one kept in $STACK/<file>, else a new one kept there.
kept_secret() {
    local variable="$1" file="$STACK/$2"
    if [[ -n "${!variable:-}" ]]; then
        echo "${!variable}"
    elif [[ -s "$file" ]]; then
        cat "$file"
    else
        (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(18))' >"$file")
        cat "$file"
    fi
}

# PostgreSQL refuses to run as root: as root, its programs run as the user postgres.
AS_POSTGRES=()
if [[ "$(id -u)" == 0 ]]; then
    AS_POSTGRES=(runuser -u postgres --)
fi

# PostgreSQL: a cluster under $STACK/postgres on 127.0.0.1:$PG_PORT (password auth, no socket),
# and the databases mlflow and prefect.
start_postgres() {
    PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
    if [[ ! -x "$PG_BIN/initdb" ]]; then
        echo "postgres: PostgreSQL is not installed (no initdb under ${PG_BIN:-/usr/lib/postgresql/*/bin}):" \
            "apt-get install -y postgresql, or set PG_BIN" >&2
        return 1
    fi
    local data="$STACK/postgres" pwfile
    if [[ ! -s "$data/PG_VERSION" ]]; then
        mkdir -p "$data"
        pwfile="$(mktemp)"
        printf '%s\n' "$PGPASSWORD" >"$pwfile"
        if [[ "$(id -u)" == 0 ]]; then
            chown postgres "$data" "$pwfile"
            if ! runuser -u postgres -- test -w "$data"; then
                echo "postgres: the user postgres cannot write $data (a parent folder is private):" \
                    "use a workspace it can reach, or start the stack as another user" >&2
                rm -f "$pwfile"
                return 1
            fi
        fi
        chmod 700 "$data"
        "${AS_POSTGRES[@]}" "$PG_BIN/initdb" -D "$data" -U "$PGUSER" --pwfile="$pwfile" --auth=scram-sha-256 \
            --encoding=UTF8 --no-instructions >>"$STACK/postgres.log" 2>&1 || {
            rm -f "$pwfile"; echo "postgres: initdb failed (see $STACK/postgres.log)" >&2; return 1; }
        rm -f "$pwfile"
    fi
    launch postgres "${AS_POSTGRES[@]}" "$PG_BIN/postgres" -D "$data" -p "$PG_PORT" -h 127.0.0.1 -c unix_socket_directories=
    local waited=0
    until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do
        if ! running_pid postgres >/dev/null || (( waited >= WAIT_S )); then
            echo "postgres: not ready (see $STACK/postgres.log)" >&2
            tail -n 20 "$STACK/postgres.log" >&2
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    echo "postgres: ready on 127.0.0.1:$PG_PORT"
    local db
    for db in mlflow prefect; do
        if [[ -z "$(PGPASSWORD="$PGPASSWORD" "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
            PGPASSWORD="$PGPASSWORD" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" "$db"
            echo "postgres: database $db created"
        fi
    done
}

# The S3-compatible store (moto's server; MinIO or a cloud bucket take the same client variables)
# and the bucket.
start_s3() {
    if ! command -v moto_server >/dev/null; then
        echo "s3: moto_server not found: pip install -e '.[production]'" >&2
        return 1
    fi
    launch s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
    wait_healthy s3 "$AWS_ENDPOINT_URL/moto-api/"
    python3 - "$BUCKET" <<'PY' || { echo "s3: could not create bucket $BUCKET" >&2; return 1; }
import sys
import boto3
from botocore.exceptions import ClientError
s3 = boto3.client("s3")
try:
    s3.head_bucket(Bucket=sys.argv[1])
except ClientError:
    s3.create_bucket(Bucket=sys.argv[1])
    print(f"s3: bucket {sys.argv[1]} created")
PY
}

# What every client of the production stack reads (the worker, a shell, a second machine).
write_client_env() {
    local file="$STACK/production.env" name
    (umask 077 && : >"$file")
    for name in PREFECT_API_URL MLFLOW_TRACKING_URI DVC_REMOTE_URL MLOPS_RECORDS_URL MLOPS_CAPTURE_URL \
        AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_DEFAULT_REGION MLOPS_API_TOKEN; do
        printf 'export %s=%q\n' "$name" "${!name}" >>"$file"
    done
    echo "clients: source $file"
}

start() {
    local production="${1:-}"
    if [[ -n "$production" && "$production" != "--production" ]]; then
        echo "usage: $0 start [--production]" >&2
        return 2
    fi
    mkdir -p "$STACK"
    if [[ -z "$production" && -f "$STACK/production" ]] && running_pid postgres >/dev/null; then
        production=--production   # a restart of a production stack stays one
    fi
    local prefect_db="${PREFECT_SERVER_DATABASE_CONNECTION_URL:-sqlite+aiosqlite:///$STACK/prefect.db}"
    if [[ -n "$production" ]]; then
        touch "$STACK/production"
        PGPASSWORD="$(kept_secret PGPASSWORD pg-password)"
        export AWS_ACCESS_KEY_ID="$(kept_secret AWS_ACCESS_KEY_ID s3-access-key)"
        export AWS_SECRET_ACCESS_KEY="$(kept_secret AWS_SECRET_ACCESS_KEY s3-secret-key)"
        export MLOPS_API_TOKEN="$(kept_secret MLOPS_API_TOKEN api-token)"
        export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
        export AWS_ENDPOINT_URL="${AWS_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}"
        export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"   # the name MLflow's artifact proxy reads
        export PGUSER
        start_postgres
        start_s3
        MLFLOW_BACKEND_URI="postgresql://$PGUSER@127.0.0.1:$PG_PORT/mlflow"   # the password: PGPASSWORD
        MLFLOW_ARTIFACTS="${MLFLOW_ARTIFACTS_GIVEN:-s3://$BUCKET/mlflow}"
        prefect_db="postgresql+asyncpg://$PGUSER@127.0.0.1:$PG_PORT/prefect"
        export DVC_REMOTE_URL="${DVC_REMOTE_URL:-s3://$BUCKET/dvc}"
        export MLOPS_RECORDS_URL="${MLOPS_RECORDS_URL:-s3://$BUCKET/records}"
        export MLOPS_CAPTURE_URL="${MLOPS_CAPTURE_URL:-s3://$BUCKET/captures}"
    else
        rm -f "$STACK/production"
        mkdir -p "$MLFLOW_ARTIFACTS"
    fi

    PGPASSWORD="${PGPASSWORD:-}" PREFECT_SERVER_DATABASE_CONNECTION_URL="$prefect_db" \
        launch prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    PGPASSWORD="${PGPASSWORD:-}" launch mlflow mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
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
    if [[ -n "$production" ]]; then
        write_client_env
    elif [[ -z "${MLOPS_API_TOKEN:-}" ]]; then
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
    local parts=(prefect-server mlflow worker)
    if [[ -f "$STACK/production" ]]; then
        parts=(postgres s3 "${parts[@]}")
    fi
    for part in "${parts[@]}"; do
        if pid="$(running_pid "$part")"; then
            echo "$part: running (pid $pid)"
        else
            echo "$part: not running"
        fi
    done
    echo "workspace: $WORKSPACE"
    echo "PREFECT_API_URL=$PREFECT_API_URL  MLflow: http://127.0.0.1:$MLFLOW_PORT"
    if [[ -f "$STACK/production" ]]; then
        echo "production: PostgreSQL 127.0.0.1:$PG_PORT, S3 http://127.0.0.1:$S3_PORT (bucket $BUCKET);" \
            "clients: source $STACK/production.env"
    fi
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start [--production]|stop|status" >&2
        exit 2
        ;;
esac
