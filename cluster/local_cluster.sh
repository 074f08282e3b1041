#!/usr/bin/env bash
# A local multi-node Ray cluster on this host for development and tests: a head node and one more worker node,
# the dashboard (job submission API) on 127.0.0.1:8265; optionally an MLflow server on 127.0.0.1.
#
#   cluster/local_cluster.sh start [--cpus-head N] [--cpus-worker N] [--insecure]   # head + 1 worker node
#   eval "$(cluster/local_cluster.sh env)"   # RAY_ADDRESS and the token variables for `ray job submit`
#   cluster/local_cluster.sh mlflow [PORT]                            # MLflow server, SQLite + artifact dir
#   cluster/local_cluster.sh status | stop
#
# Auth: on by default. Ray 2.60's `ray start` turns token auth on only when a token already exists (else it warns
# and runs open), so this script makes one: a random 256-bit token in $STATE/auth_token (mode 600, kept across
# restarts), and starts every node with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH pointing at it. Clients
# (`ray job submit`, the state API) need the same two variables: `env` prints them. Anyone on the host without
# read access to the token file gets 401 from the job API. `--insecure` starts without auth (a single-user box).
#
# The host may be shared (other people's Ray instances, tests): this cluster keeps its own Ray temp dir
# ($STATE/ray, or BRCD_RAY_TEMP_DIR), its ports can be moved by environment (RAY_PORT, RAY_DASHBOARD_PORT,
# RAY_AGENT_PORT_HEAD, RAY_AGENT_PORT_WORKER), and `stop` ends only the processes of this cluster (those whose
# command line names its temp dir, and their children), never every Ray process on the host as `ray stop` does.
set -euo pipefail
# Telemetry off: Ray's usage stats and MLflow's (nothing may try to leave the machine).
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
RAY="$VENV_BIN/ray"
STATE="${BRCD_CLUSTER_STATE:-$REPO/.cluster}"
PORT="${RAY_PORT:-6379}"
DASH_PORT="${RAY_DASHBOARD_PORT:-8265}"
# Each raylet runs a dashboard agent with an HTTP port (Ray's default 52365, which job submission goes through):
# two nodes on one host need two.
AGENT_PORT_HEAD="${RAY_AGENT_PORT_HEAD:-52365}"
AGENT_PORT_WORKER="${RAY_AGENT_PORT_WORKER:-52366}"
RAY_TMP="${BRCD_RAY_TEMP_DIR:-$STATE/ray}"  # keep it short: Ray's socket paths under it must stay < 108 chars
# The worker node keeps its own temp dir and runs from its own directory, as a node of a real cluster would: on a
# shared temp dir its runtime-env agent deletes the job's uploaded working dir from under the driver on the head.
RAY_TMP_WORKER="${RAY_TMP}w"
WORKER_CWD="$STATE/worker-node"
# A submitted job runs in a temporary copy of --working-dir: its relative output paths (train.storage_path=runs,
# the cache) and the default tracking store (mlflow.db) resolve against BRCD_HOME (storage.output_root()); here
# that is the repository, as for a job run from it directly.
export BRCD_HOME="${BRCD_HOME:-$REPO}"
TOKEN_FILE="$STATE/auth_token"
if [ -f "$STATE/insecure" ]; then
  export RAY_AUTH_MODE=disabled
  unset RAY_AUTH_TOKEN RAY_AUTH_TOKEN_PATH
else
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
  unset RAY_AUTH_TOKEN
fi
# `ray job submit ... -- python jobs/distill.py`: the job's `python` is looked up on the PATH that the nodes
# inherit from this script, so the venv must come first (else a system python without Ray runs the job).
export PATH="$VENV_BIN:$PATH"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.venv/torch_extensions}"

start() {
  local head_cpus=1 worker_cpus=1 insecure=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpus-head) head_cpus="$2"; shift 2 ;;
      --cpus-worker) worker_cpus="$2"; shift 2 ;;
      --insecure) insecure=1; shift ;;
      *) echo "unknown option $1 (allowed: --cpus-head N, --cpus-worker N, --insecure)" >&2; exit 2 ;;
    esac
  done
  mkdir -p "$STATE" "$RAY_TMP" "$RAY_TMP_WORKER" "$WORKER_CWD"
  chmod 700 "$STATE"
  if [ "$insecure" = 1 ]; then
    touch "$STATE/insecure"
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
    echo "WARNING: token auth off (--insecure): anyone who can reach 127.0.0.1:$DASH_PORT can run code as $(id -un)" >&2
  else
    rm -f "$STATE/insecure"
    if [ ! -s "$TOKEN_FILE" ]; then
      (umask 077 && "$VENV_BIN/python" -c "import secrets; print(secrets.token_hex(32), end='')" >"$TOKEN_FILE")
    fi
    chmod 600 "$TOKEN_FILE"
  fi
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$head_cpus" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --dashboard-agent-listen-port="$AGENT_PORT_HEAD" --temp-dir="$RAY_TMP" \
    --disable-usage-stats >"$STATE/head.log" 2>&1
  # A second raylet on the same host: a real second node as far as Ray's scheduler is concerned.
  (cd "$WORKER_CWD" && "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 \
    --num-cpus="$worker_cpus" --dashboard-agent-listen-port="$AGENT_PORT_WORKER" --temp-dir="$RAY_TMP_WORKER" \
    --disable-usage-stats >"$STATE/worker.log" 2>&1)
  for _ in $(seq 60); do
    if "$VENV_BIN/python" - "$DASH_PORT" <<'PY' 2>/dev/null; then
import os, sys, urllib.request
headers = {}
if os.environ.get("RAY_AUTH_MODE") == "token":  # with auth on, the dashboard answers 401 to a request without it
    headers["Authorization"] = "Bearer " + open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/version", headers=headers)
urllib.request.urlopen(req, timeout=2)
PY
      echo "ray cluster up: 2 nodes, dashboard http://127.0.0.1:$DASH_PORT, auth $RAY_AUTH_MODE" \
           "(submit after: eval \"\$($0 env)\")"
      return 0
    fi
    sleep 1
  done
  echo "dashboard did not answer on 127.0.0.1:$DASH_PORT; see $STATE/head.log" >&2
  exit 1
}

mlflow_server() {
  local port="${1:-5000}"
  mkdir -p "$STATE/mlflow-artifacts"
  nohup "$VENV_BIN/mlflow" server --backend-store-uri "sqlite:///$STATE/mlflow.db" \
    --artifacts-destination "$STATE/mlflow-artifacts" --host 127.0.0.1 --port "$port" --workers 1 \
    >"$STATE/mlflow.log" 2>&1 &
  echo $! >"$STATE/mlflow.pid"
  for _ in $(seq 60); do
    # /health answers before the store is open; the first API call opens it (20 s on a busy 2-core machine), which
    # a job's 3-second pre-flight check would not wait for
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && curl -sf --max-time 120 \
      "http://127.0.0.1:$port/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default" >/dev/null 2>&1; then
      echo "mlflow server up: http://127.0.0.1:$port (tracking.uri=http://127.0.0.1:$port)"
      return 0
    fi
    sleep 1
  done
  echo "mlflow server did not answer on 127.0.0.1:$port; see $STATE/mlflow.log" >&2
  exit 1
}

stop_ray() {
  # This cluster's processes only: those whose command line names its temp dir (GCS, raylets, dashboard,
  # monitors), with their children (agents and workers, which rename themselves ray::...). SIGTERM, then
  # SIGKILL after a grace period.
  "$VENV_BIN/python" - "$RAY_TMP" "$RAY_TMP_WORKER" <<'PY'
import os
import sys
import psutil
roots = [r.rstrip("/") + "/" for r in sys.argv[1:]]
procs = {}
for p in psutil.process_iter(["cmdline"]):
    if p.pid != os.getpid() and any(r in arg for arg in (p.info["cmdline"] or []) for r in roots):
        procs[p.pid] = p
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
for p in procs.values():
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(procs.values()), timeout=5)
for p in alive:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass
psutil.wait_procs(alive, timeout=5)
print(f"ended {len(procs)} processes of the cluster under {' and '.join(roots)}")
PY
}

stop() {
  stop_ray
  if [ -f "$STATE/mlflow.pid" ]; then
    kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null || true
    rm -f "$STATE/mlflow.pid"
  fi
  echo "stopped"
}

env_lines() {
  # What a client shell needs to submit to this cluster: its address and, unless --insecure, the token's file.
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT RAY_AUTH_MODE=$RAY_AUTH_MODE"
  if [ "$RAY_AUTH_MODE" = token ]; then
    echo "export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE"
  else
    echo "unset RAY_AUTH_TOKEN_PATH"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  env) env_lines ;;
  mlflow) shift; mlflow_server "$@" ;;
  stop) stop ;;
  status) "$RAY" status --address="127.0.0.1:$PORT" ;;
  *) echo "usage: $0 start [--cpus-head N] [--cpus-worker N] [--insecure] | env | mlflow [PORT] | status | stop" >&2; exit 2 ;;
esac
