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
of running code. Every number the file gives is checked before it is used: a tensor's
offset, sizes and strides must stay inside its storage (a view past the end would read the
heap), a storage's element count must fit the bytes left in the file, zip members must
not inflate past MAX_MEMBER_BYTES or 200x their compressed size. Whatever is wrong with a
file, the error is InvalidInput naming it (tests/test_fuzz_readers.py mutates real files
thousands of times).
"""

import collections
import io
import os
import pickle
import zipfile
from typing import Dict

import numpy as np

from rshash_jax import errors
from rshash_jax.untrusted import pickles as safe_pickle

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_MEMBER_BYTES = 8 << 30  # the largest storage a zip member may inflate to
MAX_DIMS = 16
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
  if not isinstance(storage_type, _StorageType):
    raise errors.InvalidInput(f"storage of type {storage_type!r}, not a torch storage class")
  if len(raw) % _itemsize(storage_type):
    raise errors.InvalidInput(
      f"a {storage_type.name} of {len(raw)} bytes: not a whole number of elements"
    )
  if storage_type.name == "BFloat16Storage":  # widen: bf16 is the top half of f32
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return u16.view(np.float32)
  return np.frombuffer(raw, dtype=np.dtype(storage_type.dtype).newbyteorder("<"))


def _itemsize(storage_type: _StorageType) -> int:
  return 2 if storage_type.name == "BFloat16Storage" else np.dtype(storage_type.dtype).itemsize


def _checked_view(spec: _TensorSpec, flat: np.ndarray) -> np.ndarray:
  """The tensor `spec` describes in `flat`, after checking that every element it reads lies
  inside the storage."""
  ints = lambda xs: all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in xs)
  if not (ints((spec.offset,)) and ints(spec.size) and ints(spec.stride)):
    raise errors.InvalidInput(
      f"tensor with offset {spec.offset!r}, size {spec.size!r}, stride {spec.stride!r}: "
      "not non-negative integers"
    )
  if (spec.size and len(spec.size) != len(spec.stride)) or len(spec.size) > MAX_DIMS:
    raise errors.InvalidInput(
      f"tensor with {len(spec.size)} sizes and {len(spec.stride)} strides (at most {MAX_DIMS})"
    )
  numel = int(np.prod(spec.size, dtype=object)) if spec.size else 1
  last = spec.offset + sum((n - 1) * st for n, st in zip(spec.size, spec.stride))
  if numel and last >= flat.size:
    raise errors.InvalidInput(
      f"tensor of size {list(spec.size)}, stride {list(spec.stride)} at offset {spec.offset} "
      f"reads element {last} of a storage of {flat.size}: out of bounds"
    )
  if not numel:
    return np.zeros(spec.size, flat.dtype)
  if not spec.size:
    return np.array(flat[spec.offset])
  itemsize = flat.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    flat[spec.offset :], shape=spec.size, strides=tuple(st * itemsize for st in spec.stride)
  )
  return np.array(view)  # own, contiguous copy


def _materialise(obj, storages, depth: int = 0):
  if depth > 64:
    raise errors.InvalidInput("containers nested more than 64 deep: not a state dict")
  if isinstance(obj, _TensorSpec):
    if id(obj.storage) not in storages:
      raise errors.InvalidInput(f"a tensor refers to {type(obj.storage).__name__}, not a storage")
    return _checked_view(obj, storages[id(obj.storage)])
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v, storages, depth + 1)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v, storages, depth + 1) for v in obj)
  return obj


class _StorageRef:
  def __init__(self, storage_type, key):
    self.storage_type, self.key = storage_type, key


def _check_member(info: zipfile.ZipInfo, path: str):
  """Refuses a zip member that would inflate past MAX_MEMBER_BYTES or 200x its size."""
  if info.file_size > MAX_MEMBER_BYTES or (
    info.compress_type != zipfile.ZIP_STORED and info.file_size > 200 * info.compress_size + 4096
  ):
    raise errors.InvalidInput(
      f"{path}: zip member {info.filename} declares {info.file_size} bytes from "
      f"{info.compress_size}: refused (limit {MAX_MEMBER_BYTES} bytes, 200x compression)"
    )


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

    _check_member(zf.getinfo(pkl[0]), path)
    obj = _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
    storages = {}
    for ref in refs.values():
      member = f"{root}data/{ref.key}"
      if member not in names:
        raise errors.InvalidInput(f"{path}: storage {member} referenced by data.pkl is missing")
      _check_member(zf.getinfo(member), path)
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
  if not isinstance(keys, (list, tuple)):
    raise errors.InvalidInput(f"{path}: the storage list is a {type(keys).__name__}")
  here = f.tell()
  size = f.seek(0, io.SEEK_END)
  f.seek(here)
  for key in keys:
    ref = refs.get(str(key))
    head = f.read(8)
    if len(head) != 8:
      raise errors.InvalidInput(f"{path}: truncated before storage {key}")
    numel = int(np.frombuffer(head, dtype="<i8")[0])
    if ref is None:
      raise errors.InvalidInput(f"{path}: storage {key} is not referenced by the object pickle")
    if not isinstance(ref.storage_type, _StorageType):
      raise errors.InvalidInput(f"{path}: storage {key} has no torch storage type")
    itemsize = _itemsize(ref.storage_type)
    if not 0 <= numel * itemsize <= size - f.tell():
      raise errors.InvalidInput(
        f"{path}: storage {key} declares {numel} elements, more than the "
        f"{size - f.tell()} bytes left in the file"
      )
    raw = f.read(numel * itemsize)
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
    else:  # read whole: a pickle length field then cannot make a read allocate past the file
      with open(path, "rb") as f:
        obj, storages = _load_legacy(path, io.BytesIO(f.read()))
    obj = _materialise(obj, storages)
  except errors.UserError as e:
    if str(e).startswith(path):
      raise
    raise errors.InvalidInput(f"{path}: cannot read as a torch state dict: {e}") from None
  except Exception as e:  # any malformed stream (pickle, zip, struct, value errors): name it
    raise errors.InvalidInput(
      f"{path}: cannot read as a torch state dict: {type(e).__name__}: {e}"
    ) from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise errors.InvalidInput(f"{path}: expected a state dict, found {type(obj).__name__}")
  return dict(obj)
