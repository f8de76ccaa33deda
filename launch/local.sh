#!/usr/bin/env bash
# Run one rshash_jax command as N JAX processes on this machine (multi-process JAX over
# localhost; gloo collectives on CPU), e.g. to try the multi-host path without a cluster.
#
#   launch/local.sh 2 --config=configs/dhcnn.py:tiny --workdir=/tmp/mp2
#   launch/local.sh 2 encode --encoder=/tmp/mp2 --data=DIR --out=/tmp/codes.npz
#   RSHASH_LOCAL_DEVICES=2 launch/local.sh 2 ...   # 2 CPU devices per process (XLA_FLAGS)
#
# Each output line is prefixed with "[process i]". The script exits with the first
# non-zero exit status (and names the process); the other processes get RSHASH_GRACE
# seconds (default 20) to stop on their own, then are terminated. Environment:
# PYTHON (default: python), RSHASH_PORT (default: a free port), and everything
# rshash_jax/parallel/distributed.py reads (RSHASH_INIT_TIMEOUT, RSHASH_HEARTBEAT_TIMEOUT, ...).
set -uo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh N [python -m rshash_jax.main arguments]" >&2
  exit 2
fi
n=$1; shift
py=${PYTHON:-python}
port=${RSHASH_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [[ -n ${RSHASH_LOCAL_DEVICES:-} ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$RSHASH_LOCAL_DEVICES"
fi
export JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

declare -A index_of=()
pids=()
for ((i = 0; i < n; i++)); do
  (JAX_PROCESS_ID=$i exec "$py" -m rshash_jax.main "$@" 2>&1 | sed -u "s/^/[process $i] /") &
  pids+=($!)
  index_of[$!]=$i
done

stop_all() {
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  wait -n -p done_pid "${running[@]}"
  rc=$?
  left=()
  for p in "${running[@]}"; do [[ $p != "$done_pid" ]] && left+=("$p"); done
  running=("${left[@]}")
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch/local.sh: process ${index_of[$done_pid]} of $n exited with status $rc" >&2
    grace=${RSHASH_GRACE:-20}
    (sleep "$grace"; stop_all) &
    killer=$!
  fi
done
[[ -n ${killer:-} ]] && kill "$killer" 2>/dev/null
exit $status
