"""Bit-packed binary codes and exact Hamming ranking, in jitted `jnp` bitwise ops.

Contract (relied on by every metric and by `search`):

* A K-bit code is packed into `ceil(K / 32)` uint32 words, bit `b` of the code in
  bit `b % 32` (least significant first) of word `b // 32`. Unused high bits of the
  last word are zero in every code, so they never add to a distance.
* The ranking of a database for a query is by Hamming distance, ties broken by the
  lower database index (a stable order). `hamming_topk`, `HammingIndex.search` and
  the full rankings of `rshash_jax.metrics` all give exactly this order.

How the top-k stays exact and fast: distances are small integers, so nothing sorts
or calls `lax.top_k` (on XLA:CPU a fixed ~16 us a row at k = 100 even on 512 keys).
Each database chunk is cut into groups of L consecutive items; one fused pass
computes each group's minimum distance (uint8). The k best items of a chunk always
lie in the k groups with the smallest (minimum, group index) (an item outside those
groups has k better group minima before it), so selecting those groups (in two
levels when there are many, `_select_groups`) and then the k best of the gathered
k * L candidates is exact. Every selection counts (`_select_first`): the k-th
smallest value T by bisection on counts, bracketed by the level before; then all
positions below T and the first ones at T, as bit masks. Lists stay in index order
(chunks and devices are merged by concatenation and the same selection) and are
sorted by (distance, index) once, at the end.
On CPUs the popcount is a SWAR sum on uint32 words, or `population_count` on uint64
words from 128 bits up (`_popcount_sum`, `HammingIndex`); padding rows are masked per
group, not per item (`_local_topk`).
The database is sharded by rows across the devices of a ('data',) mesh; each device
ranks its shard and the per-device lists are merged with the same exact selection.

Two engines compute the distances of the group pass (`HammingIndex(engine=...)`):
"popcount" (XOR + popcount, above) and "matmul": over +-1 codes of B stored bits,
distance = (B - <q, x>) / 2, so a batch of queries against a chunk is one integer
matrix product (int8 in, int32 out; bf16 in, f32 out on TPUs, exact: |<q, x>| <= B <=
256 < 2^24), the chunk unpacked to +-1 on the device in sub-blocks of _MATMUL_BLOCK
codes so that the [queries, block] product stays bounded. That is the work GPUs'
tensor cores and TPUs' matrix units do best (a TPU has no fast popcount). Padding bits
are 0 in queries and codes alike (-1 after unpacking): they add 1 to every product and
B counts them, so they add nothing to a distance. Both engines give the same distances,
hence the same selection and the same order. "auto" takes the matrix product on GPUs
and TPUs for query batches of at least MATMUL_MIN_BATCH, else the popcount.
"""

import contextlib
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rshash_jax import errors
from rshash_jax.models import signs
from rshash_jax.parallel import distributed, sharding

WORD_BITS = 32


def num_words(bits: int) -> int:
  """Number of uint32 words that hold a `bits`-bit code."""
  return -(-int(bits) // WORD_BITS)


def pack_codes(codes: np.ndarray, *, binary: Optional[bool] = None) -> np.ndarray:
  """Packs codes [N, K] into uint32 words [N, ceil(K / 32)] (LSB-first bit order).

  Args:
    codes: array [N, K], N >= 0, K >= 1: real-valued network outputs, {-1, +1}
      codes, or {0, 1} / boolean codes.
    binary: how a value becomes a bit. False: bit set where value >= 0 (so real
      outputs and {-1, +1} codes: 0 counts as +1, never a "zero bit"). True: bit set
      where value == 1 ({0, 1} input; other values are an error). None (default):
      True for boolean arrays and for arrays whose values are all 0 or 1 with at
      least one 0 and no negative, else False. Pass it explicitly when in doubt.

  Returns:
    np.ndarray of dtype uint32 and shape [N, ceil(K / 32)].
  """
  arr = np.asarray(codes)
  if arr.ndim != 2:
    raise errors.InvalidInput(f"codes must be a 2-D array [N, K], got shape {arr.shape}")
  if arr.shape[1] < 1:
    raise errors.InvalidInput("codes must have at least one bit (K >= 1), got K = 0")
  if arr.dtype == bool:
    bits = arr
  else:
    if not (np.issubdtype(arr.dtype, np.number)):
      raise errors.WrongType(f"codes must be numeric or boolean, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all():
      raise errors.InvalidInput("codes contain NaN or infinity; cannot take their sign")
    if binary is None:
      binary = bool(arr.size) and bool(np.isin(arr, (0, 1)).all()) and bool((arr == 0).any())
    if binary:
      if arr.size and not np.isin(arr, (0, 1)).all():
        raise errors.InvalidInput("binary=True needs codes in {0, 1}; found other values")
      bits = arr == 1
    else:
      bits = signs.bits(arr)
  n, k = bits.shape
  packed8 = np.packbits(bits, axis=1, bitorder="little")
  pad = num_words(k) * 4 - packed8.shape[1]
  if pad:
    packed8 = np.pad(packed8, ((0, 0), (0, pad)))
  return np.ascontiguousarray(packed8).view("<u4").astype(np.uint32, copy=False).reshape(n, -1)


def pack_signs(x: jax.Array) -> jax.Array:
  """In-graph packing of real values [..., K] (bit set where x >= 0) -> uint32 [..., W].

  Same layout as `pack_codes`; use it inside jitted encoders so that only the
  packed words (32x smaller than float codes) leave the device.
  """
  k = x.shape[-1]
  w = num_words(k)
  bits = signs.bits(x).astype(jnp.uint32)
  bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, w * WORD_BITS - k)])
  bits = bits.reshape(x.shape[:-1] + (w, WORD_BITS))
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
  return jnp.sum(jnp.left_shift(bits, shifts), axis=-1, dtype=jnp.uint32)


def unpack_codes(packed, bits: int) -> np.ndarray:
  """Inverse of `pack_codes`: uint32 [N, W] -> int8 codes in {-1, +1} of shape [N, bits]."""
  packed = check_packed("packed", packed, allow_empty=True)
  if not 1 <= bits <= packed.shape[1] * WORD_BITS:
    raise errors.InvalidInput(f"bits={bits} does not fit {packed.shape[1]} uint32 words")
  as8 = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8)
  b = np.unpackbits(as8, axis=1, bitorder="little")[:, :bits]
  return b.astype(np.int8) * 2 - 1


def check_packed(name: str, arr, *, allow_empty: bool = False) -> np.ndarray:
  """Validates a packed code array and returns it as a host uint32 ndarray."""
  a = np.asarray(arr)
  if a.ndim != 2:
    raise errors.InvalidInput(f"{name} must be packed codes [N, W], got shape {a.shape}")
  if a.dtype != np.uint32:
    raise errors.WrongType(
      f"{name} must be uint32 packed codes (see pack_codes), got dtype {a.dtype}"
    )
  if a.shape[1] < 1:
    raise errors.InvalidInput(f"{name} has no code words (W = 0)")
  if not allow_empty and a.shape[0] == 0:
    raise errors.InvalidInput(f"{name} is empty (0 codes)")
  return a


def check_queries(q_packed, k, num_words: int, num_codes: int) -> np.ndarray:
  """Validates packed queries and k against an index of `num_codes` codes of `num_words`
  words (HammingIndex, MultiIndex); returns the queries as a host uint32 array."""
  q = check_packed("q_packed", q_packed)
  if q.shape[1] != num_words:
    raise errors.InvalidInput(
      f"code length mismatch: queries have {q.shape[1]} words, the index {num_words}"
    )
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_codes:
    raise errors.InvalidInput(
      f"k must be an integer in [1, {num_codes}] (database size), got {k!r}"
    )
  return q


def _check_pair(q, db) -> Tuple[np.ndarray, np.ndarray]:
  q = check_packed("q_packed", q)
  db = check_packed("db_packed", db)
  if q.shape[1] != db.shape[1]:
    raise errors.InvalidInput(
      f"code length mismatch: queries have {q.shape[1]} words "
      f"({q.shape[1] * 32} bits max), database {db.shape[1]} words"
    )
  return q, db


_M1, _M2, _M4 = 0x55555555, 0x33333333, 0x0F0F0F0F


def _nibble_counts(x: jax.Array) -> jax.Array:
  """uint32 -> the popcount of each 4-bit field of x, in that field (0..4)."""
  x = x - ((x >> 1) & jnp.uint32(_M1))
  return (x & jnp.uint32(_M2)) + ((x >> 2) & jnp.uint32(_M2))


def _popcount_sum(pairs, swar: bool = False) -> jax.Array:
  """Sum over words of popcount(a ^ b) -> int32, for (a, b) pairs that broadcast together.

  swar=False: `lax.population_count` per word (one instruction per word on GPUs and
  on CPUs with a vector popcount). swar=True (uint32 words): bit-parallel counts that
  stay in 4-bit fields for two words and in bytes for up to six, then one multiply
  sums each code's bytes: without AVX-512 VPOPCNTDQ, LLVM emulates each 32-bit lane's
  popcount with a byte lookup plus a per-lane horizontal sum, and SWAR skips most of
  those sums (the XOR / popcount / group-minimum pass per query, 1M codes, one core:
  32 bits 316 -> 237 us, 64 bits 376 -> 327, 128 bits 709 -> 610). Both are exact.
  """
  xs = [jnp.bitwise_xor(a, b) for a, b in pairs]
  if not swar or xs[0].dtype != jnp.uint32:
    total = None
    for x in xs:  # summed in the words' type, converted once
      c = lax.population_count(x)
      total = c if total is None else total + c
    return total.astype(jnp.int32)
  total = None
  for s in range(0, len(xs), 6):  # a byte holds <= 6 * 8 = 48 and a code's sum <= 192 < 256
    end = min(s + 6, len(xs))
    acc = None
    for j in range(s, end, 2):
      n = _nibble_counts(xs[j])
      if j + 1 < end:
        n = n + _nibble_counts(xs[j + 1])  # fields <= 8
      b = (n & jnp.uint32(_M4)) + ((n >> 4) & jnp.uint32(_M4))  # bytes <= 16
      acc = b if acc is None else acc + b
    c = lax.shift_right_logical(acc * jnp.uint32(0x01010101), jnp.uint32(24)).astype(jnp.int32)
    total = c if total is None else total + c
  return total


def use_swar(platform: str) -> bool:
  """Whether `_popcount_sum` uses the SWAR form on this platform (CPUs only)."""
  return platform == "cpu"


@functools.partial(jax.jit, static_argnames="swar")
def _distances(q: jax.Array, db: jax.Array, swar: bool) -> jax.Array:
  w = q.shape[1]
  return _popcount_sum(((q[:, None, i], db[None, :, i]) for i in range(w)), swar)


def hamming_distances(q_packed, db_packed) -> jax.Array:
  """All Hamming distances between packed queries [Q, W] and database [N, W] -> int32 [Q, N].

  Jitted XOR + population_count. It materialises Q x N distances: for large N use
  `hamming_topk` (bounded memory) instead.
  """
  q, db = _check_pair(q_packed, db_packed)
  return _distances(jnp.asarray(q), jnp.asarray(db), use_swar(jax.default_backend()))


def _kth_smallest(d: jax.Array, k: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Per row, the k-th smallest value of integer d [..., n]: bisection on counts.

  lo, hi [...] bracket it: fewer than k values below lo, and the k-th smallest <= hi.
  Each step counts the values below the middle of the bracket (one fused compare-and-sum
  pass); the loop ends when every row's bracket is one value, so a tight bracket (the
  callers pass the previous level's threshold) costs few passes.
  """
  d = d.astype(jnp.int32)

  def body(c):
    lo, hi = c
    mid = lo + (hi - lo + 1) // 2
    below = jnp.sum(d < mid[..., None], axis=-1, dtype=jnp.int32) < k
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid - 1)

  return lax.while_loop(
    lambda c: jnp.any(c[0] < c[1]), body, (lo.astype(jnp.int32), hi.astype(jnp.int32))
  )[0]


def _bitmask(mask: jax.Array) -> jax.Array:
  """bool [..., 32 m] -> uint32 [..., m]: bit j of word i is mask[..., 32 i + j]."""
  m = mask.reshape(*mask.shape[:-1], -1, WORD_BITS).astype(jnp.uint32)
  return jnp.sum(m << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _select_bit(m: jax.Array, r: jax.Array) -> jax.Array:
  """Position of the r-th (from 0) set bit of each uint32 m, where r < popcount(m)."""
  pos = jnp.zeros(m.shape, jnp.int32)
  for width in (16, 8, 4, 2, 1):
    low = lax.population_count(m & jnp.uint32((1 << width) - 1)).astype(jnp.int32)
    skip = r >= low
    r = jnp.where(skip, r - low, r)
    m = jnp.where(skip, m >> width, m)
    pos = jnp.where(skip, pos + width, pos)
  return pos


def _select_first(d: jax.Array, k: int, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Positions [..., k], ascending, of the k smallest of integer d [..., n] by (d, position).

  A counting selection (distances are small integers): T = the k-th smallest value
  (`_kth_smallest`, bracketed by lo / hi as there), then every position with d < T and
  the first k - #(d < T) with d == T (bit masks of 32 positions a word; the ties are
  cut inside the word where their running count passes k). The i-th output is the
  largest position with i selected before it, found by a binary search whose counts
  are a word's running count plus a popcount inside the word. No sort and no top_k;
  exact for any integer range.
  """
  n = d.shape[-1]
  if k > n:
    raise errors.InvalidInput(f"internal: selecting {k} of {n}")
  d = d.astype(jnp.int32)
  t = _kth_smallest(d, k, lo, hi)[..., None]
  pad = -n % WORD_BITS
  if pad:  # never selected: k values <= t lie before them
    d = jnp.pad(d, [(0, 0)] * (d.ndim - 1) + [(0, pad)], constant_values=np.iinfo(np.int32).max)
  lt, eq = _bitmask(d < t), _bitmask(d == t)
  need = k - jnp.sum(lax.population_count(lt), axis=-1, keepdims=True, dtype=jnp.int32)
  n_eq = lax.population_count(eq).astype(jnp.int32)
  take = jnp.clip(need - (jnp.cumsum(n_eq, axis=-1) - n_eq), 0, WORD_BITS)  # ties taken per word
  cut = _select_bit(eq, jnp.minimum(take, WORD_BITS - 1))  # below the first tie not taken
  low_bits = (jnp.uint32(1) << cut.astype(jnp.uint32)) - jnp.uint32(1)
  sel = lt | jnp.where(take >= n_eq, eq, eq & low_bits)
  count = lax.population_count(sel).astype(jnp.int32)
  before = jnp.cumsum(count, axis=-1) - count  # selected positions before each word
  j = jnp.arange(k, dtype=jnp.int32)
  top = 1 << (n + pad - 1).bit_length()

  def search(s, pos):  # the j-th selected position: the largest p with j selected before it
    trial = pos + (top >> (s + 1))
    w = jnp.minimum(trial // WORD_BITS, before.shape[-1] - 1)
    below_trial = (jnp.uint32(1) << (trial % WORD_BITS).astype(jnp.uint32)) - jnp.uint32(1)
    low = jnp.take_along_axis(sel, w, axis=-1) & below_trial
    ahead = jnp.take_along_axis(before, w, axis=-1) + lax.population_count(low).astype(jnp.int32)
    return jnp.where((trial < n + pad) & (ahead <= j), trial, pos)

  # A loop, not unrolled: XLA writes its result out. Unrolled, the arithmetic was fused
  # into the gathers that use the positions and recomputed for every gathered element
  # (32 per group and word), which cost more than the selection itself.
  return lax.fori_loop(0, top.bit_length() - 1, search, jnp.zeros(d.shape[:-1] + (k,), jnp.int32))


def _select_k(d: jax.Array, idx: jax.Array, k: int, lo, hi) -> Tuple[jax.Array, jax.Array]:
  """The k smallest of (d, idx) by (d, position) [..., k], in position order."""
  pos = _select_first(d, k, lo, hi)
  return jnp.take_along_axis(d, pos, axis=-1), jnp.take_along_axis(idx, pos, axis=-1)


def _bounds(d: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Per row (min, max) as int32: a bracket of any k-th smallest value for `_select_first`."""
  return jnp.min(d, axis=-1).astype(jnp.int32), jnp.max(d, axis=-1).astype(jnp.int32)


_MAX_GROUP = 32


_CHUNK_UNIT = _MAX_GROUP * 32  # chunks are multiples of this (or of a smaller target)


def _chunking(per_device: int, chunk_target: int) -> Tuple[int, int]:
  """(chunk, n_chunks): a device's rows in n_chunks equal chunks of at most chunk_target.

  chunk_target is a power of two. Chunks are multiples of min(_CHUNK_UNIT, chunk_target),
  not powers of two, so a shard is padded by less than one unit per chunk (a power of two
  could waste up to half of the scan). Shards of at most one unit keep a power-of-two chunk.
  """
  unit = min(_CHUNK_UNIT, chunk_target)
  if per_device <= unit:
    return 1 << max(0, math.ceil(math.log2(max(per_device, 1)))), 1
  n_chunks = -(-per_device // chunk_target)
  per_chunk = -(-per_device // n_chunks)
  return -(-per_chunk // unit) * unit, n_chunks


def _group_size(k: int, chunk: int) -> int:
  """The group size L for a chunk: selection work per chunk is about G + k * L with
  G = chunk / L groups, smallest at L ~ sqrt(chunk / k). L is a power of two that
  divides the chunk, capped at _MAX_GROUP because XLA:CPU stops fusing the
  XOR/popcount/group-min pass into one loop beyond it (docs/performance.md).
  """
  group = 1 << max(0, round(math.log2(max(1.0, math.sqrt(chunk / k)))))
  return min(
    group, chunk & -chunk, _MAX_GROUP
  )  # chunk & -chunk: the largest power of two dividing it


_CPU_CHUNK_BYTES = 8 << 20  # default cap on a chunk's code words on CPUs (HammingIndex)
_SUPER = 32  # groups per super-group in `_select_groups`


def _select_groups(gkey: jax.Array, kg: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Ascending indices of the kg best groups by (group minimum, group index), and the
  smallest and the largest of their minima (a bracket for the items' threshold).

  With many groups, two levels: the kg best super-groups (minimum over _SUPER
  consecutive groups) first, then the kg best of their kg * _SUPER groups. Exact: if a
  group's super-group is not among the kg best, each of those kg super-groups holds a
  group that ranks before it (its minimum is no larger, and on a tie its index is
  lower), so the group is not among the kg best either. The selections count
  (`_select_first`), so the levels also bracket each other's thresholds: the kg-th
  smallest group minimum lies between the smallest minimum and the kg-th smallest
  super-group minimum (each chosen super-group holds a group at its minimum).
  """
  qn, n_groups = gkey.shape
  n_super = n_groups // _SUPER
  if n_super >= 2 * kg and n_groups % _SUPER == 0:
    skey = jnp.min(gkey.reshape(qn, n_super, _SUPER), axis=-1)
    lo, hi = _bounds(skey)
    ssel = _select_first(skey, kg, lo, hi)
    hi = jnp.max(jnp.take_along_axis(skey, ssel, axis=-1), axis=-1).astype(jnp.int32)
    cand = (ssel[..., None] * _SUPER + jnp.arange(_SUPER, dtype=jnp.int32)).reshape(qn, -1)
    gsel = jnp.take_along_axis(
      cand, _select_first(jnp.take_along_axis(gkey, cand, axis=-1), kg, lo, hi), axis=-1
    )
  else:
    lo, hi = _bounds(gkey)
    gsel = _select_first(gkey, kg, lo, hi)
  return gsel, lo, jnp.max(jnp.take_along_axis(gkey, gsel, axis=-1), axis=-1).astype(jnp.int32)


ENGINES = ("auto", "popcount", "matmul")
MATMUL_MIN_BATCH = 64  # "auto": smaller query batches leave a matrix unit mostly idle
_MATMUL_BLOCK = 1 << 14  # codes unpacked and multiplied at once (matmul engine)


def _unpack_pm(words: jax.Array, dtype) -> jax.Array:
  """Stored words [..., W] (uint32 or uint64) -> +-1 [..., W * word bits] in `dtype`
  (bit b of word w at position w * word bits + b; any fixed order serves, the same for
  queries and codes)."""
  nbits = jnp.iinfo(words.dtype).bits
  shifts = jnp.arange(nbits, dtype=words.dtype)
  b = (words[..., None] >> shifts) & jnp.asarray(1, words.dtype)
  return (2 * b.astype(jnp.int32) - 1).astype(dtype).reshape(*words.shape[:-1], -1)


def matmul_dtype(platform: str):
  """The matmul engine's input type: bf16 on TPUs (their matrix unit's type), int8 elsewhere."""
  return jnp.bfloat16 if platform == "tpu" else jnp.int8


def _matmul_distances(q_pm: jax.Array, block_t: jax.Array) -> jax.Array:
  """Distances int32 [Q, n] from +-1 queries q_pm [Q, B] and stored words block_t [W, n]:
  (B - q . x) / 2, the block unpacked to +-1 here."""
  x = _unpack_pm(block_t.T, q_pm.dtype)  # [n, B]
  acc = jnp.float32 if q_pm.dtype == jnp.bfloat16 else jnp.int32
  dot = lax.dot_general(q_pm, x, (((1,), (1,)), ((), ())), preferred_element_type=acc)
  return (q_pm.shape[1] - dot.astype(jnp.int32)) // 2


def _matmul_group_min(q_pm: jax.Array, block_t: jax.Array, group: int) -> jax.Array:
  """Each group's minimum distance [Q, n / group] over block_t [W, n], a sub-block of
  _MATMUL_BLOCK codes at a time (the [Q, sub-block] product is all that is held)."""
  w, n = block_t.shape
  sub = math.gcd(n, _MATMUL_BLOCK)  # n and _MATMUL_BLOCK are multiples of group
  blocks = block_t.reshape(w, n // sub, sub).transpose(1, 0, 2)

  def one(b):
    d = _matmul_distances(q_pm, b)
    return jnp.min(d.reshape(d.shape[0], sub // group, group), axis=-1)

  mins = lax.map(one, blocks)  # [n / sub, Q, sub / group]
  return mins.transpose(1, 0, 2).reshape(q_pm.shape[0], n // group)


def _local_topk(q, db_t, n_valid, *, k, chunk, group, n_devices, bits_max, swar, matmul=None):
  """Per-device body: exact top-k of one database shard, merged over devices.

  q [Q, W] and db_t [W, n_local] hold uint32 words, or uint64 words (then traced
  under `jax.enable_x64`: every integer here has an explicit 32-bit dtype). matmul: None
  (popcount engine) or the matmul engine's input dtype.
  """
  w, n_local = db_t.shape
  qn = q.shape[0]
  sentinel = bits_max + 1
  popcount_sum = functools.partial(_popcount_sum, swar=swar)
  n_groups = chunk // group
  kg = min(k, n_groups)
  kc = min(k, chunk)
  base = lax.axis_index(sharding.DATA_AXIS) * n_local
  offs = jnp.arange(group, dtype=jnp.int32)
  q_pm = None if matmul is None else _unpack_pm(q, matmul)

  def chunk_topk(c):  # exact top-kc of chunk c, in index order
    start = jnp.asarray(c, jnp.int32) * chunk
    block = lax.dynamic_slice_in_dim(db_t, start, chunk, axis=1).reshape(w, n_groups, group)
    first = base + start
    if kg == n_groups:  # every group survives: rank the whole chunk directly
      pos = first + jnp.arange(chunk, dtype=jnp.int32)
      if q_pm is None:
        d = popcount_sum((q[:, i, None], block[i].reshape(1, chunk)) for i in range(w))
      else:
        d = _matmul_distances(q_pm, block.reshape(w, chunk))
      d = jnp.where(pos < n_valid, d, sentinel)
      cd, ci = _select_k(d, jnp.broadcast_to(pos, d.shape), kc, *_bounds(d))
    else:
      # (qn, G): each group's minimum distance, as uint8 (distances are <= bits + 1 <= 255
      # here): the smallest output the fused XOR/popcount/min loop can write, which makes
      # the pass faster than an int32 key carrying the index (docs/performance.md).
      if q_pm is None:
        d = popcount_sum((q[:, i, None, None], block[i][None]) for i in range(w))
        gmin = jnp.min(d, axis=-1)
      else:
        gmin = _matmul_group_min(q_pm, block.reshape(w, chunk), group)
      gkey = gmin.astype(jnp.uint8 if sentinel < 256 else jnp.int32)
      # Padding rows (index >= n_valid) are masked per group, not per item: groups that
      # start past n_valid get the sentinel, and the one group that n_valid can cut
      # (g_cut; for any other group the recomputation gives the same minimum) is
      # recomputed with the item mask. Same keys as masking every item, without a
      # compare-and-select per item in the fused pass.
      g_start = first + jnp.arange(n_groups, dtype=jnp.int32) * group
      gkey = jnp.where(g_start < n_valid, gkey, jnp.asarray(sentinel, gkey.dtype))
      g_cut = jnp.clip((n_valid - first) // group, 0, n_groups - 1)
      cut = lax.dynamic_index_in_dim(block, g_cut, axis=1, keepdims=False)  # (w, L)
      cut_d = popcount_sum((q[:, i, None], cut[i][None]) for i in range(w))
      cut_pos = first + g_cut * group + offs
      cut_min = jnp.min(jnp.where(cut_pos < n_valid, cut_d, sentinel), axis=-1).astype(gkey.dtype)
      gkey = lax.dynamic_update_slice_in_dim(gkey, cut_min[:, None], g_cut, axis=1)
      gsel, lo, hi = _select_groups(gkey, kg)  # candidates in ascending index order
      cand = block[:, gsel, :]  # (w, qn, kg, L)
      cd = popcount_sum((q[:, i, None, None], cand[i]) for i in range(w))
      cpos = first + gsel[..., None] * group + offs
      cd = jnp.where(cpos < n_valid, cd, sentinel)
      cd, ci = _select_k(cd.reshape(qn, -1), cpos.reshape(qn, -1), kc, lo, hi)
    return cd, ci

  def merge_lists(d, i):  # lists in index order, concatenated: still in index order
    return _select_k(d, i, k, *_bounds(d))

  def merge(c, best):  # earlier chunks hold lower indices
    cd, ci = chunk_topk(c)
    return merge_lists(
      jnp.concatenate([best[0], cd], axis=1), jnp.concatenate([best[1], ci], axis=1)
    )

  # The first chunk's list is the start (no merge with an empty list), padded to k if it
  # is short (the padding's sentinel distance ranks it after every code).
  best_d, best_i = chunk_topk(0)
  if kc < k:
    best_d = jnp.concatenate([best_d, jnp.full((qn, k - kc), sentinel, jnp.int32)], axis=1)
    best_i = jnp.concatenate([best_i, jnp.full((qn, k - kc), -1, jnp.int32)], axis=1)
  if n_local // chunk > 1:
    best_d, best_i = lax.fori_loop(1, n_local // chunk, merge, (best_d, best_i))
  if n_devices > 1:  # device order is index order: merge the shards' lists exactly
    best_d = lax.all_gather(best_d, sharding.DATA_AXIS, axis=1, tiled=True)
    best_i = lax.all_gather(best_i, sharding.DATA_AXIS, axis=1, tiled=True)
    best_d, best_i = merge_lists(best_d, best_i)
  # Lists stay in index order until here; one sort by (distance, list position) gives the
  # ranking. One int32 key where it fits: XLA:CPU sorts a single integer operand with a
  # plain comparison, several operands through a generated comparator (~4x slower here).
  if (sentinel + 1) * k < 2**31:
    key = jnp.sort(best_d * k + jnp.arange(k, dtype=jnp.int32), axis=1)
    return key // k, jnp.take_along_axis(best_i, key % k, axis=1)
  return lax.sort((best_d, best_i), dimension=1, is_stable=True, num_keys=1)


class HammingIndex:
  """An exact Hamming top-k index over packed codes, sharded over a ('data',) mesh.

  The database is padded, transposed to word-major order and placed on the
  devices once (default mesh: every device of every process; each process reads and
  places only its devices' rows, so `db_packed` may be a memory-mapped array); `search`
  then streams queries in batches. Memory per search call is
  O(query_batch * (chunk / L + k * L)) beyond the database itself.
  """

  def __init__(
    self,
    db_packed,
    *,
    mesh: Optional[Mesh] = None,
    chunk_size: Optional[int] = None,
    engine: str = "auto",
  ):
    """Places the database on the mesh.

    Args:
      db_packed: uint32 packed codes [N, W] (see `pack_codes`); may be memory-mapped.
      mesh: a ('data',) mesh; default every device of every process.
      chunk_size: database codes ranked per selection round on each device (rounded
        down to a power of two). Default: 2^20 codes, and on CPUs at most 8 MiB of
        code words (2^19 codes at 128 bits) so that each device's chunk stays in a
        shared last-level cache while a query batch streams over it (10M x 128 bits,
        2 devices on 2 cores: 2^19 codes 1.09x the speed of 2^20, 2^21 0.69x; at 32
        and 64 bits 2^20 beats 2^19 and 2^21).
      engine: "popcount", "matmul" or "auto" (module docstring): how the distances of
        the scan are computed; every engine gives the same results.
    """
    if engine not in ENGINES:
      raise errors.InvalidInput(f"engine must be one of {ENGINES}, got {engine!r}")
    self.engine = engine
    db = check_packed("db_packed", db_packed)
    self.mesh = mesh if mesh is not None else sharding.data_mesh()
    self.n_devices = self.mesh.devices.size
    self.num_codes, self.num_words = db.shape
    platform = self.platform = self.mesh.devices.flat[0].platform
    if chunk_size is None:
      chunk_size = 1 << 20
      if platform == "cpu":
        chunk_size = min(chunk_size, _CPU_CHUNK_BYTES // (4 * self.num_words))
    if (
      isinstance(chunk_size, bool)
      or not isinstance(chunk_size, (int, np.integer))
      or chunk_size < 1
    ):
      raise errors.InvalidInput(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    self._swar = use_swar(platform)
    # On CPUs, codes of 4+ words are searched as uint64 words: LLVM's 64-bit lane
    # popcount ends in one byte-sum instruction (vpsadbw) and XORs half as many lanes,
    # which beats SWAR on uint32 there (pass per query, 1M x 128 bits, one core:
    # 610 -> ~515 us). jax has no uint64 without x64, so those searches are traced and
    # run inside `jax.enable_x64`, a thread-local scope; nothing outside it changes.
    self._wide = platform == "cpu" and self.num_words >= 4
    self._store_words = -(-self.num_words // 2) if self._wide else self.num_words
    per_device = -(-self.num_codes // self.n_devices)
    self._chunk, n_chunks = _chunking(per_device, 1 << int(math.floor(math.log2(chunk_size))))
    self.n_local = self._chunk * n_chunks
    n_total = self.n_local * self.n_devices

    def shard(index):  # only the rows of this process's devices are read and transposed
      rows = index[1]
      start, stop = rows.start or 0, n_total if rows.stop is None else rows.stop
      out = np.zeros((self._store_words, stop - start), self._word_dtype)
      hi = min(stop, self.num_codes)
      if hi > start:
        out[:, : hi - start] = self._words(db[start:hi]).T
      return out

    with self._scope():
      self._db_t = jax.make_array_from_callback(
        (self._store_words, n_total), NamedSharding(self.mesh, P(None, sharding.DATA_AXIS)), shard
      )
    self._fns = {}

  @property
  def _word_dtype(self):
    return np.uint64 if self._wide else np.uint32

  def _words(self, packed: np.ndarray) -> np.ndarray:
    """uint32 words [n, W] -> the stored words [n, _store_words].

    Two uint32 words become one uint64 in host byte order (zero-padded to an even
    count): XOR and popcount do not depend on where each bit sits, only on the same
    bit sitting in the same place in queries and database.
    """
    if not self._wide:
      return packed
    if self.num_words % 2:
      packed = np.concatenate([packed, np.zeros((packed.shape[0], 1), np.uint32)], axis=1)
    return np.ascontiguousarray(packed, dtype=np.uint32).view(np.uint64)

  def _scope(self):
    return jax.enable_x64(True) if self._wide else contextlib.nullcontext()

  def engine_for(self, batch: int) -> str:
    """The engine a search with query batches of `batch` rows runs on."""
    if self.engine != "auto":
      return self.engine
    return "matmul" if self.platform != "cpu" and batch >= MATMUL_MIN_BATCH else "popcount"

  def _search_fn(self, k: int, engine: str):
    if (k, engine) not in self._fns:
      bits_max = self.num_words * WORD_BITS
      body = functools.partial(
        _local_topk,
        k=k,
        chunk=self._chunk,
        group=_group_size(k, self._chunk),
        n_devices=self.n_devices,
        bits_max=bits_max,
        swar=self._swar,
        matmul=matmul_dtype(self.platform) if engine == "matmul" else None,
      )
      fn = jax.shard_map(
        body,
        mesh=self.mesh,
        in_specs=(P(), P(None, sharding.DATA_AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,
      )
      self._fns[k, engine] = jax.jit(fn)
    return self._fns[k, engine]

  def search(self, q_packed, k: int, *, query_batch: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-k: returns (distances int32 [Q, k], indices int32 [Q, k]).

    Rows are sorted by (distance, database index). 1 <= k <= number of codes.
    """
    q = check_queries(q_packed, k, self.num_words, self.num_codes)
    k = int(k)
    batch = min(query_batch, 1 << math.ceil(math.log2(q.shape[0])))
    fn = self._search_fn(k, self.engine_for(batch))
    rep = sharding.replicated(self.mesh)
    n_valid = jax.device_put(np.int32(self.num_codes), rep)
    out_d, out_i = [], []
    with self._scope():
      for s in range(0, q.shape[0], batch):
        qb = q[s : s + batch]
        n = qb.shape[0]
        if n < batch:
          qb = np.concatenate([qb, np.zeros((batch - n, self.num_words), np.uint32)])
        d, i = fn(jax.device_put(self._words(qb), rep), self._db_t, n_valid)
        out_d.append((d, n))
        out_i.append((i, n))
    # Replicated results: each process reads its own copy, after all batches are dispatched.
    return (
      np.concatenate([distributed.to_host(d)[:n] for d, n in out_d]),
      np.concatenate([distributed.to_host(i)[:n] for i, n in out_i]),
    )


def hamming_topk(
  q_packed,
  db_packed,
  k: int,
  *,
  mesh: Optional[Mesh] = None,
  query_batch: int = 256,
  engine: str = "auto",
) -> Tuple[np.ndarray, np.ndarray]:
  """Exact Hamming top-k of packed queries [Q, W] in a packed database [N, W].

  Returns (distances int32 [Q, k], indices int32 [Q, k]) sorted by distance, ties
  by lower database index. Memory is bounded by chunking over queries and the
  database; the database is sharded over all devices of `mesh` (default: every
  device of every process; with several processes every one must call it). For
  repeated searches build a `HammingIndex` once.
  """
  q, db = _check_pair(q_packed, db_packed)
  return HammingIndex(db, mesh=mesh, engine=engine).search(q, k, query_batch=query_batch)


def subset_topk(q_packed, db_packed, rows, k: int) -> Tuple[np.ndarray, np.ndarray]:
  """Exact Hamming top-k of packed queries [Q, W] among the database rows `rows` (a spatial
  filter's survivors), on the host: (distances int32 [Q, k], database indices int64
  [Q, k]) in the scan's order, by distance, ties by lower database index. One pass of
  NumPy popcounts over the rows per query (no compilation per subset size): meant for
  the subsets a filter keeps, not for whole archives (HammingIndex)."""
  q, db = _check_pair(q_packed, db_packed)
  rows = np.unique(np.asarray(rows, np.int64))  # sorted: a stable sort keeps ties by index
  if not len(rows) or rows[0] < 0 or rows[-1] >= len(db):
    raise errors.InvalidInput(
      f"subset_topk: rows must be one or more indices in 0..{len(db) - 1} of the database"
    )
  check_queries(q, k, db.shape[1], len(rows))
  sub = db[rows]
  dist = np.empty((len(q), k), np.int32)
  idx = np.empty((len(q), k), np.int64)
  for i, one in enumerate(q):
    d = np.bitwise_count(sub ^ one).sum(axis=1, dtype=np.int32)
    order = np.argsort(d, kind="stable")[:k]
    dist[i], idx[i] = d[order], rows[order]
  return dist, idx
