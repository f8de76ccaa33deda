"""Per-example arrays of a whole archive, computed in resumable chunks and read memory-mapped.

A store is a directory. While it is being built, DIR/chunks/part_NNNNNN.npz holds rows
[NNNNNN * chunk, ...) of every field, each chunk written atomically by the process that
owns it (chunk c belongs to process c % process_count); an interrupted build, with any
number of processes, continues at the missing chunks. When all chunks exist the primary
process concatenates them, one chunk at a time, into DIR/<field>.npy and writes
DIR/store.json last: a store with store.json is complete, and `open` maps its fields
read-only, so no process ever holds the whole archive in memory.

Verified state: chunks are .npz files whose members carry CRC-32s; a resumed build reads
each chunk it finds back (safe_arrays) and recomputes any that is truncated or corrupt.
store.json records each field's CRC-32, checked on every `open`; a store that fails it
is reported by name and rebuilt by `build` (it is a cache: nothing is lost).

Used for backbone feature caches (rshash_jax/data/features.py) and codes files (`encode`).
"""

import json
import os
import shutil
import time
import zlib
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from rshash_jax import errors
from rshash_jax.untrusted import arrays as safe_arrays
from rshash_jax.parallel import distributed

META = "store.json"
FORMAT = "rshash_jax.chunk_store/1"
_CRC_BLOCK = 64 << 20


def crc32_of(a: np.ndarray) -> str:
  """CRC-32 of an array's bytes in row order (memory-mapped arrays read in 64 MB blocks)."""
  flat = a.reshape(-1)
  step = max(1, _CRC_BLOCK // max(a.dtype.itemsize, 1))
  crc = 0
  for s in range(0, flat.size, step):
    crc = zlib.crc32(np.ascontiguousarray(flat[s : s + step]).data, crc)
  return f"{crc & 0xFFFFFFFF:08x}"


Fields = Mapping[str, Tuple[Tuple[int, ...], str]]  # name -> (row shape, dtype)


class ChunkStore:
  """The store in `directory` of `num_rows` rows of `fields`, built `chunk` rows at a time.

  `key` identifies what the rows are (e.g. backbone + weights + dataset fingerprint): a
  directory holding chunks or a store of another key is refused, never mixed.
  """

  def __init__(self, directory: str, num_rows: int, fields: Fields, *, chunk: int, key: str):
    if chunk < 1:
      raise errors.InvalidInput(f"chunk must be a positive number of rows, got {chunk}")
    self.directory = os.path.abspath(directory)
    self.num_rows, self.chunk, self.key = int(num_rows), int(chunk), str(key)
    self.fields = {
      k: (tuple(int(d) for d in shape), np.dtype(dt).str) for k, (shape, dt) in fields.items()
    }
    self.num_chunks = -(-self.num_rows // self.chunk)

  def _meta(self) -> dict:
    return dict(
      format=FORMAT,
      key=self.key,
      num_rows=self.num_rows,
      chunk=self.chunk,
      fields={k: [list(s), d] for k, (s, d) in self.fields.items()},
    )

  @property
  def _chunk_dir(self) -> str:
    return os.path.join(self.directory, "chunks")

  def _part(self, c: int) -> str:
    return os.path.join(self._chunk_dir, f"part_{c:06d}.npz")

  def complete(self) -> bool:
    path = os.path.join(self.directory, META)
    if not os.path.isfile(path):
      return False
    meta = self._read_meta(path)
    if meta.get("key") != self.key or meta.get("num_rows") != self.num_rows:
      raise errors.InvalidInput(
        f"{self.directory} holds a store of other data (key {meta.get('key')}, "
        f"{meta.get('num_rows')} rows; expected {self.key}, {self.num_rows}): remove it"
      )
    return True

  @staticmethod
  def _read_meta(path: str) -> dict:
    try:
      with open(path) as f:
        meta = json.load(f)
      if not isinstance(meta, dict):
        raise ValueError("not an object")
      return meta
    except ValueError as e:
      raise errors.Corrupt(f"{path}: corrupt store metadata ({e})") from None

  def open(self) -> Dict[str, np.ndarray]:
    """The fields of a complete store, memory-mapped read-only, each checked against the
    CRC-32 store.json recorded (stores written before checksums are read unchecked)."""
    sums = self._read_meta(os.path.join(self.directory, META)).get("crc32", {})
    out = {}
    for name, (shape, dtype) in self.fields.items():
      path = os.path.join(self.directory, f"{name}.npy")
      a = safe_arrays.load_npy(path, mmap_mode="r")
      if a.shape != (self.num_rows,) + shape or a.dtype != np.dtype(dtype):
        raise errors.InvalidInput(
          f"{self.directory}/{name}.npy has shape {a.shape} {a.dtype}, expected "
          f"{(self.num_rows,) + shape} {np.dtype(dtype)}: remove the store to rebuild it"
        )
      if name in sums and crc32_of(a) != sums[name]:
        raise errors.Corrupt(f"{path}: its contents do not match the CRC-32 in {META}")
      out[name] = a
    return out

  def rows(self, c: int) -> Tuple[int, int]:
    return c * self.chunk, min(self.num_rows, (c + 1) * self.chunk)

  def owned_missing(self, log: Callable[[str], None] = logging.warning) -> Sequence[int]:
    """Chunks this process owns (c % process_count == process_index) and has not written,
    or wrote corrupt (each chunk found is read back; a bad one is removed and counted)."""
    pc, pi = jax.process_count(), jax.process_index()
    out = []
    for c in range(pi, self.num_chunks, pc):
      if os.path.exists(self._part(c)):
        try:
          self._read_chunk(c)
          continue
        except errors.UserError as e:
          log(f"{e}: recomputing chunk {c}")
          os.remove(self._part(c))
      out.append(c)
    return out

  def _read_chunk(self, c: int) -> Dict[str, np.ndarray]:
    """A written chunk's arrays, read back whole (CRC-checked) with their shapes checked."""
    z = safe_arrays.load_npz(self._part(c))
    start, stop = self.rows(c)
    for name, (shape, dtype) in self.fields.items():
      a = z.get(name)
      if a is None or a.shape != (stop - start,) + shape or a.dtype != np.dtype(dtype):
        raise errors.Corrupt(
          f"{self._part(c)}: field {name} is {None if a is None else (a.dtype, a.shape)}, "
          f"expected {np.dtype(dtype)} {(stop - start,) + shape}"
        )
    return z

  def write_chunk(self, c: int, arrays: Mapping[str, np.ndarray]):
    start, stop = self.rows(c)
    for name, (shape, dtype) in self.fields.items():
      a = np.asarray(arrays[name])
      if a.shape != (stop - start,) + shape:
        raise errors.InvalidInput(
          f"internal: chunk {c} field {name} has shape {a.shape}, expected "
          f"{(stop - start,) + shape}"
        )
    tmp = self._part(c) + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **{k: np.asarray(arrays[k], self.fields[k][1]) for k in self.fields})
    os.replace(tmp, self._part(c))

  def _prepare(self):
    """Creates the chunk directory (primary), refusing chunks written for another key."""

    def check_or_stamp():
      os.makedirs(self._chunk_dir, exist_ok=True)
      stamp = os.path.join(self._chunk_dir, "key.json")
      if os.path.exists(stamp):
        with open(stamp) as f:
          old = json.load(f)
        if old != self._meta():
          raise errors.InvalidInput(
            f"{self._chunk_dir} holds a partial build of other data or layout ({old.get('key')}, "
            f"chunk {old.get('chunk')}; expected {self.key}, chunk {self.chunk}): remove it"
          )
      else:
        with open(stamp + ".tmp", "w") as f:
          json.dump(self._meta(), f)
        os.replace(stamp + ".tmp", stamp)

    distributed.on_primary(check_or_stamp, f"store {os.path.basename(self.directory)} ready")
    if not os.path.isdir(self._chunk_dir):
      raise errors.NotFound(
        f"{self._chunk_dir} is not visible from process {jax.process_index()}: "
        "WORKDIR (and features.cache_dir) must be a filesystem every process sees"
      )

  def _discard(self):
    """Primary only: removes a complete store's files (store.json first: a store without
    it is incomplete whatever else remains)."""
    os.remove(os.path.join(self.directory, META))
    for name in self.fields:
      path = os.path.join(self.directory, f"{name}.npy")
      if os.path.exists(path):
        os.remove(path)

  def _consolidate(self):
    """Primary only: chunks -> one .npy per field (memory of one chunk), then store.json."""
    missing = [c for c in range(self.num_chunks) if not os.path.exists(self._part(c))]
    if missing:
      raise errors.NotFound(
        f"{self._chunk_dir}: chunks {missing[:5]} missing after every process finished; "
        "WORKDIR must be a filesystem every process sees"
      )
    sums = {}
    for name, (shape, dtype) in self.fields.items():
      tmp = os.path.join(self.directory, f"{name}.npy.tmp")
      out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.dtype(dtype), shape=(self.num_rows,) + shape
      )
      for c in range(self.num_chunks):
        start, stop = self.rows(c)
        try:
          out[start:stop] = self._read_chunk(c)[name]
        except errors.UserError:
          os.remove(self._part(c))  # the next run recomputes it
          raise
      out.flush()
      sums[name] = crc32_of(out)
      del out
      os.replace(tmp, os.path.join(self.directory, f"{name}.npy"))
    with open(os.path.join(self.directory, META + ".tmp"), "w") as f:
      json.dump(dict(self._meta(), crc32=sums), f, indent=1)
    os.replace(os.path.join(self.directory, META + ".tmp"), os.path.join(self.directory, META))
    shutil.rmtree(self._chunk_dir)

  def build(
    self,
    compute: Callable[[int, int], Mapping[str, np.ndarray]],
    *,
    name: str = "rows",
    log: Optional[Callable[[str], None]] = None,
  ) -> Dict[str, np.ndarray]:
    """Computes the missing chunks this process owns with compute(start, stop) -> arrays,
    consolidates, and returns the memory-mapped fields. Every process must call it."""
    log = log or (lambda msg: logging.info("%s", msg))
    if distributed.agree(f"store {self.directory} complete", self.complete()):
      fields, corrupt = None, None
      try:
        fields = self.open()
      except errors.Corrupt as e:
        logging.warning("%s: rebuilding the store", e)
        corrupt = e
      if distributed.agree(f"store {self.directory} verified", corrupt is None):
        if corrupt is not None:  # process 0 read it fine, this one did not
          raise corrupt
        log(f"{name}: using the complete store {self.directory}")
        return fields
      distributed.on_primary(self._discard, f"store {os.path.basename(self.directory)} discarded")
    self._prepare()
    mine = self.owned_missing()
    total_rows = sum(self.rows(c)[1] - self.rows(c)[0] for c in mine)
    skipped = len(range(jax.process_index(), self.num_chunks, jax.process_count())) - len(mine)
    if skipped:
      log(f"{name}: resuming, {skipped} chunk(s) of this process already in {self._chunk_dir}")
    t0, done = time.perf_counter(), 0
    for c in mine:
      start, stop = self.rows(c)
      self.write_chunk(c, compute(start, stop))
      done += stop - start
      rate = done / max(time.perf_counter() - t0, 1e-9)
      log(
        f"{name}: chunk {c + 1}/{self.num_chunks} written ({done}/{total_rows} rows of process "
        f"{jax.process_index()}, {rate:.1f} rows/s, ETA "
        f"{(total_rows - done) / max(rate, 1e-9):.0f}s)"
      )
    distributed.barrier(f"store {os.path.basename(self.directory)} chunks")
    distributed.on_primary(
      self._consolidate, f"store {os.path.basename(self.directory)} consolidated"
    )
    if not self.complete():
      raise RuntimeError(f"{self.directory}: process 0 did not complete the store (see its log)")
    return self.open()
