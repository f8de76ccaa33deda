"""Readers of untrusted binary files under mutation (issue 30, item 3).

Each reader gets a small valid file, then thousands of mutated copies: flipped bits,
overwritten runs, extreme integers written over any position (sizes, strides, offsets,
lengths), truncations, insertions and duplicated slices. A reader may accept a mutant or
refuse it with the package's UserError (which names the file); any other exception is a
bug, and reading out of bounds would crash the test process. Plus the two crafted .pth
files of the issue: a view past its storage and a storage larger than the file.
"""

import collections
import io
import pickle
import struct
import time

import numpy as np
import pytest
import scipy.io

import fake_torch
from rshash_jax import errors
from rshash_jax.untrusted import arrays as safe_arrays, pickles as safe_pickle
from rshash_jax.data import multisource
from rshash_jax.models.backbones import squeezenet, torch_pickle, vgg_f
from rshash_jax.retrieval import codes as codes_lib

_EXTREMES = [
  struct.pack("<I", 0xFFFFFFFF),
  struct.pack("<i", -1),
  struct.pack("<I", 0x7FFFFFFF),
  struct.pack("<Q", 0x7FFFFFFFFFFFFFFF),
  struct.pack("<q", -(2**62)),
  struct.pack(">I", 0xFFFFFFF0),
  b"\x00\x00\x00\x00",
  b"9999999",
  b"(99999999999, 99999999)",
]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
  b = bytearray(data)
  kind = rng.integers(7)
  if kind == 0:  # flip a few bits
    for _ in range(rng.integers(1, 9)):
      i = rng.integers(len(b))
      b[i] ^= 1 << int(rng.integers(8))
  elif kind == 1:  # overwrite a run with random bytes
    i = rng.integers(len(b))
    n = int(rng.integers(1, 32))
    b[i : i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
  elif kind == 2:  # an extreme integer anywhere
    v = _EXTREMES[rng.integers(len(_EXTREMES))]
    i = rng.integers(len(b))
    b[i : i + len(v)] = v
  elif kind == 3:  # truncate
    del b[rng.integers(len(b)) :]
  elif kind == 4:  # insert random bytes
    i = rng.integers(len(b) + 1)
    b[i:i] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
  elif kind == 5:  # duplicate a slice
    i = rng.integers(len(b))
    j = min(len(b), i + int(rng.integers(1, 64)))
    b[j:j] = b[i:j]
  else:  # a small integer in the header region (pickle opcodes, npy/zip headers)
    i = rng.integers(min(len(b), 256))
    b[i] = int(rng.integers(256))
  return bytes(b)


def fuzz(read, data: bytes, path, cases: int, seed: int = 0):
  """Runs read(path) on `cases` mutants of `data`; returns (accepted, refused) counts and
  fails on any exception that is not a UserError naming the file."""
  rng = np.random.default_rng(seed)
  path.write_bytes(data)
  read(str(path))  # the valid file reads
  accepted = refused = 0
  bugs = []
  for case in range(cases):
    path.write_bytes(mutate(data, rng))
    try:
      read(str(path))
      accepted += 1
    except errors.UserError as e:
      refused += 1
      if path.name not in str(e):
        bugs.append((case, f"error without the file name: {e}"))
    except Exception as e:  # pylint: disable=broad-except
      bugs.append((case, f"{type(e).__name__}: {e}"[:300]))
  assert not bugs, f"{len(bugs)} of {cases} mutants raised the wrong error, e.g. {bugs[:3]}"
  return accepted, refused


def _torch_state():
  rng = np.random.default_rng(0)
  return collections.OrderedDict(
    w=rng.standard_normal((3, 2, 2)).astype(np.float32),
    b=rng.standard_normal(5).astype(np.float16),
    n=np.array(7, np.int64),
  )


@pytest.mark.parametrize("writer", [fake_torch.write_zip, fake_torch.write_legacy])
def test_torch_reader_under_mutation(tmp_path, writer):
  src = tmp_path / "src.pth"
  writer(src, _torch_state(), transpose_2d=True)
  t0 = time.perf_counter()
  accepted, refused = fuzz(torch_pickle.load_state_dict, src.read_bytes(), tmp_path / "m.pth", 3000)
  assert refused > 1000 and time.perf_counter() - t0 < 60


def _crafted_legacy(path, offset, size, stride, numel_on_disk=1, numel_declared=None):
  """A legacy .pth of one tensor over a storage of `numel_on_disk` floats."""
  state = collections.OrderedDict(t=np.zeros(numel_on_disk, np.float32))
  fake_torch.write_legacy(path, state)
  raw = path.read_bytes()
  # Rewrite the tensor's (offset, size, stride) in the object pickle: protocol 2 writes them
  # as BININT1 / tuples; simplest is to rebuild with the fake writer's pickler pieces.
  with fake_torch._fake_torch() as torch:  # pylint: disable=protected-access
    data, storages = fake_torch._pickle_state(state, torch, False)  # pylint: disable=protected-access
    st = storages[0]
    tensor = fake_torch._Tensor(st, offset, size, stride, torch._utils._rebuild_tensor_v2)  # pylint: disable=protected-access
    buf = io.BytesIO()

    class P(pickle.Pickler):
      def persistent_id(self, o):
        if isinstance(o, fake_torch._Storage):  # pylint: disable=protected-access
          return ("storage", torch.FloatStorage, o.key, "cpu", o.flat.size)
        return None

    P(buf, protocol=2).dump(collections.OrderedDict(t=tensor))
  assert raw.count(data) == 1
  raw = raw.replace(data, buf.getvalue())
  if numel_declared is not None:
    tail = np.int64(numel_on_disk).tobytes() + np.zeros(numel_on_disk, np.float32).tobytes()
    assert raw.endswith(tail)
    raw = raw[: -len(tail)] + np.int64(numel_declared).tobytes() + raw[-len(tail) + 8 :]
  path.write_bytes(raw)


def test_crafted_torch_views_outside_their_storage_are_refused(tmp_path):
  p = tmp_path / "view.pth"
  _crafted_legacy(p, 0, (3,), (1,), numel_on_disk=3)
  np.testing.assert_array_equal(torch_pickle.load_state_dict(p)["t"], np.zeros(3, np.float32))
  # 23,232 values from a 1-float storage (the heap read): refused.
  _crafted_legacy(p, 0, (3, 88, 88), (7744, 88, 1))
  with pytest.raises(errors.InvalidInput, match=r"view.pth.*reads element 23231 of a storage of 1"):
    torch_pickle.load_state_dict(p)
  for offset, size, stride in (
    (5, (1,), (1,)),
    (0, (2,), (10**12,)),
    (-1, (1,), (1,)),
    (0, (2, 2), (1,)),
  ):
    _crafted_legacy(p, offset, size, stride)
    with pytest.raises(errors.InvalidInput, match="view.pth"):
      torch_pickle.load_state_dict(p)
  # A storage that declares more elements than the file holds (or a negative count).
  for declared in (10**15, -5):
    _crafted_legacy(p, 0, (1,), (1,), numel_declared=declared)
    with pytest.raises(errors.InvalidInput, match=r"view.pth: storage 0 declares"):
      torch_pickle.load_state_dict(p)


def test_squeezenet_pickle_under_mutation(tmp_path):
  rng = np.random.default_rng(0)
  weights = {"conv1": [rng.standard_normal((3, 3, 3, 4)).astype(np.float32), np.zeros(4)]}
  src = tmp_path / "sq.pkl"
  src.write_bytes(pickle.dumps(weights, protocol=4))

  def read(path):  # the real shapes differ: every mutant is refused, none may crash
    try:
      squeezenet.load_weights(path)
    except errors.InvalidInput as e:
      if "wrong shape" in str(e) or "missing" in str(e):
        return
      raise

  fuzz(read, src.read_bytes(), tmp_path / "m.pkl", 300)

  def unpickle(path):  # the unpickler alone, wrapped as the loader wraps it: thousands of
    with open(path, "rb") as f:  # cases in seconds, for crashes, hangs and memory bombs
      try:
        safe_pickle.load_numpy(f, what=path)
      except Exception as e:  # pylint: disable=broad-except
        raise errors.InvalidInput(f"{path}: {e}") from None

  t0 = time.perf_counter()
  fuzz(unpickle, src.read_bytes(), tmp_path / "u.pkl", 3000, seed=1)
  assert time.perf_counter() - t0 < 60


def test_mat_readers_under_mutation(tmp_path):
  rng = np.random.default_rng(0)
  w = np.empty(2, dtype=object)
  w[0], w[1] = rng.standard_normal((3, 3, 3, 4)).astype(np.float32), np.zeros((1, 4), np.float32)
  layers = np.empty(2, dtype=object)
  layers[:] = [
    {"name": "conv1", "type": "conv", "weights": w},
    {"name": "norm1", "type": "lrn", "param": np.array([5, 1, 2e-5, 0.75])},
  ]
  src = tmp_path / "net.mat"
  scipy.io.savemat(src, {"layers": layers, "normalization": {"averageImage": np.ones(3)}})
  fuzz(vgg_f.read_mat, src.read_bytes(), tmp_path / "m.mat", 1500)
  feats = tmp_path / "f.mat"
  scipy.io.savemat(feats, {"features": rng.standard_normal((6, 4)).astype(np.float32)})
  fuzz(multisource._load_matrix, feats.read_bytes(), tmp_path / "m2.mat", 1500)  # pylint: disable=protected-access


def test_npy_and_npz_readers_under_mutation(tmp_path):
  a = np.arange(60, dtype=np.float32).reshape(6, 10)
  npy = tmp_path / "a.npy"
  np.save(npy, a)
  fuzz(multisource._load_matrix, npy.read_bytes(), tmp_path / "m.npy", 2000)  # pylint: disable=protected-access
  fuzz(lambda p: safe_arrays.load_npy(p, mmap_mode="r"), npy.read_bytes(), tmp_path / "n.npy", 500)
  npz = tmp_path / "a.npz"
  np.savez(npz, x=a)
  fuzz(multisource._load_matrix, npz.read_bytes(), tmp_path / "m.npz", 2000)  # pylint: disable=protected-access
  npz_c = tmp_path / "c.npz"
  np.savez_compressed(npz_c, x=a, y=np.zeros(3, np.int64))
  fuzz(safe_arrays.load_npz, npz_c.read_bytes(), tmp_path / "mc.npz", 1000)
  # A header that declares far more than the file holds is refused before any allocation.
  big = bytearray(npy.read_bytes())
  i = big.index(b"(6, 10)")
  big[i : i + 7] = b"(9**99,"[:7]
  (tmp_path / "big.npy").write_bytes(bytes(big))
  with pytest.raises(errors.Corrupt, match="big.npy"):
    safe_arrays.load_npy(str(tmp_path / "big.npy"))


def test_codes_file_under_mutation(tmp_path):
  n, bits = 12, 48
  src = tmp_path / "codes.npz"
  with open(src, "wb") as f:
    np.savez(
      f,
      format=codes_lib.FORMAT,
      codes=np.arange(n * 2, dtype=np.uint32).reshape(n, 2),
      ids=np.arange(n),
      labels=np.arange(n) % 3,
      lon=np.full(n, np.nan),
      lat=np.full(n, np.nan),
      predicted=np.full(n, -1, np.int32),
      paths=np.asarray([f"/a/{i}.png" for i in range(n)]),
      class_names=np.asarray(["a", "b", "c"]),
      bits=bits,
      identity="abc",
      method="dhcnn",
      backbone="tiny",
    )
  fuzz(codes_lib.load_codes, src.read_bytes(), tmp_path / "m.npz", 2000)
