"""The one way rshash_jax reads .npy and .npz files: headers checked against the bytes there.

`np.load` trusts a file's header: a shape of 10^12 elements allocates before it reads (a
MemoryError, or the host's memory), a truncated or bit-flipped member surfaces as
BadZipFile, EOFError or a ValueError that names no file. Here each array's header (dtype,
shape) is read first and its size must equal the bytes that follow it (for a zip member,
its declared uncompressed size, which may be at most MAX_INFLATION times its compressed
size); object dtypes are refused (no pickle, ever); zip members are read through zipfile,
which verifies each one's CRC-32, so a flipped bit is an error. Every failure is
errors.Corrupt naming the file (and the member).
"""

import os
import zipfile
from typing import Dict, Optional

import numpy as np

from rshash_jax import errors

MAX_INFLATION = 1000  # uncompressed / compressed bytes of an .npz member (savez_compressed)


def _header(fp, name: str):
  """(shape, fortran_order, dtype, header_bytes) of the .npy stream at fp's start."""
  try:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
      raise ValueError(f"unsupported .npy version {version}")
  except Exception as e:  # ValueError, SyntaxError, UnicodeDecodeError from a mangled header
    raise errors.Corrupt(f"{name}: not a valid .npy header ({type(e).__name__}: {e})") from None
  if dtype.hasobject:
    raise errors.Corrupt(f"{name}: an object array (dtype {dtype}); only plain arrays are read")
  return shape, fortran, dtype, fp.tell()


def _expect(name: str, shape, dtype, available: int):
  need = int(np.prod(shape, dtype=object)) * dtype.itemsize
  if need != available:
    raise errors.Corrupt(
      f"{name}: the header declares {list(shape)} {dtype} ({need} bytes), the file holds "
      f"{available}: truncated or corrupt"
    )


def load_npy(path: str, mmap_mode: Optional[str] = None) -> np.ndarray:
  """An .npy file (memory-mapped with mmap_mode), after the header and size checks."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      shape, _, dtype, offset = _header(f, path)
  except OSError as e:
    raise errors.NotFound(f"cannot read {path}: {e}") from None
  _expect(path, shape, dtype, size - offset)
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except Exception as e:
    raise errors.Corrupt(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Every array of an .npz file, each member's header, size and CRC-32 checked."""
  out = {}
  try:
    with zipfile.ZipFile(path) as zf:
      for info in zf.infolist():
        name = f"{path}[{info.filename}]"
        if not info.filename.endswith(".npy"):
          raise errors.Corrupt(f"{name}: not an .npy member")
        if info.compress_type != zipfile.ZIP_STORED and (
          info.file_size > MAX_INFLATION * info.compress_size + (1 << 20)
        ):
          raise errors.Corrupt(
            f"{name}: declares {info.file_size} bytes from {info.compress_size} compressed "
            f"(over {MAX_INFLATION}x): refused"
          )
        with zf.open(info) as fp:
          shape, fortran, dtype, offset = _header(fp, name)
          _expect(name, shape, dtype, info.file_size - offset)
          raw = fp.read()  # zipfile checks the CRC-32 once the member is read whole
        order = "F" if fortran else "C"
        out[info.filename[:-4]] = np.frombuffer(raw, dtype).reshape(shape, order=order).copy()
  except errors.UserError:
    raise
  except FileNotFoundError:
    raise errors.NotFound(f"file not found: {path}") from None
  except Exception as e:  # BadZipFile (a CRC mismatch too), EOFError, zlib.error, ...
    raise errors.Corrupt(f"{path}: corrupt or not an .npz file ({type(e).__name__}: {e})") from None
  return out
