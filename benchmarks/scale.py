r"""The data path at archive scale: decode rate, memory flat in N, 1 vs 2 processes.

    python benchmarks/scale.py                      # 50,000 generated 64x64 PNG scenes
    python benchmarks/scale.py --sizes=10000,50000 --archive=/tmp/rshash_scale

What it measures, on a generated class-folder archive (10 classes, --max images; written
once into --archive, ~45 s):
  1. decode + resize images/s of the tf.data pipeline (`input_pipeline.eval_batches`) at 1
     and 2 threads, to the 224 px an ImageNet backbone takes (after a warm-up; interleaved,
     median of 3).
  2. peak memory of DHCNN frozen runs (tiny_cnn backbone at 64 px, 1 epoch, 2% queries) on
     the first N images, for each N of --sizes: the run that extracts the feature cache,
     then a run that trains and evaluates from that cache. Each is a fresh process, polled
     every 20 ms: peak RssAnon (the process's own memory) and peak VmRSS (which also counts
     pages of the memory-mapped feature cache that were read, file-backed and reclaimable).
     Flat in N means the anonymous peak does not grow with the archive. Each is run
     --repeats times (3), interleaved over the sizes; the median and the range are recorded
     (one run's peak varied by ~40 MiB here).
  3. wall time of the same training run (cache present) on 1 process with 2 devices and on
     2 processes with 1 device each (launch/local.sh), the same global batch.
  4. (--parts=mrhash) peak memory of MrHash tiny runs at 64 px (features of both sources
     extracted, both stages, eval) on the first N images, for each N of --sizes.
"""

import argparse
import os
import subprocess
import sys
import time

import _record
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rshash_jax.data import datasets, input_pipeline  # noqa: E402

ARGS = None


def archive(root: str, n: int, classes: int = 10, size: int = 64) -> str:
  """root/n<N>/<class>/img*.png: the first N images of the generated archive (hard links)."""
  full = datasets.generate(
    root, num_classes=classes, per_class=ARGS.max // classes, size=size, seed=0
  )
  base = os.path.dirname(full.paths[0].rsplit(os.sep, 1)[0])
  if n == ARGS.max:
    return base
  sub = os.path.join(root, f"n{n}")
  if not os.path.isdir(sub):
    tmp = sub + ".tmp"
    for c in sorted(os.listdir(base)):
      if c.startswith("."):
        continue
      os.makedirs(os.path.join(tmp, c), exist_ok=True)
      for f in sorted(os.listdir(os.path.join(base, c)))[: n // classes]:
        os.link(os.path.join(base, c, f), os.path.join(tmp, c, f))
    os.replace(tmp, sub)
  return sub


def decode_rate(data: str, threads: int, count: int) -> float:
  table = datasets.class_folder(data, check_images=False)
  source = input_pipeline.ImageSource(table, 224)
  idx = np.random.default_rng(0).permutation(len(table))[:count]
  t0 = time.perf_counter()
  n = sum(
    len(b["id"]) for b in input_pipeline.eval_batches(source, idx, global_batch=64, threads=threads)
  )
  return n / (time.perf_counter() - t0)


def _status(pid: int):
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
          out[key] = int(value.split()[0]) / 1024
  except OSError:
    pass
  return out


def run(cmd, env=None):
  """(wall s, peak RssAnon MiB, peak VmRSS MiB, stdout) of a command, polling /proc. Its
  output goes to temporary files (a pipe nobody reads would stall a talkative child)."""
  import tempfile  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
    anon = rss = 0.0
    while proc.poll() is None:
      st = _status(proc.pid)
      anon, rss = max(anon, st.get("RssAnon", 0)), max(rss, st.get("VmRSS", 0))
      time.sleep(0.02)
    wall = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return wall, anon, rss, out.read()


def _run_flags(cache):
  """The flags every timed training run shares: 2% queries, a shared feature cache, big
  evaluation batches, no checkpoints or logs in the way."""
  return [
    "--config.data.train_ratio=0.98",
    f"--config.features.cache_dir={cache}",
    "--config.features.batch_size=256",
    "--config.eval.batch_size=256",
    "--config.train.checkpoint_every_steps=100000",
    "--config.train.log_every_steps=100",
  ]


def train_cmd(data, workdir, cache):
  return [
    sys.executable,
    "-m",
    "rshash_jax.main",
    "--config=configs/dhcnn.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.source=folder:{data}",
    "--config.model.image_size=64",
    "--config.train.epochs=1",
    "--config.train.batch_size=64",
  ] + _run_flags(cache)


def mrhash_cmd(data, workdir, cache):
  """MrHash tiny at 64 px on the archive: both stages, 1 epoch each, 2% queries."""
  return [
    sys.executable,
    "-m",
    "rshash_jax.main",
    "--config=configs/mrhash.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.source=folder:{data}",
    "--config.model.image_size=64",
    "--config.mrhash.ae_epochs=1",
    "--config.mrhash.ae_batch_size=256",
    "--config.mrhash.num_clusters=10",
    "--config.train.epochs=1",
    "--config.train.batch_size=64",
  ] + _run_flags(cache)


def _cell(spread: dict) -> str:
  """A table cell of repeated runs: median (min..max)."""
  return f"{spread['median']:.0f} ({spread['min']:.0f}..{spread['max']:.0f})"


def _median_entry(entry: dict, runs) -> dict:
  """entry with the medians of runs [(wall, anon, rss), ...] and every run's values."""
  keys = ("wall_s", "peak_rss_anon_mib", "peak_vmrss_mib")
  spreads = {k: _record.spread([r[i] for r in runs]) for i, k in enumerate(keys)}
  return {**entry, **{k: spreads[k]["median"] for k in keys}, "repeats": len(runs), "runs": spreads}


def mrhash_memory(result, env):
  """Peak memory of MrHash runs (feature extraction of both sources, both stages, eval) on
  the first N images, for each N of --sizes; --repeats runs each, interleaved, medians."""
  sizes = [int(s) for s in ARGS.sizes.split(",")]
  runs = {n: [] for n in sizes}
  for rep in range(ARGS.repeats):
    for n in sizes:
      data = archive(ARGS.archive, n)
      work = os.path.join(ARGS.archive, f"mrhash_{n}_{os.getpid()}_{rep}")
      runs[n].append(
        run(mrhash_cmd(data, os.path.join(work, "w"), os.path.join(work, "c")), env)[:3]
      )
  result["mrhash_memory"] = [_median_entry({"images": n}, runs[n]) for n in sizes]
  print(
    f"\n| images | MrHash run (median of {ARGS.repeats}) | wall s | peak RssAnon MiB (min..max) "
    "| peak VmRSS MiB |\n|---|---|---|---|---|"
  )
  for m in result["mrhash_memory"]:
    print(
      f"| {m['images']} | extraction + both stages + eval | {m['wall_s']:.0f} | "
      f"{_cell(m['runs']['peak_rss_anon_mib'])} | {m['peak_vmrss_mib']:.0f} |"
    )


def main():
  global ARGS
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--archive", default="/tmp/rshash_scale")
  p.add_argument("--max", type=int, default=50000)
  p.add_argument("--sizes", default="10000,50000")
  p.add_argument("--decode_count", type=int, default=4096)
  p.add_argument(
    "--repeats", type=int, default=3, help="runs of each memory measurement (interleaved; medians)"
  )
  p.add_argument(
    "--parts",
    default="decode,memory",
    help="decode, memory (also runs the 1 vs 2 processes), mrhash (MrHash's peak memory)",
  )
  p.add_argument("--record", default=None, help="write a JSON record here (benchmarks/_record.py)")
  ARGS = p.parse_args()
  result = {"archive_images": ARGS.max}
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  t0 = time.perf_counter()
  full = archive(ARGS.archive, ARGS.max)
  print(f"archive: {ARGS.max} images under {full} ({time.perf_counter() - t0:.0f} s)")

  parts = ARGS.parts.split(",")
  if "decode" in parts:
    decode_rate(full, 2, 512)  # warm-up: graph building, file cache
    rates = {1: [], 2: []}
    for _ in range(3):  # interleaved, median of 3: the machine is shared
      for threads in (1, 2):
        rates[threads].append(decode_rate(full, threads, ARGS.decode_count))
    print("\n| threads | decode + resize to 224 px, images/s (median of 3) |\n|---|---|")
    for threads in (1, 2):
      print(f"| {threads} | {np.median(rates[threads]):.0f} |", flush=True)
    result["decode_images_per_s"] = {str(t): _record.spread(v) for t, v in rates.items()}
    result["decode_count"] = ARGS.decode_count
  if "mrhash" in parts:
    mrhash_memory(result, dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  if "memory" not in parts:
    _write(result)
    return
  result["memory"], result["processes"] = [], []

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sizes = [int(s) for s in ARGS.sizes.split(",")]
  runs = {(n, kind): [] for n in sizes for kind in ("extract", "cached")}
  for rep in range(ARGS.repeats):  # interleaved over sizes; each repeat extracts afresh
    for n in sizes:
      data = archive(ARGS.archive, n)
      work = os.path.join(ARGS.archive, f"runs_{n}_{os.getpid()}_{rep}")
      cache = os.path.join(work, "cache")
      for kind in ("extract", "cached"):
        runs[n, kind].append(run(train_cmd(data, os.path.join(work, kind), cache), env)[:3])
  what = {
    "extract": "feature extraction + training + eval",
    "cached": "training + eval (cached features)",
  }
  print(
    f"\n| images | run (median of {ARGS.repeats}) | wall s | peak RssAnon MiB (min..max) | "
    "peak VmRSS MiB |\n|---|---|---|---|---|"
  )
  for n in sizes:
    for kind in ("extract", "cached"):
      m = _median_entry({"images": n, "run": kind}, runs[n, kind])
      result["memory"].append(m)
      print(
        f"| {n} | {what[kind]} | {m['wall_s']:.0f} | {_cell(m['runs']['peak_rss_anon_mib'])} | "
        f"{m['peak_vmrss_mib']:.0f} |",
        flush=True,
      )

  n = sizes[0]
  data = archive(ARGS.archive, n)
  cache = os.path.join(ARGS.archive, f"runs_{n}_{os.getpid()}_0", "cache")
  print("\n| processes x devices | training + eval wall s (cached features) |\n|---|---|")
  wall, _, _, _ = run(train_cmd(data, os.path.join(ARGS.archive, f"p1_{os.getpid()}"), cache), env)
  print(f"| 1 x 2 | {wall:.1f} |", flush=True)
  result["processes"].append({"images": n, "processes": 1, "devices": 2, "wall_s": wall})
  env2 = dict(os.environ, RSHASH_LOCAL_DEVICES="1", PYTHON=sys.executable)
  wall, _, _, _ = run(
    ["bash", "launch/local.sh", "2"]
    + train_cmd(data, os.path.join(ARGS.archive, f"p2_{os.getpid()}"), cache)[3:],
    env2,
  )
  print(f"| 2 x 1 | {wall:.1f} |", flush=True)
  result["processes"].append({"images": n, "processes": 2, "devices": 1, "wall_s": wall})
  _write(result)


def _write(result):
  if ARGS.record:
    _record.write(ARGS.record, result)


if __name__ == "__main__":
  main()
