"""The launch scripts' dry runs print the commands they would run."""

import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args):
  proc = subprocess.run(
    ["bash", os.path.join(REPO, "launch", script), "--dry-run", *args],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  return [line for line in proc.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_vm_dry_run_multi_host():
  lines = _dry(
    "tpu_vm.sh",
    "--name=pod",
    "--type=v4-32",
    "--config=configs/dhcnn.py:finetune",
    "--workdir=gs://bucket/run",
    "--config.model.bits=32",
  )
  text = "\n".join(lines)
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create pod") and "v4-32" in lines[0]
  assert "git -C" in text and "archive" in text
  run = [line for line in lines if "rshash_jax.main" in line]
  assert len(run) == 1 and "--worker=all" in run[0] and "RSHASH_DISTRIBUTED=1" in run[0]
  assert "--config.model.bits=32" in run[0] and "gs://bucket/run" in run[0]
  assert "gsutil" in text and lines[-1].startswith("+ gcloud compute tpus tpu-vm delete pod")


def test_tpu_vm_keep_skips_teardown_and_rejects_unknown_flags():
  assert not any("delete" in line for line in _dry("tpu_vm.sh", "--keep"))
  proc = subprocess.run(
    ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--bogus"], capture_output=True, text=True
  )
  assert proc.returncode == 2 and "unknown argument: --bogus" in proc.stderr


def test_gpu_node_dry_run():
  lines = _dry("gpu_node.sh", "--config=configs/mrhash.py:local", "--workdir=/runs/m")
  assert any("cuda12" in line and "pip install" in line for line in lines)
  assert any(
    "rshash_jax.main --config=configs/mrhash.py:local --workdir=/runs/m" in line for line in lines
  )
