"""Benchmark records: one JSON file per run under benchmarks/results/.

Every benchmark's `--record=PATH` writes, beside its `results`, what a reviewer needs to
rerun it and to tell a slow day from a slow peer or another CPU:

  command   the command line, from the repository root
  commit    `git rev-parse HEAD`, with "-dirty" when tracked files (records aside) differ
  date      UTC, ISO 8601
  host      CPU model, cores, the instruction-set flags that matter to these kernels,
            memory, accelerator
  versions  python, numpy, jax, jaxlib, flax, TensorFlow, FAISS (with its compile
            options), torch (with its build configuration), each when installed

`docs/` tables are rendered from these files by `benchmarks/render.py`; a test fails when
a committed table differs from what its record renders.
"""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
KEYS = ("command", "commit", "date", "host", "versions", "results")
# The flags the Hamming scan, the networks and FAISS depend on.
FLAGS = (
  "sse4_2",
  "popcnt",
  "avx2",
  "fma",
  "avx512f",
  "avx512bw",
  "avx512_vpopcntdq",
  "avx512_bf16",
  "avx512_vnni",
  "amx_bf16",
  "amx_tile",
)


def _git(*args) -> str:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return ""
  return out.stdout.strip() if out.returncode == 0 else ""


def commit() -> str:
  head = _git("rev-parse", "HEAD")
  # Records (benchmarks/results/) being rewritten by an earlier run of the same sitting do
  # not change the code measured: only other tracked files make a run "-dirty".
  dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
  return head + ("-dirty" if head and dirty else "")


# The code a run measures is the code it started with: the commit is read when the
# benchmark imports this module, not when it writes its record minutes or hours later.
START_COMMIT = commit()


def _cpuinfo() -> tuple[str, list[str]]:
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor(), []
  model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
  flags = set(next((ln for ln in lines if ln.startswith("flags")), "").split())
  return model, [f for f in FLAGS if f in flags]


def _memory_gb() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      return round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    return None


def host() -> dict:
  model, flags = _cpuinfo()
  out = {
    "cpu": model,
    "cores": os.cpu_count(),
    "flags": flags,
    "memory_gb": _memory_gb(),
    "accelerator": None,
  }
  if "jax" in sys.modules:  # only if the benchmark imported it: never start a backend here
    jax = sys.modules["jax"]
    dev = jax.devices()[0]
    if dev.platform != "cpu":
      out["accelerator"] = f"{jax.device_count()} x {dev.device_kind}"
  return out


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def versions(torch_config: str | None = None) -> dict:
  """Installed versions, read from package metadata (nothing heavy is imported); FAISS's
  compile options when the benchmark imported it; torch's build configuration as the
  PyTorch worker reported it (`torch_config`)."""
  out = {"python": platform.python_version()}
  for name, dist in (
    ("numpy", "numpy"),
    ("jax", "jax"),
    ("jaxlib", "jaxlib"),
    ("flax", "flax"),
    ("tensorflow", "tensorflow-cpu"),
    ("faiss", "faiss-cpu"),
    ("torch", "torch"),
  ):
    v = _version(dist) or (_version("tensorflow") if name == "tensorflow" else None)
    if v:
      out[name] = v
  if "faiss" in sys.modules:
    faiss = sys.modules["faiss"]
    out["faiss_compile_options"] = faiss.get_compile_options()
    out["faiss_threads"] = faiss.omp_get_max_threads()
  if torch_config:
    out["torch_config"] = torch_config
  return out


def write(
  path: str, results: dict, torch_config: str | None = None, command: str | None = None
) -> dict:
  """Write the record of this run to `path` and return it; `command` when the measured
  command is not this process's own (benchmarks/reproduce.py runs children)."""
  record = {
    "command": command
    or " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:]),
    "commit": START_COMMIT,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": host(),
    "versions": versions(torch_config),
    "results": results,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  print(f"record: {path}")
  return record


def spread(values) -> dict:
  """All raw values with their median and range."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  v = [float(x) for x in values]
  return {
    "raw": v,
    "median": float(np.median(v)) if v else None,
    "min": min(v) if v else None,
    "max": max(v) if v else None,
  }
