"""Reads PyTorch state dicts into numpy arrays without importing torch.

Two on-disk formats exist and both are handled:

* zip (torch >= 1.6, e.g. torchvision's `alexnet-owt-7be5be79.pth`): an archive with
  `<root>/data.pkl`, whose persistent ids name storages stored raw in
  `<root>/data/<key>`;
* legacy (e.g. `efficientnet-lite0-57934424.pth`): five concatenated pickles/blobs:
  magic number, protocol version, system info, the object pickle (with persistent ids),
  the list of storage keys, then for every key an int64 element count and its raw bytes.

Only plain tensors are supported (what a state dict holds): the unpickler resolves
`torch._utils._rebuild_tensor_v2`, the `*Storage` classes and `collections.OrderedDict`
and refuses every other global, so a malicious or unexpected file fails loudly instead
of running code.
"""

import collections
import io
import os
import pickle
import zipfile
from typing import Dict

import numpy as np

from rshash_jax import errors, safe_pickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": None,  # handled below: numpy has no bfloat16
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  def __init__(self, name):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}")
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TensorSpec:
  """Placeholder built while unpickling; materialised once storages are loaded."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks, metadata
  return _TensorSpec(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _Unpickler(safe_pickle.RestrictedUnpickler):
  """Resolves only the globals a state dict needs."""

  def __init__(self, file, load_storage):
    super().__init__(file, {}, what="a torch state dict")
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor_v2
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise pickle.UnpicklingError(
      f"refusing to load global {module}.{name}: only tensor state dicts are supported"
    )

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    return self._load_storage(storage_type, key)


def _as_array(raw: bytes, storage_type: _StorageType) -> np.ndarray:
  if storage_type.name == "BFloat16Storage":  # widen: bf16 is the top half of f32
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return u16.view(np.float32)
  return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))


def _itemsize(storage_type: _StorageType) -> int:
  return 2 if storage_type.name == "BFloat16Storage" else np.dtype(storage_type.dtype).itemsize


def _materialise(obj, storages):
  if isinstance(obj, _TensorSpec):
    flat = storages[id(obj.storage)]
    itemsize = flat.dtype.itemsize
    if not obj.size:
      return np.array(flat[obj.offset])
    view = np.lib.stride_tricks.as_strided(
      flat[obj.offset :], shape=obj.size, strides=tuple(s * itemsize for s in obj.stride)
    )
    return np.array(view)  # own, contiguous copy
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages) for v in obj)
  return obj


class _StorageRef:
  def __init__(self, storage_type, key):
    self.storage_type, self.key = storage_type, key


def _load_zip(path: str):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise errors.InvalidInput(
        f"{path}: zip torch file without exactly one data.pkl (found {pkl})"
      )
    root = pkl[0][: -len("data.pkl")]
    refs = {}

    def load_storage(storage_type, key):
      ref = refs.setdefault(key, _StorageRef(storage_type, key))
      return ref

    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
    storages = {}
    for ref in refs.values():
      member = f"{root}data/{ref.key}"
      if member not in names:
        raise errors.InvalidInput(f"{path}: storage {member} referenced by data.pkl is missing")
      storages[id(ref)] = _as_array(zf.read(member), ref.storage_type)
  return obj, storages


def _load_legacy(path: str, f):
  magic = safe_pickle.load(f, what="a torch file header")
  if magic != _LEGACY_MAGIC:
    raise errors.InvalidInput(f"{path}: not a torch file (bad magic number {magic!r})")
  protocol = safe_pickle.load(f, what="a torch file header")
  if protocol != 1001:
    raise errors.InvalidInput(f"{path}: unsupported legacy torch protocol {protocol}")
  safe_pickle.load(
    f, what="a torch file header"
  )  # sys_info: endianness and C type sizes, informational
  refs = {}

  def load_storage(storage_type, key):
    return refs.setdefault(key, _StorageRef(storage_type, key))

  obj = _Unpickler(f, load_storage).load()
  keys = safe_pickle.load(f, what="a torch storage list")
  storages = {}
  for key in keys:
    ref = refs.get(str(key))
    (numel,) = np.frombuffer(f.read(8), dtype="<i8")
    if ref is None:
      raise errors.InvalidInput(f"{path}: storage {key} is not referenced by the object pickle")
    itemsize = _itemsize(ref.storage_type)
    raw = f.read(int(numel) * itemsize)
    if len(raw) != int(numel) * itemsize:
      raise errors.InvalidInput(
        f"{path}: truncated storage {key} ({len(raw)} of {numel * itemsize} bytes)"
      )
    storages[id(ref)] = _as_array(raw, ref.storage_type)
  return obj, storages


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Loads a torch `.pth` state dict (zip or legacy format) as {name: numpy array}.

  Raises FileNotFoundError for a missing file and ValueError, naming the file, for
  anything that is not a tensor state dict.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.NotFound(f"torch weights file not found: {path}")
  try:
    if zipfile.is_zipfile(path):
      obj, storages = _load_zip(path)
    else:
      with open(path, "rb") as f:
        obj, storages = _load_legacy(path, f)
  except (pickle.UnpicklingError, EOFError) as e:
    raise errors.InvalidInput(f"{path}: cannot read as a torch state dict: {e}") from e
  obj = _materialise(obj, storages)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise errors.InvalidInput(f"{path}: expected a state dict, found {type(obj).__name__}")
  return dict(obj)
