"""Real multi-process runs on localhost (jax.distributed, gloo CPU collectives).

Every process is a fresh `python -m rshash_jax.main` with its own fake CPU devices. The
comparisons use the same total device count (4) and global batch, so the per-device
shards, reductions and therefore results are the same: results.json metrics are compared
exactly (a difference would mean a process read other data or skipped a step), codes
files bit for bit.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config=configs/dhcnn.py:tiny",
  "--config.data.generated_per_class=10",
  "--config.train.checkpoint_every_steps=4",
]
METRICS = (
  "map",
  "map_at",
  "precision_at",
  "recall_at",
  "pr_curve",
  "accuracy",
  "step",
  "bit_balance",
)


def _env(devices_per_process: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
    RSHASH_HEARTBEAT_TIMEOUT="10",
    RSHASH_INIT_TIMEOUT="60",
    RSHASH_BARRIER_TIMEOUT="300",
    PYTHON=sys.executable,
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  env.update(extra)
  return env


def _local(n: int, devices: int, *args, timeout: int = 300, **env) -> subprocess.CompletedProcess:
  """launch/local.sh n ARGS with `devices` CPU devices per process."""
  return subprocess.run(
    ["bash", os.path.join(REPO, "launch", "local.sh"), str(n), *args],
    cwd=REPO,
    env=_env(devices, RSHASH_LOCAL_DEVICES=str(devices), **env),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _single(devices: int, *args, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "rshash_jax.main", *args],
    cwd=REPO,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _ok(proc):
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
  return proc


def _results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _same_metrics(a: dict, b: dict):
  for key in METRICS:
    assert a[key] == b[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted tiny run on 1 process with 4 devices."""
  work = tmp_path_factory.mktemp("ref") / "w"
  _ok(_single(4, *TINY, f"--workdir={work}"))
  return work


def test_a_run_across_one_four_and_two_processes_equals_one_process(reference, tmp_path):
  """One run stopped and resumed on other process counts: steps 1-7 on 1 process x 4
  devices, 8-14 on 4 processes x 1, the rest and the evaluation on 2 processes x 2; its
  results equal the uninterrupted 1-process run's (each part checked: every stop and
  resume is exact only if every process read its own rows and took every step)."""
  ref = _results(reference)
  work = tmp_path / "w"
  _ok(_single(4, *TINY, f"--workdir={work}", "--config.train.max_steps_per_run=7"))
  proc = _ok(_local(4, 1, *TINY, f"--workdir={work}", "--config.train.max_steps_per_run=7"))
  assert "Resumed from checkpoint at step 7" in proc.stdout + proc.stderr
  assert not (work / "results.json").exists()
  proc = _ok(_local(2, 2, *TINY, f"--workdir={work}"))
  out = proc.stdout + proc.stderr
  assert "Resumed from checkpoint at step 14" in out
  assert "[process 0]" in out and "[process 1]" in out
  two = _results(work)
  _same_metrics(two, ref)
  assert (two["processes"], two["devices"], ref["processes"]) == (2, 4, 1)
  # results.json, plots, encoder: written once, no temporary left behind.
  leftovers = [
    os.path.join(d, f) for d, dirs, files in os.walk(work) for f in files + dirs if ".tmp" in f
  ]
  assert not leftovers, leftovers


def test_encode_on_two_processes_writes_the_codes_of_one(reference, tmp_path):
  data = _results(reference)["dataset_description"].split(" in ", 1)[1]
  _ok(
    _single(
      1,
      "encode",
      f"--encoder={reference}",
      f"--data={data}",
      f"--out={tmp_path / 'one.npz'}",
      "--chunk=16",
    )
  )
  _ok(
    _local(
      2,
      2,
      "encode",
      f"--encoder={reference}",
      f"--data={data}",
      f"--out={tmp_path / 'two.npz'}",
      "--chunk=16",
    )
  )
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  for key in one.files:
    np.testing.assert_array_equal(one[key], two[key], err_msg=key)
  assert not (tmp_path / "two.npz.parts").exists()
  query = os.path.join(data, "class02", "img0003.png")
  proc = _ok(
    _local(
      2, 2, "search", f"--encoder={reference}", f"--codes={tmp_path / 'two.npz'}", "--k=3", query
    )
  )
  hits = [line for line in proc.stdout.splitlines() if "class02" in line and "relevant" in line]
  assert len(hits) == 3 and all(line.startswith("[process 0]") for line in hits)  # printed once
  # A multi-index built by two processes (the primary builds and calibrates it on its own
  # devices while the other waits) answers the same hits on two processes.
  index = tmp_path / "idx"
  _ok(_local(2, 2, "index", f"--codes={tmp_path / 'two.npz'}", f"--out={index}"))
  assert (index / "multi_index.json").is_file()
  proc = _ok(
    _local(
      2,
      2,
      "search",
      f"--encoder={reference}",
      f"--codes={tmp_path / 'two.npz'}",
      f"--index={index}",
      "--k=3",
      query,
    )
  )
  assert [
    line for line in proc.stdout.splitlines() if "class02" in line and "relevant" in line
  ] == hits


def test_bad_process_setups_fail_with_a_clear_error(tmp_path):
  # A global batch the process count does not divide (2 processes, batch 9).
  proc = _local(2, 1, *TINY, f"--workdir={tmp_path / 'w'}", "--config.train.batch_size=9")
  assert proc.returncode == 2, proc.stdout[-3000:]
  assert re.search(
    r"rshash: error: process [01] of 2: train.batch_size=9 is not divisible by the 2 processes",
    proc.stdout,
  )
  assert "Traceback" not in proc.stdout
  assert "launch/local.sh: process" in proc.stderr
  # No coordinator: process 1 alone gives up after RSHASH_INIT_TIMEOUT with a message.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = _env(
    1,
    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
    JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID="1",
    RSHASH_INIT_TIMEOUT="3",
  )
  t0 = time.monotonic()
  proc = subprocess.run(
    [sys.executable, "-m", "rshash_jax.main", *TINY, f"--workdir={tmp_path / 'x'}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2 and time.monotonic() - t0 < 60
  assert (
    f"rshash: error: cannot reach the coordinator at localhost:{port} within 3 s" in proc.stderr
  )
  assert "Traceback" not in proc.stderr
  env.update(JAX_PROCESS_ID="2")
  proc = subprocess.run(
    [sys.executable, "-m", "rshash_jax.main", *TINY, f"--workdir={tmp_path / 'x'}"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert (
    proc.returncode == 2
    and "rshash: error: JAX_PROCESS_ID=2 must be in [0, JAX_NUM_PROCESSES=2)" in proc.stderr
  )


def test_a_killed_process_stops_the_other_and_the_run_resumes(tmp_path, reference):
  """Process 1 is killed (SIGKILL) after the first checkpoint: process 0 stops within the
  heartbeat timeout, saying process 1 is gone; only complete step directories exist (orbax renames a
  step into place when it is whole), and a 1-process restart resumes from the last one and
  finishes."""
  work = tmp_path / "w"
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = [
    sys.executable,
    "-m",
    "rshash_jax.main",
    *TINY,
    f"--workdir={work}",
    "--config.train.epochs=400",
    "--config.train.checkpoint_every_steps=40",
  ]
  procs = []
  for i in range(2):
    env = _env(
      2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
    )
    procs.append(
      subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
    )
  try:
    deadline = time.monotonic() + 240
    ckpt = work / "checkpoints"
    while not (ckpt.is_dir() and any(d.isdigit() and int(d) >= 40 for d in os.listdir(ckpt))):
      assert time.monotonic() < deadline, "no checkpoint appeared"
      assert procs[0].poll() is None and procs[1].poll() is None, procs[0].communicate()[1][-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    _, err0 = procs[0].communicate(timeout=120)
    stopped_after = time.monotonic() - t_kill
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert procs[0].returncode != 0
  assert stopped_after < 60, stopped_after  # heartbeat timeout 10 s, plus detection
  # Process 0 fails in a collective (gloo: connection reset) and names the lost process, or
  # the coordination service aborts it first, listing the unhealthy task.
  assert (
    "rshash: process 1 is gone" in err0
    or "tasks are unhealthy (stopped sending heartbeats):\n1\n" in err0
  ), err0[-3000:]
  steps = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert (
    steps and steps[-1] >= 40 and all(s == 1 or s % 40 == 0 for s in steps)
  )  # orbax also keeps step 1
  # Resume on one process with 4 devices.
  proc = _ok(
    _single(
      4,
      *TINY,
      f"--workdir={work}",
      "--config.train.epochs=400",
      "--config.train.checkpoint_every_steps=40",
    )
  )
  assert f"Resumed from checkpoint at step {steps[-1]}" in proc.stderr
  res = _results(work)
  # Chance is ~0.2 on 6 classes; the resumed run ends at 0.89.
  assert res["step"] == 400 * 6 and res["map"] >= 0.85, res["map"]


def test_scene_windows_encode_on_two_processes_as_on_one(reference, tmp_path):
  """encode --tile: the windows of a scene archive are shared out over two processes like
  images; the codes file (footprints included) is the one of a single process."""
  import rasterio
  from PIL import Image
  from rasterio.transform import from_origin

  data = _results(reference)["dataset_description"].split(" in ", 1)[1]
  files = sorted(
    os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith(".png")
  )[:40]
  cells = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # 32 x 32 each
  mosaic = cells.reshape(5, 8, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(160, 256, 3)
  (tmp_path / "scenes").mkdir()
  with rasterio.open(
    tmp_path / "scenes" / "a.tif",
    "w",
    driver="GTiff",
    width=256,
    height=160,
    count=3,
    dtype="uint8",
    crs="EPSG:32631",
    transform=from_origin(500000, 5000000, 10, 10),
  ) as dst:
    dst.write(mosaic.transpose(2, 0, 1))
  args = [
    "encode",
    f"--encoder={reference}",
    f"--data={tmp_path / 'scenes'}",
    "--tile=32",
    "--stride=16",
    "--chunk=16",
  ]
  _ok(_single(1, *args, f"--out={tmp_path / 'one.npz'}"))
  _ok(_local(2, 2, *args, f"--out={tmp_path / 'two.npz'}"))
  one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
  assert len(one["codes"]) == 9 * 15 and "footprint" in one.files
  for key in one.files:
    np.testing.assert_array_equal(one[key], two[key], err_msg=key)
