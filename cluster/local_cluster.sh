#!/usr/bin/env bash
# A local multi-node Ray cluster on this host for development and tests: a head node and one more worker node,
# the dashboard (job submission API) on 127.0.0.1:8265; optionally an MLflow server on 127.0.0.1.
#
#   cluster/local_cluster.sh start [--cpus-head N] [--cpus-worker N]   # head + 1 worker node
#   cluster/local_cluster.sh mlflow [PORT]                            # MLflow server, SQLite + artifact dir
#   cluster/local_cluster.sh status | stop
#
# Auth: `ray start` turns on token auth in Ray 2.60, which the `ray job` CLI then needs; on a trusted dev host we
# start the cluster with RAY_AUTH_MODE=disabled so that plain `ray job submit` works (export the same in the
# shell that submits).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
RAY="$VENV_BIN/ray"
STATE="${BRCD_CLUSTER_STATE:-$REPO/.cluster}"
PORT="${RAY_PORT:-6379}"
DASH_PORT="${RAY_DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE=disabled
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.venv/torch_extensions}"

start() {
  local head_cpus=1 worker_cpus=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpus-head) head_cpus="$2"; shift 2 ;;
      --cpus-worker) worker_cpus="$2"; shift 2 ;;
      *) echo "unknown option $1 (allowed: --cpus-head N, --cpus-worker N)" >&2; exit 2 ;;
    esac
  done
  mkdir -p "$STATE"
  "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus="$head_cpus" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH_PORT" --include-dashboard=true \
    --disable-usage-stats >"$STATE/head.log" 2>&1
  # A second raylet on the same host: a real second node as far as Ray's scheduler is concerned.
  "$RAY" start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus="$worker_cpus" \
    --disable-usage-stats >"$STATE/worker.log" 2>&1
  for _ in $(seq 60); do
    if "$VENV_BIN/python" - "$DASH_PORT" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
PY
      echo "ray cluster up: 2 nodes, dashboard http://127.0.0.1:$DASH_PORT (RAY_ADDRESS=http://127.0.0.1:$DASH_PORT)"
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
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
      echo "mlflow server up: http://127.0.0.1:$port (tracking.uri=http://127.0.0.1:$port)"
      return 0
    fi
    sleep 1
  done
  echo "mlflow server did not answer on 127.0.0.1:$port; see $STATE/mlflow.log" >&2
  exit 1
}

stop() {
  "$RAY" stop --force >/dev/null 2>&1 || true
  if [ -f "$STATE/mlflow.pid" ]; then
    kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null || true
    rm -f "$STATE/mlflow.pid"
  fi
  echo "stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  mlflow) shift; mlflow_server "$@" ;;
  stop) stop ;;
  status) "$RAY" status --address="127.0.0.1:$PORT" ;;
  *) echo "usage: $0 start [--cpus-head N] [--cpus-worker N] | mlflow [PORT] | status | stop" >&2; exit 2 ;;
esac
