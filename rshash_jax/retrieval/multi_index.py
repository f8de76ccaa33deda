"""Exact k-nearest-neighbour search in Hamming space by multi-index hashing.

Norouzi, Punjani, Fleet, "Fast Exact Search in Hamming Space with Multi-Index Hashing",
TPAMI 2014. A K-bit code is cut into m disjoint substrings of about K / m bits; substring
j of every database code keys hash table j. If two codes differ in d bits, one of their m
substrings differs in at most floor(d / m) bits (pigeonhole), so probing every table at
substring radius 0, 1, 2, ... finds every code within a growing radius:

  after radius rho has been probed in tables 0..j (and rho - 1 in the others), every code
  at distance <= m * rho + j from the query has been found (an unfound code differs in
  >= rho + 1 bits in each of the first j + 1 substrings and >= rho in the rest).

A query stops as soon as k codes at distance <= that certified radius are known: they
are its exact k nearest, and every code tied at the k-th distance is among the found
ones, so sorting them by (distance, database index) gives exactly the order of the
linear scan (`hamming.HammingIndex`, `rshash_jax.retrieval.hamming`'s contract).

Layout. Table j is a stable sort of the database ids by substring value (`order`, uint32)
with, for substrings of up to 24 bits, a directory of 2^s + 1 offsets into it (a bucket is
a slice), and for longer ones the sorted values themselves (a bucket is found by binary
search). Saved as plain .npy files (no pickle) beside `multi_index.json`; `load` memory-
maps them, so an index larger than memory is searched from the page cache.

Search is batched over queries in numpy: each step (radius, table) forms every probe of
the active queries (query substring XOR every s-bit mask of that weight), reads the
buckets' ids, computes the candidates' full distances from the codes, and keeps a
candidate only in the step that first reaches it (the first table whose substring
distance is smallest: no candidate is counted twice). A histogram of found distances per
query gives the certified count at each step; candidates beyond the k-th distance found
so far are dropped, so memory stays O(query batch * (k + ties)).

The number of substrings follows the paper: m = K / log2(N) rounded up, substrings of at
most 32 bits. A query whose probes outnumber the codes, or whose candidates pass a budget
(N / 512 by default: CANDIDATES_PER_SCAN), is answered by the linear scan instead: the
same results, at little more than the scan's cost. Learned codes are far from uniform
(clusters, duplicates), so their buckets are uneven: `benchmarks/hamming.py --multi_index`
measures both kinds against the scan.

Which engine answers (`search(engine=...)`): whether the index beats the scan depends on
N, K, k, how the codes spread and the host, so the choice is measured where the index is
built: `calibrate` times both, interleaved, on a sample of the archive's own codes as
queries at k = 10 and 100 and stores the faster per k in the index's metadata
(`crossover`); `engine="auto"` then follows the entry of the nearest k (in log k), and
the multi-index where none was measured. "multi_index" and "scan" force one; every
engine returns the same results.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import time
from typing import List, Optional, Tuple

import jax
import numpy as np

from rshash_jax import errors
from rshash_jax.parallel import sharding
from rshash_jax.retrieval import hamming

FORMAT = "rshash_jax.multi_index/1"
META = "multi_index.json"
_DIRECTORY_BITS = 24  # substrings up to this long get an offset directory (2^s + 1 int64)
_PROBE_ELEMENTS = 1 << 21  # probes formed at once (queries x masks), bounds step memory
# One candidate here (gather, XOR, popcount, substring test in numpy) costs about as much
# as the scan's comparisons with 512 codes (2-core EPYC, 2026-12-04: ~80 ns against
# ~0.2 ns per code and query in HammingIndex's batched scan): past N / 512 candidates a
# query is cheaper to scan (benchmarks/hamming.py --multi_index).
CANDIDATES_PER_SCAN = 512
ENGINES = ("auto", "multi_index", "scan")
CALIBRATION_KS = (10, 100)


def codes_digest(codes: np.ndarray) -> str:
  """sha256 of packed codes (little-endian uint32 rows): ties an index to its codes file."""
  h = hashlib.sha256()
  for s in range(0, codes.shape[0], 1 << 20):
    h.update(np.ascontiguousarray(codes[s : s + (1 << 20)], dtype="<u4").tobytes())
  return h.hexdigest()


def default_substrings(bits: int, num_codes: int) -> int:
  """m = bits / log2(N) rounded up (substrings of about log2 N bits, the paper's choice,
  never longer), >= ceil(bits / 32), <= bits."""
  per = max(1.0, math.log2(max(num_codes, 2)))
  m = max(1, math.ceil(bits / per - 1e-9))
  return int(min(bits, max(m, -(-bits // 32))))


def split(bits: int, m: int) -> List[Tuple[int, int]]:
  """(start bit, length) of m contiguous substrings covering `bits` bits, lengths within 1."""
  base, extra = divmod(bits, m)
  out, start = [], 0
  for j in range(m):
    length = base + (1 if j < extra else 0)
    out.append((start, length))
    start += length
  return out


def substring(words: np.ndarray, start: int, length: int) -> np.ndarray:
  """Bits [start, start + length) of packed codes uint32 [n, W] as uint64 [n] (length <= 32)."""
  lo, off = divmod(start, hamming.WORD_BITS)
  v = words[:, lo].astype(np.uint64) >> np.uint64(off)
  if off + length > hamming.WORD_BITS:
    v |= words[:, lo + 1].astype(np.uint64) << np.uint64(hamming.WORD_BITS - off)
  return v & np.uint64((1 << length) - 1)


_MASKS = {}


def _masks(length: int, radius: int) -> np.ndarray:
  """Every `length`-bit value with `radius` bits set, uint64, ascending."""
  key = (length, radius)
  if key not in _MASKS:
    if radius > length:
      _MASKS[key] = np.zeros(0, np.uint64)
    else:
      vals = [sum(1 << b for b in c) for c in itertools.combinations(range(length), radius)]
      _MASKS[key] = np.sort(np.asarray(vals, np.uint64))
  return _MASKS[key]


def _ragged_positions(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
  """Concatenation of arange(starts[i], starts[i] + lens[i]) over i."""
  total = int(lens.sum())
  if total == 0:
    return np.zeros(0, np.int64)
  first = np.cumsum(lens) - lens
  return np.arange(total, dtype=np.int64) - np.repeat(first - starts, lens)


@dataclasses.dataclass
class _Batch:
  """The state of one query batch's search (see MultiIndex._search_batch)."""

  q: np.ndarray  # uint32 [nq, W] packed queries
  qsub: np.ndarray  # uint64 [nq, m] their substrings
  k: int
  max_candidates: int
  hist: np.ndarray  # int64 [nq, bits + 2] found codes by distance
  bound: np.ndarray  # int64 [nq] the k-th smallest distance found so far
  spent: np.ndarray  # int64 [nq] candidates read
  to_scan: np.ndarray  # bool [nq] handed to the scan
  kept: List[Tuple[np.ndarray, np.ndarray, np.ndarray]]  # (query row, distance, id)


class MultiIndex:
  """Exact Hamming k-NN over packed codes by multi-index hashing; same results as the scan.

  Build from packed codes (`MultiIndex(codes, bits=...)`), or `MultiIndex.load(dir)` a
  saved one (memory-mapped). `search(q, k)` returns (distances int32 [Q, k], indices
  int32 [Q, k]) sorted by (distance, database index), as `hamming.HammingIndex.search`.
  """

  def __init__(self, db_packed, *, bits: Optional[int] = None, substrings: Optional[int] = None):
    db = hamming.check_packed("db_packed", db_packed)
    n, w = db.shape
    if n >= 2**32:
      raise errors.TooLarge(f"{n} codes: a multi-index holds at most 2^32 - 1")
    bits = w * hamming.WORD_BITS if bits is None else bits
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
      raise errors.WrongType(f"bits must be an integer, got {bits!r}")
    if not (w - 1) * hamming.WORD_BITS < bits <= w * hamming.WORD_BITS:
      raise errors.InvalidInput(f"bits={bits} does not match codes of {w} uint32 words")
    m = default_substrings(bits, n) if substrings is None else substrings
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= bits:
      raise errors.InvalidInput(f"substrings must be an integer in [1, {bits}], got {m!r}")
    parts = split(int(bits), int(m))
    if max(length for _, length in parts) > 32:
      raise errors.InvalidInput(
        f"substrings={m} gives substrings of {parts[0][1]} bits; at most 32 "
        f"(use substrings >= {-(-bits // 32)})"
      )
    self.codes = db
    self.meta = {}
    self._scanner = None
    self.scanned_queries = 0
    self.bits = int(bits)
    self.parts = parts
    self.tables = [self._build(db, start, length) for start, length in parts]

  @staticmethod
  def _build(db: np.ndarray, start: int, length: int) -> dict:
    v = substring(db, start, length)
    order = np.argsort(v, kind="stable").astype(np.uint32)
    if length <= _DIRECTORY_BITS:
      counts = np.bincount(v.astype(np.int64), minlength=1 << length)
      offsets = np.zeros((1 << length) + 1, np.int64)
      np.cumsum(counts, out=offsets[1:])
      return {"order": order, "offsets": offsets}
    return {"order": order, "keys": v[order]}

  @property
  def num_codes(self) -> int:
    return int(self.codes.shape[0])

  @property
  def num_words(self) -> int:
    return int(self.codes.shape[1])

  def nbytes(self) -> int:
    """Bytes of the tables (the codes themselves not counted)."""
    return int(sum(a.nbytes for t in self.tables for a in t.values()))

  # ---------------------------------------------------------------- persistence

  def save(self, directory: str, **extra):
    """Writes the codes and tables as .npy files and `multi_index.json` (written last;
    `extra` items go into it too)."""
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "codes.npy"), np.ascontiguousarray(self.codes))
    for j, t in enumerate(self.tables):
      for name, a in t.items():
        np.save(os.path.join(directory, f"table{j}_{name}.npy"), a)
    meta = {
      "format": FORMAT,
      "bits": self.bits,
      "num_codes": self.num_codes,
      "num_words": self.num_words,
      "parts": [list(p) for p in self.parts],
      "codes_sha256": codes_digest(self.codes),
      **({"crossover": self.meta["crossover"]} if "crossover" in self.meta else {}),
      **extra,
    }
    tmp = os.path.join(directory, META + ".tmp")
    with open(tmp, "w") as f:
      json.dump(meta, f)
    os.replace(tmp, os.path.join(directory, META))

  @classmethod
  def load(cls, directory: str, *, mmap: bool = True, verify: bool = True) -> "MultiIndex":
    """Opens a saved index (memory-mapped unless mmap=False); every file is checked.

    verify=True also reads every table once (order a permutation-sized range, offsets
    non-decreasing, keys sorted): a crafted or truncated index is refused by name.
    """
    path = os.path.join(directory, META)
    try:
      with open(path) as f:
        meta = json.load(f)
    except FileNotFoundError as e:
      raise errors.NotFound(f"{path}: no multi-index here (write one with `index`)") from e
    except (OSError, ValueError) as e:
      raise errors.Corrupt(f"{path}: unreadable ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
      raise errors.Corrupt(f"{path}: not a {FORMAT} index (format {meta.get('format')!r})")
    try:
      bits, n, w = int(meta["bits"]), int(meta["num_codes"]), int(meta["num_words"])
      parts = [(int(a), int(b)) for a, b in meta["parts"]]
    except (KeyError, TypeError, ValueError) as e:
      raise errors.Corrupt(f"{path}: field missing or malformed ({e})") from e
    consistent = n >= 1 and w >= 1 and (w - 1) * 32 < bits <= w * 32 and parts
    if not consistent or split(bits, len(parts)) != parts or max(p[1] for p in parts) > 32:
      raise errors.Corrupt(f"{path}: inconsistent bits={bits}, words={w}, parts={parts}")
    _check_crossover(path, meta.get("crossover"))
    mode = "r" if mmap else None

    def array(name, dtype, shape):
      p = os.path.join(directory, name)
      try:
        a = np.load(p, mmap_mode=mode, allow_pickle=False)
      except FileNotFoundError as e:
        raise errors.NotFound(f"{p}: missing from the multi-index") from e
      except (OSError, ValueError) as e:
        raise errors.Corrupt(f"{p}: unreadable ({e})") from e
      if a.dtype != np.dtype(dtype) or a.shape != shape:
        raise errors.Corrupt(f"{p}: {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}")
      return a

    self = cls.__new__(cls)
    self.codes = array("codes.npy", np.uint32, (n, w))
    self.bits, self.parts, self.tables, self.meta = bits, parts, [], meta
    self._scanner, self.scanned_queries = None, 0
    for j, (_, length) in enumerate(parts):
      t = {"order": array(f"table{j}_order.npy", np.uint32, (n,))}
      if length <= _DIRECTORY_BITS:
        t["offsets"] = array(f"table{j}_offsets.npy", np.int64, ((1 << length) + 1,))
      else:
        t["keys"] = array(f"table{j}_keys.npy", np.uint64, (n,))
      if verify:
        bad = int(np.max(t["order"])) >= n
        if "offsets" in t:
          o = t["offsets"]
          bad |= o[0] != 0 or o[-1] != n or bool(np.any(np.diff(o) < 0))
        else:
          bad |= bool(np.any(np.diff(t["keys"]) < 0))
        if bad:
          raise errors.Corrupt(f"{directory}: table {j} is inconsistent (ids or buckets)")
      self.tables.append(t)
    return self

  # ---------------------------------------------------------------- search

  def _bucket_ranges(self, j: int, probes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    t = self.tables[j]
    if "offsets" in t:
      p = probes.astype(np.int64)
      return t["offsets"][p], t["offsets"][p + 1]
    keys = t["keys"]
    return np.searchsorted(keys, probes, "left"), np.searchsorted(keys, probes, "right")

  def _substring_distances(self, x: np.ndarray) -> np.ndarray:
    """Per-substring popcounts of XOR words x [n, W] -> int [n, m]."""
    return np.stack([np.bitwise_count(substring(x, a, s)) for a, s in self.parts], axis=1).astype(
      np.int16
    )

  def calibrate(
    self, *, queries: int = 256, ks=CALIBRATION_KS, repeats: int = 3, seed: int = 0
  ) -> dict:
    """Times the multi-index against the scan on `queries` of the archive's own codes
    (a seeded sample) at each k of `ks`, interleaved, `repeats` times (the median counts),
    after one untimed warm-up of each; stores and returns meta["crossover"]."""
    rng = np.random.default_rng(seed)
    n = self.num_codes
    q = np.asarray(self.codes[np.sort(rng.choice(n, min(queries, n), replace=False))])
    entries = []
    for k in sorted({min(int(k), n) for k in ks}):
      times = {"multi_index": [], "scan": []}
      for rep in range(repeats + 1):
        for engine in times:
          t = time.perf_counter()
          self.search(q, k, engine=engine)
          if rep:  # the first round compiles the scan and warms the caches
            times[engine].append(time.perf_counter() - t)
      med = {e: float(np.median(v)) for e, v in times.items()}
      entries.append(
        {
          "k": k,
          "multi_index_s": med["multi_index"],
          "scan_s": med["scan"],
          "engine": min(med, key=med.get),
        }
      )
    self.meta["crossover"] = {
      "queries": int(q.shape[0]),
      "repeats": repeats,
      "host": platform.node(),
      "entries": entries,
    }
    return self.meta["crossover"]

  def engine_for(self, k: int) -> str:
    """The engine `search(engine="auto")` takes at this k: the faster one measured by
    `calibrate` at the nearest calibrated k (in log k); the multi-index if none was."""
    entries = (self.meta.get("crossover") or {}).get("entries") or []
    if not entries:
      return "multi_index"
    nearest = min(entries, key=lambda e: abs(math.log(max(int(e["k"]), 1)) - math.log(k)))
    return "scan" if nearest.get("engine") == "scan" else "multi_index"

  def search(
    self,
    q_packed,
    k: int,
    *,
    query_batch: int = 256,
    max_candidates: Optional[int] = None,
    engine: str = "auto",
  ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k: (distances int32 [Q, k], indices int32 [Q, k]), by (distance, index).

    engine: "auto" (the calibrated choice, `engine_for`), "multi_index" or "scan".
    A query that would read more than `max_candidates` bucket entries (default
    N / CANDIDATES_PER_SCAN, at least 4k) is answered by the linear scan instead
    (`hamming.HammingIndex`): the same results, at about the scan's cost rather than many
    times it. `scanned_queries` counts them.
    """
    q = hamming.check_queries(q_packed, k, self.num_words, self.num_codes)
    if engine not in ENGINES:
      raise errors.InvalidInput(f"engine must be one of {ENGINES}, got {engine!r}")
    if query_batch < 1:
      raise errors.InvalidInput(f"query_batch must be >= 1, got {query_batch}")
    if (self.engine_for(int(k)) if engine == "auto" else engine) == "scan":
      return self._scan(q, int(k))
    if max_candidates is None:
      max_candidates = max(self.num_codes // CANDIDATES_PER_SCAN, 4 * int(k))
    out_d = np.zeros((q.shape[0], k), np.int32)
    out_i = np.zeros((q.shape[0], k), np.int32)
    for s in range(0, q.shape[0], query_batch):
      d, i = self._search_batch(q[s : s + query_batch], int(k), int(max_candidates))
      out_d[s : s + len(d)], out_i[s : s + len(d)] = d, i
    return out_d, out_i

  def _search_batch(
    self, q: np.ndarray, k: int, max_candidates: int
  ) -> Tuple[np.ndarray, np.ndarray]:
    nq, m = q.shape[0], len(self.parts)
    b = _Batch(
      q=q,
      qsub=np.stack([substring(q, a, s) for a, s in self.parts], axis=1),
      k=k,
      max_candidates=max_candidates,
      hist=np.zeros((nq, self.bits + 2), np.int64),
      bound=np.full(nq, self.bits, np.int64),
      spent=np.zeros(nq, np.int64),
      to_scan=np.zeros(nq, bool),
      kept=[],
    )
    active = np.arange(nq)
    for rho in range(max(length for _, length in self.parts) + 1):
      for j, (_, length) in enumerate(self.parts):
        if active.size == 0:
          break
        if math.comb(length, rho) >= self.num_codes:
          # More probes per query than codes: a scan of the codes is cheaper (and exact).
          b.to_scan[active] = True
          active = active[:0]
          break
        masks = _masks(length, rho)
        if masks.size:
          self._step(b, j, masks, active)
          active = active[~b.to_scan[active]]
        certified = m * rho + j  # every code at distance <= certified has been found
        if certified >= self.bits:
          active = active[:0]
          break
        active = active[b.hist[active, : certified + 1].sum(axis=1) < k]
      if active.size == 0:
        break
    to_scan, none = b.to_scan, np.zeros(0, np.int64)
    qs, ds, ids = (np.concatenate([t[n] for t in b.kept] + [none]) for n in range(3))
    order = np.lexsort((ids, ds, qs))
    qs, ds, ids = qs[order], ds[order], ids[order]
    first = np.searchsorted(qs, np.arange(nq))
    held = np.diff(np.append(first, qs.size))
    done = ~to_scan
    if np.any(held[done] < k):  # a certified query holds >= k candidates
      raise AssertionError("multi-index search kept fewer than k candidates for a query")
    take = np.minimum(first[:, None] + np.arange(k)[None, :], max(qs.size - 1, 0))
    out_d = ds[take].astype(np.int32) if qs.size else np.zeros((nq, k), np.int32)
    out_i = ids[take].astype(np.int32) if qs.size else np.zeros((nq, k), np.int32)
    if to_scan.any():
      rows = np.flatnonzero(to_scan)
      out_d[rows], out_i[rows] = self._scan(q[rows], k)
    self.scanned_queries += int(to_scan.sum())
    return out_d, out_i

  def _scan(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k by the linear scan (`hamming.HammingIndex`, built on first use), for
    queries whose probes or candidates would cost more than reading every code. On this
    process's devices only, as the index itself: every process holds all the codes, and
    `index` calibrates on the primary process alone."""
    if self._scanner is None:
      mesh = sharding.data_mesh(jax.local_devices())
      self._scanner = hamming.HammingIndex(np.asarray(self.codes), mesh=mesh)
    return self._scanner.search(q, k)

  def _step(self, b: _Batch, j: int, masks: np.ndarray, active: np.ndarray):
    """Probes table j at the substring radius of `masks` for the active queries."""
    per = max(1, _PROBE_ELEMENTS // masks.size)
    for s in range(0, active.size, per):
      rows = active[s : s + per]
      probes = (b.qsub[rows, j][:, None] ^ masks[None, :]).ravel()
      lo, hi = self._bucket_ranges(j, probes)
      lens = (hi - lo).astype(np.int64)
      # A query whose candidates outgrow the budget goes to the scan instead.
      per_row = lens.reshape(len(rows), masks.size)
      b.spent[rows] += per_row.sum(axis=1)
      over = b.spent[rows] > b.max_candidates
      if over.any():
        b.to_scan[rows[over]] = True
        per_row[over] = 0
        lens = per_row.ravel()
      pos = _ragged_positions(lo.astype(np.int64), lens)
      if pos.size == 0:
        continue
      qrow = np.repeat(np.repeat(rows, masks.size), lens)
      ids = self.tables[j]["order"][pos].astype(np.int64)
      x = self.codes[ids] ^ b.q[qrow]
      d = np.bitwise_count(x).sum(axis=1, dtype=np.int64)
      sub = self._substring_distances(x)
      # Counted once: in the step that reaches it first (the first table of least
      # substring distance; its distance in table j is rho by construction).
      first = np.argmin(sub, axis=1) == j
      qrow, ids, d = qrow[first], ids[first], d[first]
      h = b.hist
      h += np.bincount(qrow * h.shape[1] + d, minlength=h.size).reshape(h.shape)
      # The k-th smallest distance found so far bounds the answer: drop what lies beyond.
      touched = np.unique(qrow)
      c = np.cumsum(h[touched], axis=1)
      reached = c[:, -1] >= b.k
      b.bound[touched[reached]] = np.argmax(c[reached] >= b.k, axis=1)
      keep = d <= b.bound[qrow]
      b.kept.append((qrow[keep], d[keep], ids[keep]))


def _check_crossover(path: str, crossover) -> None:
  """A saved crossover (`calibrate`) must be what calibrate writes, or absent."""
  if crossover is None:
    return
  entries = crossover.get("entries") if isinstance(crossover, dict) else None
  ok = isinstance(entries, list) and all(
    isinstance(e, dict)
    and isinstance(e.get("k"), int)
    and not isinstance(e.get("k"), bool)
    and e["k"] >= 1
    and e.get("engine") in ("multi_index", "scan")
    for e in entries
  )
  if not ok:
    raise errors.Corrupt(f"{path}: field 'crossover' is malformed (rebuild the index)")


def open_matching(index_path: str, codes: np.ndarray, codes_path: str) -> "MultiIndex":
  """A saved multi-index, refused unless it holds exactly these codes (by sha256)."""
  mi = MultiIndex.load(index_path)
  if mi.num_codes != codes.shape[0] or mi.meta.get("codes_sha256") != codes_digest(codes):
    raise errors.Incompatible(
      f"{index_path} was not built from the codes of {codes_path} ({mi.num_codes} codes "
      f"there, {codes.shape[0]} here): rebuild it with `index --codes={codes_path}`"
    )
  return mi
