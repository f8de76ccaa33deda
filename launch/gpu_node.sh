#!/usr/bin/env bash
# Train on one GPU node (any number of local GPUs: the ('data',) mesh spans them all).
#
#   launch/gpu_node.sh --config=configs/dhcnn.py:finetune --workdir=/data/runs/dhcnn [--dry-run]
#
# Creates .venv-gpu, installs the package with CUDA JAX, runs the training command and
# prints the results. --dry-run prints every command instead of running it.
set -euo pipefail
config=configs/dhcnn.py; workdir=/tmp/rshash_gpu; dry=0; extra=()
for a in "$@"; do
  case "$a" in
    --config=*) config=${a#*=} ;; --workdir=*) workdir=${a#*=} ;; --dry-run) dry=1 ;;
    --config.*) extra+=("$a") ;; -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
run() { if [[ $dry == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
cd "$(dirname "$0")/.."
run python3 -m venv .venv-gpu
run .venv-gpu/bin/python -m pip install -q -e ".[weights]" "jax[cuda12]"
run .venv-gpu/bin/python -m rshash_jax.main --config="$config" --workdir="$workdir" "${extra[@]}"
run cat "$workdir/results.json"
