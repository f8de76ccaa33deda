#!/usr/bin/env bash
# Train on a Cloud TPU VM (single host or a multi-host pod slice) with the same command
# as on a laptop; every worker runs it under jax.distributed (RSHASH_DISTRIBUTED=1).
#
#   launch/tpu_vm.sh --name=rshash-v4 --zone=us-central2-b --type=v4-8 \
#       --config=configs/dhcnn.py:finetune --workdir=gs://BUCKET/dhcnn [--dry-run] [--keep]
#   launch/tpu_vm.sh --name=rshash-pod --type=v4-32 ...        # multi-host: 4 workers
#
# Steps: create the VM, copy this repository to every worker, install, run on all
# workers, copy results.json/plots from worker 0 to ./launch_results/NAME, delete the VM
# (unless --keep). --dry-run prints every command instead of running it.
set -euo pipefail
name=rshash-tpu; zone=us-central2-b; type=v4-8; version=tpu-ubuntu2204-base
config=configs/dhcnn.py; workdir=/tmp/rshash_run; dry=0; keep=0; extra=()
for a in "$@"; do
  case "$a" in
    --name=*) name=${a#*=} ;; --zone=*) zone=${a#*=} ;; --type=*) type=${a#*=} ;;
    --version=*) version=${a#*=} ;; --config=*) config=${a#*=} ;; --workdir=*) workdir=${a#*=} ;;
    --dry-run) dry=1 ;; --keep) keep=1 ;; --config.*) extra+=("$a") ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done
run() { if [[ $dry == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
repo=$(cd "$(dirname "$0")/.." && pwd)
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command)
run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$type" --version="$version"
src=/tmp/rshash_jax_src.tar.gz  # the committed tree only: no virtualenvs, no runs
run git -C "$repo" archive --format=tar.gz -o "$src" HEAD
run gcloud compute tpus tpu-vm scp "$src" "$name":rshash_jax_src.tar.gz --zone="$zone" --worker=all
run "${ssh_all[@]}" "mkdir -p rshash_jax_repo && tar xzf rshash_jax_src.tar.gz -C rshash_jax_repo && cd rshash_jax_repo && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[weights]' 'jax[tpu]'"
cmd="cd rshash_jax_repo && . .venv/bin/activate && RSHASH_DISTRIBUTED=1 python -m rshash_jax.main --config=$config --workdir=$workdir ${extra[*]:-}"
run "${ssh_all[@]}" "$cmd"
run mkdir -p "launch_results/$name"
if [[ $workdir == gs://* ]]; then
  run gsutil -m cp "$workdir/results.json" "$workdir/*.png" "launch_results/$name/"
else
  run gcloud compute tpus tpu-vm scp "$name:$workdir/results.json" "$name:$workdir/pr_curve.png" \
      "launch_results/$name/" --zone="$zone" --worker=0
fi
if [[ $keep == 0 ]]; then
  run gcloud compute tpus tpu-vm delete "$name" --zone="$zone" --quiet
fi
