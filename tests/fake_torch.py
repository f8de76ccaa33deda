"""Writes torch `.pth` files (zip and legacy formats) without torch, for loader tests.

A stand-in `torch` module is put in sys.modules only while pickling, so the pickles
reference `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` exactly as torch's
own files do.
"""

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_DTYPE_STORAGE = {
  np.dtype(np.float32): "FloatStorage",
  np.dtype(np.int64): "LongStorage",
  np.dtype(np.float16): "HalfStorage",
}


@contextlib.contextmanager
def _fake_torch():
  torch = types.ModuleType("torch")
  utils = types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):  # never called: only referenced by name
    raise AssertionError(args)

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch._utils = utils
  for name in _DTYPE_STORAGE.values():
    setattr(torch, name, type(name, (), {"__module__": "torch", "__qualname__": name}))
  saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
  sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
  try:
    yield torch
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


class _Storage:
  def __init__(self, key, flat):
    self.key, self.flat = key, flat


class _Tensor:
  def __init__(self, storage, offset, shape, stride, rebuild):
    self.args = (storage, offset, shape, stride, False, collections.OrderedDict())
    self.rebuild = rebuild

  def __reduce__(self):
    return (self.rebuild, self.args)


def _pickle_state(state, torch, transpose_2d):
  storages = []
  obj = collections.OrderedDict()
  for name, a in state.items():
    a = np.asarray(a)
    if transpose_2d and a.ndim == 2:  # store column-major: exercises strides
      flat = np.ascontiguousarray(a.T).reshape(-1)
      stride = (1, a.shape[0])
    else:
      flat = np.ascontiguousarray(a).reshape(-1)
      stride = tuple(s // a.itemsize for s in np.ascontiguousarray(a).strides)
    st = _Storage(str(len(storages)), flat)
    storages.append(st)
    obj[name] = _Tensor(st, 0, tuple(a.shape), stride, torch._utils._rebuild_tensor_v2)

  buf = io.BytesIO()

  class P(pickle.Pickler):
    def persistent_id(self, o):
      if isinstance(o, _Storage):
        return ("storage", getattr(torch, _DTYPE_STORAGE[o.flat.dtype]), o.key, "cpu", o.flat.size)
      return None

  P(buf, protocol=2).dump(obj)
  return buf.getvalue(), storages


def write_zip(path, state, transpose_2d=False):
  """torch >= 1.6 format: archive/data.pkl + archive/data/<key>."""
  with _fake_torch() as torch:
    data, storages = _pickle_state(state, torch, transpose_2d)
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data)
    for st in storages:
      zf.writestr(
        f"archive/data/{st.key}", st.flat.astype(st.flat.dtype.newbyteorder("<")).tobytes()
      )


def write_legacy(path, state, transpose_2d=False):
  """Pre-1.6 format: magic, protocol, sys_info, object pickle, keys, raw storages."""
  with _fake_torch() as torch:
    data, storages = _pickle_state(state, torch, transpose_2d)
  with open(path, "wb") as f:
    pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump(
      {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
      },
      f,
      protocol=2,
    )
    f.write(data)
    pickle.dump([st.key for st in storages], f, protocol=2)
    for st in storages:
      f.write(np.int64(st.flat.size).tobytes())
      f.write(st.flat.tobytes())
