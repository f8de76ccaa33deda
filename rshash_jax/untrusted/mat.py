"""The one way rshash_jax reads MATLAB .mat files: scipy's parser, in a child process.

scipy.io.loadmat is not safe on untrusted input: in tests/test_fuzz_readers.py a few
mutated bytes of a small MatConvNet file made it crash the interpreter with SIGSEGV
(scipy 1.17, `_mio5.read_var_array`) or allocate until the kernel killed it. We cannot
audit its Cython, so a .mat file (MatConvNet weights, MrHash feature matrices) is parsed
in a forked child with an address-space limit and a deadline; the child flattens what it
read into plain arrays (no objects) and writes them as an .npz, which the parent reads
through safe_arrays. A crash, a kill or a timeout of the child is errors.Corrupt naming
the file; the parent never runs the parser itself.

Flattened keys: a variable `v` is "v"; a struct field "v/field"; a cell or struct-array
element "v/3"; strings come back as 0-d str arrays.
"""

import multiprocessing
import os
import tempfile
from typing import Dict

import numpy as np

from rshash_jax import errors
from rshash_jax.untrusted import arrays as safe_arrays

TIMEOUT_S = 600.0
MAX_LEAVES = 100_000
_ctx = None


def _context():
  """A forkserver context (forks come from a clean, single-threaded server that has
  imported scipy once, not from this process with its JAX and TF threads)."""
  global _ctx
  if _ctx is None:
    _ctx = multiprocessing.get_context("forkserver")
    _ctx.set_forkserver_preload(["numpy", "scipy.io", "rshash_jax.untrusted.mat"])
  return _ctx


def _flatten(obj, key: str, out: Dict[str, np.ndarray], depth: int = 0):
  from scipy.io.matlab import mat_struct  # pylint: disable=g-import-not-at-top

  if len(out) > MAX_LEAVES or depth > 32:
    raise ValueError(f"more than {MAX_LEAVES} values or 32 levels: not a file of ours")
  if isinstance(obj, mat_struct):
    for f in obj._fieldnames:  # pylint: disable=protected-access
      _flatten(getattr(obj, f), f"{key}/{f}", out, depth + 1)
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f"{key}/{k}" if key else str(k), out, depth + 1)
  elif isinstance(obj, np.ndarray) and (obj.dtype.hasobject or obj.dtype.names):
    for i, v in enumerate(obj.reshape(-1)):
      _flatten(v, f"{key}/{i}", out, depth + 1)
  elif isinstance(obj, np.ndarray):
    out[key] = obj
  elif isinstance(obj, (str, bytes, int, float, complex, np.generic)):
    out[key] = np.asarray(obj)
  else:
    raise ValueError(f"{key}: unexpected {type(obj).__name__}")


def _child(path: str, out_path: str, limit_bytes: int, squeeze: bool):
  import resource  # pylint: disable=g-import-not-at-top
  import scipy.io  # pylint: disable=g-import-not-at-top

  resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
  try:
    mat = scipy.io.loadmat(path, squeeze_me=squeeze, struct_as_record=False)
    flat = {}
    _flatten({k: v for k, v in mat.items() if not k.startswith("__")}, "", flat)
    np.savez(out_path, **flat)
  except Exception as e:  # pylint: disable=broad-except
    with open(out_path + ".error", "w") as f:
      f.write(f"{type(e).__name__}: {e}"[:2000])
    os._exit(3)  # pylint: disable=protected-access
  os._exit(0)  # pylint: disable=protected-access


def load_mat(path: str, squeeze: bool = True) -> Dict[str, np.ndarray]:
  """The variables of a .mat file, flattened (see the module docstring); squeeze: drop
  unit dimensions (scipy's squeeze_me)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.NotFound(f".mat file not found: {path}")
  limit = (3 << 30) + 8 * os.path.getsize(path)
  with tempfile.TemporaryDirectory(prefix="rshash_mat_") as tmp:
    out = os.path.join(tmp, "flat.npz")
    proc = _context().Process(target=_child, args=(path, out, limit, squeeze), daemon=True)
    proc.start()
    proc.join(TIMEOUT_S)
    if proc.is_alive():
      proc.kill()
      proc.join()
      raise errors.Corrupt(f"{path}: reading it took over {TIMEOUT_S:g} s: refused")
    if proc.exitcode == 3:
      with open(out + ".error") as f:
        raise errors.Corrupt(f"{path}: cannot read as a .mat file ({f.read()})")
    if proc.exitcode != 0 or not os.path.isfile(out):
      how = f"signal {-proc.exitcode}" if proc.exitcode < 0 else f"exit {proc.exitcode}"
      raise errors.Corrupt(
        f"{path}: the .mat parser died on it ({how}; out of memory or a malformed file)"
      )
    try:
      return safe_arrays.load_npz(out)
    except errors.UserError as e:
      raise errors.Corrupt(f"{path}: cannot read as a .mat file ({e})") from None
