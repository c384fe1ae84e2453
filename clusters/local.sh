#!/usr/bin/env bash
# The cluster flow on one machine: a Ray head with token authentication on and an MLflow server, both bound to
# 127.0.0.1, then `ray job submit` exactly as on a cloud cluster. Run it from the repository root with the
# virtual environment active (source .venv/bin/activate).
#
#   clusters/local.sh up                  start Ray and MLflow; prints the dashboard and MLflow UI addresses
#   clusters/local.sh submit [ARGS...]    ray job submit ... -- python -m raydistill.tune peeraid --preset quickstart ARGS
#                                         (METHOD=pgd_at clusters/local.sh submit: another method)
#   clusters/local.sh status              the cluster's resources and jobs
#   clusters/local.sh down                stop what `up` started (by process group; other Ray instances are left alone)
#
# State (token, MLflow database, results, logs) stays in $RAYDISTILL_LOCAL (default /tmp/raydistill-local-$USER)
# after `down`, for python -m raydistill.report --tracking-uri sqlite:///$RAYDISTILL_LOCAL/mlflow.db.
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000); RAY_START_ARGS: more `ray start` options
# (e.g. --dashboard-agent-listen-port=52366 --ray-client-server-port=10002 beside another Ray on this machine).
set -euo pipefail

STATE=${RAYDISTILL_LOCAL:-${TMPDIR:-/tmp}/raydistill-local-$(id -un)}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
MLFLOW=http://127.0.0.1:$MLFLOW_PORT
# Token authentication for the cluster and for every client below (ray job submit, ray status). The token is
# this set-up's own file, not ~/.ray/auth_token; Ray never prints it. The dashboard (job API) and MLflow listen on
# 127.0.0.1 only; Ray's internal gRPC ports listen on every interface and refuse requests without the token.
export RAY_AUTH_MODE=token
# Ray's workers at nice 0 (Ray's default is 15, below its own daemons: slower training on a busy CPU; README)
export RAY_worker_niceness=0
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token

die() { echo "local.sh: $*" >&2; exit 1; }

wait_for() {  # wait_for NAME SECONDS COMMAND...: retry COMMAND until it succeeds, while NAME's process lives
    local name=$1 deadline=$((SECONDS + $2))
    shift 2
    until "$@" > /dev/null 2>&1; do
        kill -0 "$(cat "$STATE/$name.pid")" 2> /dev/null || die "$name exited; see $STATE/$name.log"
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not answer in time; see $STATE/$name.log"
        sleep 1
    done
}

start_group() {  # start_group NAME COMMAND...: run COMMAND in its own process group, remember its id
    local name=$1
    shift
    setsid "$@" > "$STATE/$name.log" 2>&1 < /dev/null &
    echo $! > "$STATE/$name.pid"
}

stop_group() {  # stop_group NAME: SIGTERM the process group started by start_group, SIGKILL after 30 s
    local pidfile=$STATE/$1.pid pgid
    [ -f "$pidfile" ] || return 0
    pgid=$(cat "$pidfile")
    if kill -TERM -- "-$pgid" 2> /dev/null; then
        for _ in $(seq 30); do
            kill -0 -- "-$pgid" 2> /dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pgid" 2> /dev/null || true
    fi
    rm -f "$pidfile"
    echo "stopped $1"
}

up() {
    command -v ray > /dev/null && command -v mlflow > /dev/null || die "ray and mlflow are not on PATH; source .venv/bin/activate"
    [ -f "$STATE/ray.pid" ] && kill -0 "$(cat "$STATE/ray.pid")" 2> /dev/null && die "already up (state in $STATE); run: $0 down"
    mkdir -p "$STATE" && chmod 700 "$STATE"
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
    # shellcheck disable=SC2086 # RAY_START_ARGS is a list of options
    start_group ray ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --temp-dir="$STATE/ray" --disable-usage-stats \
        ${RAY_START_ARGS:-}
    start_group mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlflow-artifacts" --workers 1
    trap down EXIT  # a failed start leaves nothing running
    wait_for ray 180 ray job list --address "$DASHBOARD"
    wait_for mlflow 180 curl -sf "$MLFLOW/health"
    trap - EXIT
    echo "Ray dashboard: $DASHBOARD   MLflow UI: $MLFLOW   state: $STATE"
}

submit() {
    ray job submit --address "$DASHBOARD" --working-dir . -- \
        python -m raydistill.tune "${METHOD:-peeraid}" --preset quickstart --tracking-uri "$MLFLOW" --storage-path "$STATE/ray_results" "$@"
}

status() {
    ray status --address "127.0.0.1:$RAY_PORT"
    ray job list --address "$DASHBOARD"
}

down() {
    stop_group mlflow
    stop_group ray
}

case "${1:-}" in
    up | status | down) "$1" ;;
    submit) shift && submit "$@" ;;
    *) die "usage: $0 up | submit [TUNE ARGS...] | status | down" ;;
esac
