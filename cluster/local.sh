#!/usr/bin/env bash
# A Ray cluster of separate processes on this machine: the way to try kdsearch's cluster path
# (`kdsearch search SPACE --address ...`) on a laptop, without a cloud.
#
#   cluster/local.sh [--dir DIR] start N [--gpus G] [--worker-cpus C] [--head-cpus C] [--no-token] [--timeout S]
#   cluster/local.sh [--dir DIR] status
#   cluster/local.sh [--dir DIR] env        # the export lines a driver needs: eval "$(cluster/local.sh env)"
#   cluster/local.sh [--dir DIR] stop [--timeout S]
#
# `start N` starts a Ray head (0 CPUs unless --head-cpus, and no GPU: trials run on the workers, as
# on a real cluster) and N worker nodes with 1 CPU each (--worker-cpus C: C each). `--gpus G` has
# each worker declare G GPUs (`ray start --num-gpus G`), whether or not the machine has any: Ray
# schedules on declared GPUs (fractions of one included) and sets each worker process's
# CUDA_VISIBLE_DEVICES, and a trial whose torch sees no CUDA says so once and trains on the CPU, so
# GPU scheduling can be tried on a laptop. Without --gpus each worker declares the GPUs Ray detects
# here (all of this machine's: N workers then share them). Every node is its own `ray start --block` process
# tree in its own session (setsid), with its own --temp-dir and its own working directory, so
# nothing is shared between nodes but what a real cluster shares (the network; put the run
# directory, --storage, on a path every node sees). Ports are picked free, below the kernel's
# ephemeral range and above Ray's worker ports (never 6379/8265: other Ray clusters, tests
# included, may run on this machine at the same time). It waits until all N+1 nodes have
# joined, writes the head address (127.0.0.1:PORT) to STATE/address and prints it on stdout
# (and nothing else there: `addr=$(cluster/local.sh start 2)`).
#
# `stop` stops exactly what `start` started: the recorded node pids, the processes of their
# sessions and their descendants (SIGTERM, a drain of up to --timeout s, then SIGKILL). Never by
# name and never `ray stop`, which would stop every Ray on the machine.
#
# Token authentication (Ray >= 2.52; ray.init() turns it on by default for new local clusters
# from 2.59, `ray start --head` only when a token exists or RAY_AUTH_MODE=token): `start`
# generates a fresh random token into STATE/auth_token (mode 600) and starts every node with
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=STATE/auth_token (RAY_AUTH_TOKEN unset: it would
# take precedence). A driver needs the same two variables: an explicit address
# (--address 127.0.0.1:PORT, RAY_ADDRESS) never turns token mode on by itself, and
# ~/.ray/auth_token (Ray's default) is not this cluster's token. STATE/env holds the lines.
# `--no-token` starts the nodes with RAY_AUTH_MODE=disabled instead (no STATE/auth_token; STATE/env
# says RAY_AUTH_MODE=disabled): a cluster anyone who reaches its ports can use, for trying what a
# driver says on one (tests/test_token_probe.py).
#
# The dashboard listens on 127.0.0.1 only (--dashboard-host 127.0.0.1); Ray's gRPC servers
# (GCS, raylets) listen on every interface whatever --node-ip-address says (ray start also
# replaces a loopback --node-ip-address by this machine's address), and the token is what
# keeps other hosts out.
#
# State folder (default ${KDSEARCH_LOCAL_CLUSTER:-${TMPDIR:-/tmp}/kdsearch-local-cluster}):
#   STATE/address        127.0.0.1:PORT, the GCS address drivers and `ray start --address` use
#   STATE/dashboard      http://127.0.0.1:PORT, the dashboard and job API (`ray job submit`)
#   STATE/auth_token     the cluster's token (mode 600)
#   STATE/env            export RAY_ADDRESS=..., RAY_API_SERVER_ADDRESS=..., RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH=...
#   STATE/pids           one line per node: NAME PID (the session leader: its `ray start --block`)
#   STATE/nodes/NAME/    cwd/ (its working directory), ray.log (its output), pid, start_time,
#                        temp_dir (its Ray --temp-dir: here under tmp/, or under /tmp/kdsearch-ray.*
#                        when STATE's path is too long for Ray's unix sockets)
# `stop` removes address, dashboard, env, auth_token and pids, and keeps the logs.
#
# Needs Linux (setsid, ps -o sid, /proc) and Ray: $KDSEARCH_RAY, else this repository's
# .venv/bin/ray, else `ray` on PATH.
set -euo pipefail

STATE="${KDSEARCH_LOCAL_CLUSTER:-${TMPDIR:-/tmp}/kdsearch-local-cluster}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT=60
HEAD_CPUS=0
WORKER_CPUS=1
WORKER_GPUS="" # empty: the GPUs Ray detects on this machine
TOKEN=1        # 0 (--no-token): the nodes start with RAY_AUTH_MODE=disabled
# Ray's unix socket paths are TEMP_DIR/session_<date>_<pid>/sockets/plasma_store and must fit in
# 107 bytes: a temp dir longer than this goes to a short folder under /tmp instead.
MAX_TEMP_DIR_LEN=40

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
say() { echo "local.sh: $*" >&2; }
die() {
  say "$*"
  exit 1
}

find_ray() {
  if [[ -n "${KDSEARCH_RAY:-}" ]]; then
    RAY="$KDSEARCH_RAY"
  elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
  elif command -v ray >/dev/null 2>&1; then
    RAY="$(command -v ray)"
  else
    die "no ray: install this package (make install) or set KDSEARCH_RAY to a ray executable"
  fi
  [[ -x "$RAY" ]] || die "$RAY: not an executable"
  # The Python that runs this ray (the script's #! line), for the helpers below
  local shebang
  shebang="$(head -n 1 "$RAY")"
  PY="${shebang#\#!}"
  PY="${PY%% *}"
  if [[ "$shebang" != "#!"* || ! -x "$PY" ]]; then
    PY="$(dirname "$RAY")/python"
    [[ -x "$PY" ]] || PY="python3"
  fi
  command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) is missing: local.sh needs Linux"
}

# --- processes --------------------------------------------------------------------------------

start_time_of() { # the kernel's start time of pid $1 (field 22 of /proc/PID/stat), empty if gone
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }" # the fields after "(comm) "; comm may hold spaces
  # shellcheck disable=SC2086 # split on purpose
  set -- $stat
  echo "${20}"
}

# Every process of node $1 (a folder under STATE/nodes): the processes of its session (its
# leader ran setsid, so the session id is the leader's pid; a session id is not reused while a
# process holds it) and, while the leader is the process we started, the leader's descendants.
node_processes() {
  local dir="$1" pid start
  pid="$(cat "$dir/pid" 2>/dev/null)" || return 0
  start="$(cat "$dir/start_time" 2>/dev/null || true)"
  local root=""
  if [[ -n "$start" && "$(start_time_of "$pid")" == "$start" ]]; then
    root="$pid"
  fi
  ps -e -o pid=,ppid=,sid= | awk -v sid="$pid" -v root="$root" -v self="$$" '
    { ppid[$1] = $2; if ($3 == sid) mine[$1] = 1 }
    END {
      if (root != "") {
        mine[root] = 1
        do { grew = 0; for (p in ppid) if (!(p in mine) && (ppid[p] in mine)) { mine[p] = 1; grew = 1 } } while (grew)
      }
      for (p in mine) if (p != self && (p in ppid)) print p
    }'
}

all_node_dirs() { # workers first, the head last: the order to stop them in
  local d
  for d in "$STATE"/nodes/worker-*; do [[ -d "$d" ]] && echo "$d"; done
  [[ -d "$STATE/nodes/head" ]] && echo "$STATE/nodes/head"
  return 0
}

running_processes() {
  local d
  while IFS= read -r d; do node_processes "$d"; done < <(all_node_dirs)
}

signal_all() { # $1: signal; every process of every node
  local p
  for p in $(running_processes); do kill "-$1" "$p" 2>/dev/null || true; done
}

wait_gone() { # $1: seconds; 0 when no process of any node is left
  local deadline=$((SECONDS + $1))
  while [[ -n "$(running_processes)" ]]; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

stop_nodes() { # $1: seconds the nodes get to drain after SIGTERM
  local d pid start
  # First the `ray start --block` leaders: on SIGTERM each drains and stops its own node.
  while IFS= read -r d; do
    pid="$(cat "$d/pid" 2>/dev/null)" || continue
    start="$(cat "$d/start_time" 2>/dev/null || true)"
    if [[ -n "$start" && "$(start_time_of "$pid")" == "$start" ]]; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done < <(all_node_dirs)
  wait_gone "$1" && return 0
  # Then whatever is left of their sessions and trees.
  signal_all TERM
  wait_gone 5 && return 0
  signal_all KILL
  wait_gone 5
}

cleanup_state() {
  local root
  root="$(cat "$STATE/temp_root" 2>/dev/null || true)"
  case "$root" in
  /tmp/kdsearch-ray.*) rm -rf "$root" ;;
  esac
  rm -f "$STATE/address" "$STATE/dashboard" "$STATE/env" "$STATE/auth_token" "$STATE/pids" "$STATE/temp_root"
}

# --- start ------------------------------------------------------------------------------------

# Free TCP ports: random ones between Ray's worker ports (10002-19999) and the kernel's ephemeral
# range (where every port=0 listener, Ray's own included, gets its port), checked by binding them.
free_ports() {
  "$PY" - "$1" <<'EOF'
import random, socket, sys

try:
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
except OSError:
    low = 32768
ports = list(range(20000, max(low, 20100)))
random.shuffle(ports)
picked = []
for port in ports:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", port))  # every interface: Ray's gRPC servers listen there
    except OSError:
        continue
    picked.append(port)
    if len(picked) == int(sys.argv[1]):
        break
print(*picked)
EOF
}

has_ray_client() { # ray start defaults the Ray Client server to port 10001 when ray[client] is installed
  "$PY" -c 'import sys; from ray._private.utils import get_ray_client_dependency_error as e; sys.exit(e() is not None)' 2>/dev/null
}

start_node() { # NAME CPUS TEMP_DIR RAY_START_ARGS...
  local name="$1" cpus="$2" temp="$3"
  shift 3
  local dir="$STATE/nodes/$name"
  mkdir -p "$dir/cwd" "$temp"
  echo "$temp" >"$dir/temp_dir"
  (
    cd "$dir/cwd"
    exec setsid "$RAY" start --block --disable-usage-stats --num-cpus "$cpus" --temp-dir "$temp" \
      --node-ip-address 127.0.0.1 --dashboard-agent-listen-port 0 --min-worker-port 0 --max-worker-port 0 "$@"
  ) </dev/null >"$dir/ray.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/pid"
  echo "$name $pid" >>"$STATE/pids"
  local start=""
  for _ in $(seq 100); do # until setsid has made it a session leader
    if [[ "$(ps -o sid= -p "$pid" | tr -d ' ')" == "$pid" ]]; then
      start="$(start_time_of "$pid")"
      break
    fi
    sleep 0.05
  done
  [[ -n "$start" ]] || die "node $name (pid $pid) did not start: $(tail -n 5 "$dir/ray.log")"
  echo "$start" >"$dir/start_time"
}

wait_for_nodes() { # ADDRESS COUNT SECONDS
  "$PY" - "$@" <<'EOF'
import logging, sys, time

import ray

address, want, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])
ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= want:
        break
    if time.time() > deadline:
        sys.exit(f"{len(alive)} of {want} nodes joined in time")
    time.sleep(0.5)
ray.shutdown()
EOF
}

START_OK=0
on_start_exit() {
  if [[ "$START_OK" != 1 && -f "$STATE/pids" ]]; then
    say "start failed; stopping the nodes it started (logs: $STATE/nodes/*/ray.log)"
    stop_nodes 10 || true
    cleanup_state
  fi
}

cmd_start() {
  local n="${1:-}"
  [[ "$n" =~ ^[0-9]+$ ]] || usage
  shift
  while (($#)); do
    case "$1" in
    --head-cpus) HEAD_CPUS="${2:?}" && shift 2 ;;
    --worker-cpus) WORKER_CPUS="${2:?}" && shift 2 ;;
    --gpus) WORKER_GPUS="${2:?}" && shift 2 ;;
    --no-token) TOKEN=0 && shift ;;
    --timeout) TIMEOUT="${2:?}" && shift 2 ;;
    *) usage ;;
    esac
  done
  # ray start takes whole numbers of CPUs and GPUs (a trial may still ask for a fraction)
  [[ "$HEAD_CPUS" =~ ^[0-9]+$ ]] || die "--head-cpus $HEAD_CPUS: a whole number >= 0"
  [[ "$WORKER_CPUS" =~ ^[0-9]+$ && "$WORKER_CPUS" -ge 1 ]] || die "--worker-cpus $WORKER_CPUS: a whole number >= 1"
  [[ -z "$WORKER_GPUS" || "$WORKER_GPUS" =~ ^[0-9]+$ ]] || die "--gpus $WORKER_GPUS: a whole number >= 0"
  find_ray
  mkdir -p "$STATE"
  STATE="$(cd "$STATE" && pwd)"
  if [[ -n "$(running_processes)" ]]; then
    die "a cluster started from $STATE still runs: cluster/local.sh --dir $STATE stop"
  fi
  cleanup_state
  rm -rf "$STATE/nodes" "$STATE/tmp"
  trap on_start_exit EXIT

  if [[ "$TOKEN" == 1 ]]; then
    # The token: fresh for each cluster, readable by this user only.
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE/auth_token")
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
  else
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
  fi
  unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS
  export RAY_USAGE_STATS_ENABLED=0
  # The nodes (and the jobs `ray job submit` starts on them) find kdsearch beside their ray
  PATH="$(dirname "$RAY"):$PATH"
  export PATH

  local temp_root="$STATE/tmp"
  if ((${#temp_root} + 1 + ${#n} + 7 > MAX_TEMP_DIR_LEN)); then # +/worker-N
    temp_root="$(mktemp -d /tmp/kdsearch-ray.XXXXXX)"
    echo "$temp_root" >"$STATE/temp_root"
  fi

  local client_args=() ports
  if has_ray_client; then
    read -r -a ports <<<"$(free_ports 3)"
    client_args=(--ray-client-server-port "${ports[2]}")
  else
    read -r -a ports <<<"$(free_ports 2)"
  fi
  local gcs_port="${ports[0]}" dashboard_port="${ports[1]}"
  local address="127.0.0.1:$gcs_port"

  : >"$STATE/pids"
  start_node head "$HEAD_CPUS" "$temp_root/head" --head --num-gpus 0 --port "$gcs_port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" "${client_args[@]}"
  # The head has started once it wrote its address into its temp dir.
  local deadline=$((SECONDS + TIMEOUT))
  until [[ -s "$temp_root/head/ray_current_cluster" ]]; do
    [[ -n "$(node_processes "$STATE/nodes/head")" ]] || die "the head stopped: $(tail -n 5 "$STATE/nodes/head/ray.log")"
    ((SECONDS < deadline)) || die "the head did not start in ${TIMEOUT}s: $(tail -n 5 "$STATE/nodes/head/ray.log")"
    sleep 0.2
  done
  local i gpu_args=() gpus_said="the GPUs Ray detects here"
  if [[ -n "$WORKER_GPUS" ]]; then
    gpu_args=(--num-gpus "$WORKER_GPUS")
    gpus_said="$WORKER_GPUS GPUs"
  fi
  for ((i = 1; i <= n; i++)); do
    start_node "worker-$i" "$WORKER_CPUS" "$temp_root/worker-$i" --address "$address" "${gpu_args[@]}"
  done
  wait_for_nodes "$address" $((n + 1)) "$((deadline > SECONDS ? deadline - SECONDS : 1))" \
    || die "the nodes did not all join in ${TIMEOUT}s (logs: $STATE/nodes/*/ray.log)"

  echo "$address" >"$STATE/address"
  echo "http://127.0.0.1:$dashboard_port" >"$STATE/dashboard"
  write_env >"$STATE/env"
  START_OK=1
  say "$((n + 1)) nodes joined (a head with $HEAD_CPUS CPUs and no GPU, $n workers with $WORKER_CPUS CPUs and $gpus_said each); state in $STATE"
  say "dashboard: http://127.0.0.1:$dashboard_port; for a driver or \`ray job submit\`, run:"
  sed 's/^/  /' "$STATE/env" >&2
  say "then: kdsearch search SPACE --address $address (or --address auto); stop: cluster/local.sh --dir $STATE stop"
  echo "$address"
}

write_env() {
  local q
  printf 'export RAY_ADDRESS=%s\n' "$(cat "$STATE/address")"
  printf 'export RAY_API_SERVER_ADDRESS=%s\n' "$(cat "$STATE/dashboard")"
  if [[ -f "$STATE/auth_token" ]]; then
    printf 'export RAY_AUTH_MODE=token\n'
    printf -v q '%q' "$STATE/auth_token"
    printf 'export RAY_AUTH_TOKEN_PATH=%s\n' "$q"
  else
    printf 'export RAY_AUTH_MODE=disabled\n'
    printf 'unset RAY_AUTH_TOKEN_PATH\n'
  fi
  printf 'unset RAY_AUTH_TOKEN\n'
}

# --- the other commands -----------------------------------------------------------------------

cmd_stop() {
  while (($#)); do
    case "$1" in
    --timeout) TIMEOUT="${2:?}" && shift 2 ;;
    *) usage ;;
    esac
  done
  [[ -d "$STATE" ]] || {
    say "nothing to stop in $STATE"
    return 0
  }
  STATE="$(cd "$STATE" && pwd)"
  if [[ -z "$(running_processes)" ]]; then
    cleanup_state
    say "nothing runs from $STATE"
    return 0
  fi
  if ! stop_nodes "$TIMEOUT"; then
    die "still running after SIGKILL: $(running_processes | tr '\n' ' ')"
  fi
  cleanup_state
  say "stopped every node started from $STATE"
}

cmd_status() {
  [[ -d "$STATE/nodes" ]] || die "no cluster in $STATE"
  STATE="$(cd "$STATE" && pwd)"
  local d name procs up=0 total=0
  while IFS= read -r d; do
    name="$(basename "$d")"
    procs="$(node_processes "$d" | wc -l)"
    total=$((total + 1))
    if ((procs > 0)); then
      up=$((up + 1))
      echo "$name: pid $(cat "$d/pid"), $procs processes, temp dir $(cat "$d/temp_dir"), cwd $d/cwd"
    else
      echo "$name: not running (log: $d/ray.log)"
    fi
  done < <(all_node_dirs)
  if [[ -f "$STATE/address" ]]; then
    echo "address: $(cat "$STATE/address"), dashboard: $(cat "$STATE/dashboard"), env: $STATE/env"
  fi
  ((up > 0)) || return 1
  ((up == total)) || say "$((total - up)) of $total nodes are gone"
}

cmd_env() {
  [[ -f "$STATE/env" ]] || die "no running cluster in $STATE (cluster/local.sh start N)"
  cat "$STATE/env"
}

# --- main -------------------------------------------------------------------------------------

args=()
while (($#)); do
  case "$1" in
  --dir) STATE="${2:?--dir needs a folder}" && shift 2 ;;
  --dir=*) STATE="${1#--dir=}" && shift ;;
  -h | --help) usage ;;
  *) args+=("$1") && shift ;;
  esac
done
((${#args[@]})) || usage
command="${args[0]}"
args=("${args[@]:1}")
case "$command" in
start) cmd_start "${args[@]}" ;;
stop) cmd_stop "${args[@]}" ;;
status) cmd_status ;;
env) cmd_env ;;
*) usage ;;
esac
