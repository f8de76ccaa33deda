"""Scratch arrays: per-image tables a run derives on the fly (normalised features, gathered
rows), held in memory-mapped files that have no name.

A table of N rows in process memory grows a run's footprint with the archive; the same
table in a memory-mapped file costs page cache, which the kernel reclaims under pressure,
and the process's own (anonymous) memory stays flat in N. The file is unlinked as soon as
it is mapped (`tempfile.TemporaryFile`), so a killed process leaves nothing behind; the
space returns when the last mapping goes.
"""

import ctypes
import functools
import gc
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from rshash_jax import errors

ROWS = 1 << 16  # rows per slice when a table is filled or read


def empty(shape: Sequence[int], dtype, directory: Optional[str] = None) -> np.memmap:
  """A writable, zero-filled memory-mapped array in an unnamed file under `directory` (the
  system's temporary directory when None)."""
  shape = tuple(int(s) for s in shape)
  nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  if directory:
    os.makedirs(directory, exist_ok=True)
  try:
    with tempfile.TemporaryFile(dir=directory) as f:
      f.truncate(max(nbytes, 1))
      if nbytes == 0:
        return np.memmap(f, dtype=dtype, mode="r+", shape=(1,))[:0].reshape(shape)
      return np.memmap(f, dtype=dtype, mode="r+", shape=shape)
  except OSError as e:
    raise errors.Storage(
      f"cannot make a {nbytes / 2**20:.0f} MiB scratch array in "
      f"{directory or tempfile.gettempdir()}: {e}"
    ) from None


def take(x: np.ndarray, rows: np.ndarray, directory: Optional[str] = None) -> np.memmap:
  """x[rows] as a scratch array, gathered in slices of ROWS rows."""
  rows = np.asarray(rows)
  out = empty((len(rows),) + tuple(x.shape[1:]), x.dtype, directory)
  for i in range(0, len(rows), ROWS):
    out[i : i + ROWS] = x[rows[i : i + ROWS]]
  return out


def l2_rows(x: np.ndarray) -> np.ndarray:
  """Rows of x divided by their L2 norm (+1e-12), as float32."""
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=-1, keepdims=True) + np.float32(1e-12))


def standardised(
  x: np.ndarray,
  rows: Optional[np.ndarray] = None,
  *,
  l2: bool,
  fit: Optional[np.ndarray] = None,
  directory: Optional[str] = None,
):
  """(y, scale): y = x[rows] (every row when None), each row L2-normalised when `l2`, divided
  by scale = the root-mean-square of y's entries over its rows `fit` (all when None) +
  1e-12, as a float32 scratch array; in three passes of ROWS rows each."""
  n = x.shape[0] if rows is None else len(rows)
  out = empty((n,) + tuple(x.shape[1:]), np.float32, directory)
  for i in range(0, n, ROWS):
    part = x[i : i + ROWS] if rows is None else x[np.asarray(rows[i : i + ROWS])]
    out[i : i + ROWS] = l2_rows(part) if l2 else part
  total, count = 0.0, 0
  for i in range(0, n if fit is None else len(fit), ROWS):
    part = out[i : i + ROWS] if fit is None else out[np.asarray(fit[i : i + ROWS])]
    total += float(np.square(part, dtype=np.float64).sum())
    count += part.size
  if count == 0:
    raise errors.InvalidInput("no rows to standardise the features on")
  scale = float(np.sqrt(total / count) + 1e-12)
  for i in range(0, n, ROWS):
    out[i : i + ROWS] /= np.float32(scale)
  return out, scale


def release() -> None:
  """Returns memory freed so far to the system: a garbage collection, then glibc's
  malloc_trim (elsewhere a no-op). Called between a run's phases, so that one phase's
  freed temporaries do not stay in the process's footprint under the next one's."""
  gc.collect()
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None
