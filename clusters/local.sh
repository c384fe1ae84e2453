#!/usr/bin/env bash
# The cluster flow on one machine: an S3 server (moto, the stand-in for a bucket), an MLflow server and a Ray
# cluster of NODES nodes (a head and NODES-1 more, each `ray start` in its own process group with its own ports and
# temporary folder), Ray's token authentication on and every server bound to 127.0.0.1; then `ray job submit`
# exactly as on a cloud cluster. Run it from the repository root with the virtual environment active
# (source .venv/bin/activate; moto comes with the dev extra: pip install -e '.[dev]').
#
#   clusters/local.sh up                  start S3, MLflow and Ray; prints the dashboard, MLflow and S3 addresses
#   clusters/local.sh submit [ARGS...]    ray job submit ... -- python -m raydistill.tune peeraid --preset quickstart ARGS
#                                         (METHOD=pgd_at clusters/local.sh submit: another method)
#   clusters/local.sh status              the cluster's nodes, resources and jobs
#   clusters/local.sh down                stop what `up` started (by process group; other Ray instances are left alone)
#
# Every `ray start` gets the cluster's environment (CLUSTER_ENV below), as clusters/*.yaml and clusters/kuberay do:
# MLFLOW_TRACKING_URI (the MLflow server), RAYDISTILL_STORAGE (s3://raydistill/runs: runs and checkpoints) and the
# S3 endpoint and credentials (AWS_*). A job's command and every Ray worker take the environment of `ray start`,
# not that of the shell that submits, so jobs need neither --tracking-uri nor --storage-path (docs/clusters.md).
#
# State (token, MLflow database and artifacts, logs) stays in $RAYDISTILL_LOCAL (default
# /tmp/raydistill-local-$USER) after `down`, for python -m raydistill.report --tracking-uri
# sqlite:///$RAYDISTILL_LOCAL/mlflow.db; the S3 server keeps its objects in memory: they go with `down`.
# Ports: RAY_PORT (6379), DASHBOARD_PORT (8265), MLFLOW_PORT (5000), S3_PORT (9000), read by `up` and kept in
# $RAYDISTILL_LOCAL/up.env for the other commands; every other port of every node is a free one chosen by `up`.
# NODES (2), CPUS_PER_NODE (the machine's CPUs / NODES, at least 1), RAY_START_ARGS: more options for every `ray start`.
set -euo pipefail

STATE=${RAYDISTILL_LOCAL:-${TMPDIR:-/tmp}/raydistill-local-$(id -un)}
if [ "${1:-}" != up ] && [ -f "$STATE/up.env" ]; then
    # shellcheck source=/dev/null
    . "$STATE/up.env"  # the ports and size of the cluster that `up` started
fi
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
S3_PORT=${S3_PORT:-9000}
NODES=${NODES:-2}
BUCKET=raydistill
DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
MLFLOW=http://127.0.0.1:$MLFLOW_PORT
S3=http://127.0.0.1:$S3_PORT
# Token authentication for the cluster and for every client below (ray job submit, ray status). The token is
# this set-up's own file, not ~/.ray/auth_token; Ray never prints it. The dashboard (job API), MLflow and S3 listen
# on 127.0.0.1 only; Ray's internal gRPC ports listen on every interface and refuse requests without the token.
export RAY_AUTH_MODE=token
# Ray's workers at nice 0 (Ray's default is 15, below its own daemons: slower training on a busy CPU; README)
export RAY_worker_niceness=0
# The raylet warns once a node runs 4x the Python workers it starts at once (its CPUs: 1 or 2 here), which a search
# on small nodes always does (docs/clusters.md, "The raylet's worker-pool warning"): at 8 it warns from 32 on
export RAY_worker_maximum_startup_concurrency=${RAY_worker_maximum_startup_concurrency:-8}
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
# The environment of every `ray start`: where jobs log (MLflow) and store (S3), and how they reach the bucket
# (moto accepts any credentials; on a real cluster they come from the node's identity or your secret store);
# RAY_ADDRESS: Ray's own actors that query the cluster's state find this cluster, not another one on the machine.
CLUSTER_ENV=(MLFLOW_TRACKING_URI="$MLFLOW" RAYDISTILL_STORAGE="s3://$BUCKET/runs"
    AWS_ENDPOINT_URL="$S3" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
    AWS_DEFAULT_REGION=us-east-1 AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    RAY_ADDRESS="127.0.0.1:$RAY_PORT")

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

stop_group() {  # stop_group NAME [SECONDS]: SIGTERM the process group started by start_group, SIGKILL after SECONDS (30)
    local pidfile=$STATE/$1.pid pgid
    [ -f "$pidfile" ] || return 0
    pgid=$(cat "$pidfile")
    if kill -TERM -- "-$pgid" 2> /dev/null; then
        for _ in $(seq "${2:-30}"); do
            kill -0 -- "-$pgid" 2> /dev/null || break
            sleep 1
        done
        kill -KILL -- "-$pgid" 2> /dev/null || true
    fi
    rm -f "$pidfile"
    echo "stopped $1"
}

node_ports() {  # node_ports [head]: the ports of one node's servers, free ones, so that nodes on one machine do not
    # clash; its workers bind ports the OS chooses (0), as in Ray's own multi-node test clusters
    local names=(node-manager-port object-manager-port dashboard-agent-listen-port dashboard-agent-grpc-port
        metrics-export-port runtime-env-agent-port) ports i
    [ "${1:-}" = head ] && names+=(ray-client-server-port)
    read -r -a ports <<< "$(python -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
print(*[s.bind(("127.0.0.1", 0)) or s.getsockname()[1] for s in socks])' "${#names[@]}")"
    for i in "${!names[@]}"; do
        printf -- '--%s=%s ' "${names[$i]}" "${ports[$i]}"
    done
    printf -- '--min-worker-port=0 --max-worker-port=0'
}

alive_nodes() {  # alive_nodes N: succeeds once the cluster has N live nodes
    [ "$(ray list nodes --address "$DASHBOARD" --filter state=ALIVE --limit 1000 2> /dev/null | grep -c ALIVE)" -ge "$1" ]
}

up() {
    command -v ray > /dev/null && command -v mlflow > /dev/null && command -v moto_server > /dev/null ||
        die "ray, mlflow and moto_server are not on PATH; source .venv/bin/activate (moto: pip install -e '.[dev]')"
    [ -f "$STATE/ray0.pid" ] && kill -0 "$(cat "$STATE/ray0.pid")" 2> /dev/null && die "already up (state in $STATE); run: $0 down"
    mkdir -p "$STATE" && chmod 700 "$STATE"
    [ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
    printf 'RAY_PORT=%s\nDASHBOARD_PORT=%s\nMLFLOW_PORT=%s\nS3_PORT=%s\nNODES=%s\n' "$RAY_PORT" "$DASHBOARD_PORT" \
        "$MLFLOW_PORT" "$S3_PORT" "$NODES" > "$STATE/up.env"
    local cpus=${CPUS_PER_NODE:-$(($(python -c 'import os; print(len(os.sched_getaffinity(0)))') / NODES))} i
    [ "$cpus" -ge 1 ] || cpus=1
    trap down EXIT  # a failed start leaves nothing running
    start_group s3 moto_server -H 127.0.0.1 -p "$S3_PORT"
    start_group mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlflow-artifacts" --workers 1
    wait_for s3 60 curl -s "$S3"
    curl -sf -X PUT "$S3/$BUCKET" > /dev/null || die "could not create the bucket $BUCKET; see $STATE/s3.log"
    # shellcheck disable=SC2046,SC2086 # node_ports and RAY_START_ARGS are lists of options
    start_group ray0 env "${CLUSTER_ENV[@]}" ray start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --num-cpus="$cpus" --temp-dir="$STATE/ray0" \
        --disable-usage-stats $(node_ports head) ${RAY_START_ARGS:-}
    wait_for ray0 180 ray job list --address "$DASHBOARD"
    for i in $(seq 1 $((NODES - 1))); do
        # shellcheck disable=SC2046,SC2086
        start_group "ray$i" env "${CLUSTER_ENV[@]}" ray start --address="127.0.0.1:$RAY_PORT" --block \
            --node-ip-address=127.0.0.1 --num-cpus="$cpus" --temp-dir="$STATE/ray$i" --disable-usage-stats \
            $(node_ports) ${RAY_START_ARGS:-}
    done
    wait_for "ray$((NODES - 1))" 180 alive_nodes "$NODES"
    wait_for mlflow 180 curl -sf "$MLFLOW/health"
    trap - EXIT
    echo "Ray dashboard: $DASHBOARD ($NODES nodes, $cpus CPUs each)   MLflow UI: $MLFLOW   S3: $S3 (bucket $BUCKET)   state: $STATE"
}

# The job takes MLflow's address and the storage from the environment of `ray start` (CLUSTER_ENV): no flags for them
submit() {
    ray job submit --address "$DASHBOARD" --working-dir . -- \
        python -m raydistill.tune "${METHOD:-peeraid}" --preset quickstart "$@"
}

status() {
    ray status --address "127.0.0.1:$RAY_PORT"
    ray job list --address "$DASHBOARD"
}

down() {  # every Ray node at once (a head shuts its daemons down one by one: 30 s and more; killed after 10), then
    # the servers (MLflow gets its 30 s: its database stays)
    local i
    for i in $(seq 0 $((NODES - 1))); do
        stop_group "ray$i" 10 &
    done
    wait
    stop_group mlflow &
    stop_group s3 &
    wait
}

case "${1:-}" in
    up | status | down) "$1" ;;
    submit) shift && submit "$@" ;;
    *) die "usage: $0 up | submit [TUNE ARGS...] | status | down" ;;
esac
