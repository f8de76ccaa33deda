"""rshash_jax.hamming against numpy brute force, on tie-heavy random codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rshash_jax.parallel import sharding
from rshash_jax.retrieval import hamming


def np_distances(q, db):
  return np.bitwise_count(q[:, None, :] ^ db[None, :, :]).sum(-1).astype(np.int32)


def np_topk(q, db, k):
  d = np_distances(q, db)
  order = np.argsort(d, axis=1, kind="stable")[:, :k]  # ties: lower index first
  return np.take_along_axis(d, order, 1), order


def random_codes(rng, n, bits, p=0.5):
  return np.where(rng.random((n, bits)) < p, 1, -1).astype(np.int8)


def test_pack_layout_hand_worked():
  codes = np.array([[1, -1, 1, 1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(hamming.pack_codes(codes), np.array([[0b1101], [0]], np.uint32))
  # 33 bits: bit 32 lands in bit 0 of the second word.
  c = -np.ones((1, 33))
  c[0, 32] = 1
  c[0, 0] = 1
  np.testing.assert_array_equal(hamming.pack_codes(c), [[1, 1]])


@pytest.mark.parametrize("bits", [1, 7, 31, 32, 33, 64, 100, 128])
def test_pack_formats_agree_and_roundtrip(bits):
  rng = np.random.default_rng(bits)
  pm = random_codes(rng, 50, bits)
  real = pm * rng.uniform(0.01, 3.0, pm.shape)
  zero_one = (pm > 0).astype(np.int32)
  packed = hamming.pack_codes(pm)
  assert packed.dtype == np.uint32 and packed.shape == (50, -(-bits // 32))
  np.testing.assert_array_equal(hamming.pack_codes(real), packed)
  np.testing.assert_array_equal(hamming.pack_codes(zero_one), packed)
  np.testing.assert_array_equal(hamming.pack_codes(pm > 0), packed)
  np.testing.assert_array_equal(np.asarray(hamming.pack_signs(real)), packed)
  np.testing.assert_array_equal(hamming.unpack_codes(packed, bits), pm)


def test_pack_zero_is_positive_and_format_flags():
  np.testing.assert_array_equal(hamming.pack_codes(np.array([[0.0, -0.5]]), binary=False), [[1]])
  np.testing.assert_array_equal(hamming.pack_codes(np.array([[0, 1]]), binary=True), [[2]])
  with pytest.raises(ValueError, match="binary=True"):
    hamming.pack_codes(np.array([[-1, 1]]), binary=True)


@pytest.mark.parametrize(
  "bad, err, msg",
  [
    (np.zeros(5), ValueError, "2-D"),
    (np.zeros((3, 0)), ValueError, "K >= 1"),
    (np.array([[np.nan, 1.0]]), ValueError, "NaN"),
    (np.array([["a", "b"]]), TypeError, "numeric"),
  ],
)
def test_pack_rejects_bad_input(bad, err, msg):
  with pytest.raises(err, match=msg):
    hamming.pack_codes(bad)


@pytest.mark.parametrize("bits", [5, 32, 40, 64, 128])
def test_distances_match_numpy(bits):
  rng = np.random.default_rng(1)
  q = hamming.pack_codes(random_codes(rng, 9, bits))
  db = hamming.pack_codes(random_codes(rng, 301, bits))
  d = hamming.hamming_distances(q, db)
  assert d.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(d), np_distances(q, db))


@pytest.mark.parametrize("words", [1, 2, 3, 4, 5, 6, 7, 13])
def test_popcount_forms_agree(words):
  """lax.population_count, SWAR on uint32 and uint64 words give numpy's counts, also
  at the largest sums (all-ones words: 8 per byte per word, 192 per six words)."""
  rng = np.random.default_rng(words)
  a = rng.integers(0, 2**32, (64, words), dtype=np.uint64).astype(np.uint32)
  b = rng.integers(0, 2**32, (64, words), dtype=np.uint64).astype(np.uint32)
  a[:8] = 0xFFFFFFFF
  b[:8] = 0
  b[8:16] = a[8:16]  # distance 0
  want = np_distances(a, b)
  for swar in (False, True):
    got = hamming._distances(jnp.asarray(a), jnp.asarray(b), swar)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)
  if words % 2 == 0:
    with jax.enable_x64(True):
      wa, wb = (jnp.asarray(np.ascontiguousarray(x).view(np.uint64)) for x in (a, b))
      got = hamming._distances(wa, wb, True)  # uint64 words take the population_count path
    np.testing.assert_array_equal(np.asarray(got), want)
  assert not jax.config.jax_enable_x64


@pytest.mark.parametrize(
  "n, bits, k",
  [
    (6221, 32, 5),
    (6221, 64, 40),
    (6221, 96, 5),
    (6221, 128, 5),
    (6221, 160, 6221),
    (1500, 128, 1500),
    (700, 32, 3),
  ],
)
def test_topk_never_returns_padding(n, bits, k):
  """Shards end in zero-word padding (here a whole device's shard, and groups that the
  database end cuts), and the padding is nearer to these queries than any code: it is
  masked per group plus the one cut group, and none of it may rank or displace a code."""
  rng = np.random.default_rng(n + bits)
  db = hamming.pack_codes(random_codes(rng, n, bits, p=0.7))
  q = np.concatenate(
    [
      np.zeros((1, hamming.num_words(bits)), np.uint32),  # padding at distance 0
      hamming.pack_codes(random_codes(rng, 6, bits, p=0.3)),
    ]
  )
  index = hamming.HammingIndex(db, chunk_size=1 << 10)
  assert index.n_local * index.n_devices > n  # padded
  d, i = index.search(q, k)
  assert d.dtype == np.int32 and i.dtype == np.int32
  rd, ri = np_topk(q, db, k)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, ri)
  assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("bits", [32, 128])
def test_topk_group_cut_by_database_end_is_masked(bits):
  """The group that the database's end cuts holds codes and padding. Here the padding is
  the nearest, the k best codes lie in k different groups, and the cut group's codes are
  the farthest: an unmasked cut group would take one of the k groups' places."""
  n, k = 1000, 5
  index_for = lambda db: hamming.HammingIndex(
    db, mesh=sharding.data_mesh(jax.devices()[:1]), chunk_size=1 << 10
  )
  codes = np.ones((n, bits))
  probe = index_for(hamming.pack_codes(codes))
  group = hamming._group_size(k, probe._chunk)
  assert n % group and probe.n_local > n  # a cut group, then padding
  for g in range(k):
    codes[g * group * 3, 1:] = -1  # distance 1 from the zero query, k different groups
  db = hamming.pack_codes(codes)
  q = np.zeros((1, hamming.num_words(bits)), np.uint32)
  d, i = index_for(db).search(q, k)
  np.testing.assert_array_equal(d, np.ones((1, k), np.int32))
  np.testing.assert_array_equal(i, [[g * group * 3 for g in range(k)]])


def test_chunks_fit_the_shard():
  """Chunks are multiples of a unit, not powers of two: a shard is padded by less than a
  unit per chunk."""
  assert hamming._chunking(500_000, 1 << 19) == (500_736, 1)
  assert hamming._chunking(600_000, 1 << 20) == (600_064, 1)
  assert hamming._chunking(5_000_000, 1 << 19) == (500_736, 10)
  assert hamming._chunking(5, 1 << 20) == (8, 1)
  assert hamming._chunking(3000, 8) == (8, 375)


@pytest.mark.parametrize("bits, k", [(64, 1), (64, 100), (128, 7), (40, 300)])
def test_topk_exact_with_chunks_that_are_not_powers_of_two(bits, k):
  rng = np.random.default_rng(bits + k)
  db = hamming.pack_codes(random_codes(rng, 10_000, bits, p=0.8))
  q = hamming.pack_codes(random_codes(rng, 9, bits, p=0.8))
  index = hamming.HammingIndex(db, mesh=sharding.data_mesh(jax.devices()[:2]), chunk_size=4096)
  assert (index._chunk, index.n_local) == (3072, 6144)  # 2 chunks of 3 units per device
  d, i = index.search(q, k)
  rd, ri = np_topk(q, db, k)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, ri)


def test_topk_under_global_x64_matches():
  """A caller that enabled x64 gets the same int32 results (narrow and wide words)."""
  rng = np.random.default_rng(5)
  for bits in (64, 128):
    db = hamming.pack_codes(random_codes(rng, 3000, bits))
    q = hamming.pack_codes(random_codes(rng, 5, bits))
    with jax.enable_x64(True):
      d, i = hamming.HammingIndex(db, chunk_size=1 << 10).search(q, 20)
    assert d.dtype == np.int32 and i.dtype == np.int32
    rd, ri = np_topk(q, db, 20)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(i, ri)


@pytest.mark.parametrize(
  "n, bits, k, chunk",
  [
    (400, 16, 10, 1 << 16),
    (5000, 64, 100, 1 << 16),
    (20000, 12, 100, 4096),  # 12 bits: huge ties, many chunks and groups
    (3000, 40, 3000, 1 << 16),  # k = N: full ranking
    (9000, 128, 700, 1 << 11),  # k larger than the group count
    (20000, 300, 10, 1 << 14),  # distances past 255: the group minima stay int32
    (37, 7, 37, 8),
    (1, 3, 1, 8),
  ],
)
def test_topk_exact_with_ties(n, bits, k, chunk):
  rng = np.random.default_rng(n + bits)
  db = hamming.pack_codes(random_codes(rng, n, bits, p=0.8))
  q = hamming.pack_codes(random_codes(rng, 13, bits, p=0.8))
  d, i = hamming.HammingIndex(db, chunk_size=chunk).search(q, k, query_batch=8)
  rd, ri = np_topk(q, db, k)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, ri)


@pytest.mark.parametrize("n_groups, kg, top", [(4096, 10, 3), (640, 10, 40), (8192, 64, 2)])
def test_two_level_group_selection_is_exact(n_groups, kg, top):
  """The super-group selection returns exactly the flat selection's groups (ties by index)."""
  rng = np.random.default_rng(n_groups + kg)
  # few values (ties everywhere), and super-groups at different levels (ties across them)
  level = rng.integers(0, top, (5, n_groups // hamming._SUPER)).repeat(hamming._SUPER, axis=1)
  gkey = (level + rng.integers(0, 3, (5, n_groups))).astype(np.uint8)
  assert n_groups // hamming._SUPER >= 2 * kg  # the two-level path runs
  got = np.asarray(hamming._select_groups(jnp.asarray(gkey), kg)[0])
  flat = np.sort(np.lexsort((np.tile(np.arange(n_groups), (5, 1)), gkey), axis=-1)[:, :kg], axis=-1)
  np.testing.assert_array_equal(got, flat)


@pytest.mark.parametrize(
  "n, k, top, dtype",
  [
    (3200, 100, 129, np.int32),
    (512, 100, 40, np.uint8),
    (200, 100, 3, np.int32),
    (37, 37, 5, np.int32),
    (33, 1, 2, np.uint8),
    (1, 1, 0, np.int32),
    (700, 650, 300, np.int32),
  ],
)
def test_counting_selection_equals_a_stable_sort(n, k, top, dtype):
  """_select_first (threshold by bisection on counts, then bit masks) returns the first k
  positions of a stable sort by value, in position order, with ties across words and
  rows whose bracket is loose (lo = 0, hi = top) or tight (the true extremes)."""
  rng = np.random.default_rng(n + k)
  d = rng.integers(0, top + 1, (6, n)).astype(dtype)
  d[0] = top  # one value everywhere
  want = np.sort(np.argsort(d, axis=1, kind="stable")[:, :k], axis=1)
  for lo, hi in ((np.zeros(6), np.full(6, top)), (d.min(1), d.max(1))):
    got = np.asarray(
      jax.jit(hamming._select_first, static_argnums=1)(
        jnp.asarray(d), k, jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
      )
    )
    np.testing.assert_array_equal(got, want)
  kth = jax.jit(hamming._kth_smallest, static_argnums=1)(
    jnp.asarray(d), k, jnp.asarray(d.min(1), jnp.int32), jnp.asarray(d.max(1), jnp.int32)
  )
  np.testing.assert_array_equal(kth, np.sort(d, axis=1)[:, k - 1])


def test_topk_exact_through_two_level_selection():
  rng = np.random.default_rng(3)
  db = hamming.pack_codes(random_codes(rng, 40000, 12, p=0.8))
  q = hamming.pack_codes(random_codes(rng, 7, 12, p=0.8))
  index = hamming.HammingIndex(db, mesh=sharding.data_mesh(jax.devices()[:1]), chunk_size=1 << 15)
  chunk, group = index._chunk, hamming._group_size(5, index._chunk)
  assert chunk // group // hamming._SUPER >= 2 * 5
  d, i = index.search(q, 5)
  rd, ri = np_topk(q, db, 5)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, ri)


def test_topk_8_devices_equals_1_device():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  rng = np.random.default_rng(7)
  db = hamming.pack_codes(random_codes(rng, 12345, 24))
  q = hamming.pack_codes(random_codes(rng, 50, 24))
  one = hamming.HammingIndex(db, mesh=sharding.data_mesh(jax.devices()[:1])).search(q, 64)
  eight = hamming.HammingIndex(db, mesh=sharding.data_mesh()).search(q, 64)
  np.testing.assert_array_equal(one[0], eight[0])
  np.testing.assert_array_equal(one[1], eight[1])
  np.testing.assert_array_equal(eight[1], np_topk(q, db, 64)[1])


def test_topk_all_identical_codes_orders_by_index():
  db = hamming.pack_codes(np.ones((1000, 32)))
  d, i = hamming.hamming_topk(db[:3], db, 5)
  np.testing.assert_array_equal(d, 0)
  np.testing.assert_array_equal(i, np.tile(np.arange(5), (3, 1)))


def test_topk_rejects_bad_input():
  db = hamming.pack_codes(np.ones((10, 64)))
  q64 = db[:2]
  with pytest.raises(ValueError, match="k must be"):
    hamming.hamming_topk(q64, db, 11)
  with pytest.raises(ValueError, match="k must be"):
    hamming.hamming_topk(q64, db, 0)
  with pytest.raises(ValueError, match="code length mismatch"):
    hamming.hamming_topk(hamming.pack_codes(np.ones((2, 32))), db, 3)
  with pytest.raises(TypeError, match="uint32"):
    hamming.hamming_topk(q64.astype(np.int64), db, 3)
  with pytest.raises(ValueError, match="empty"):
    hamming.hamming_topk(q64, db[:0], 1)
  with pytest.raises(ValueError, match="empty"):
    hamming.hamming_distances(q64[:0], db)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
      hamming.HammingIndex(db, chunk_size=bad)


@pytest.mark.parametrize(
  "n, bits, k, chunk, devices, dtype",
  [
    (5000, 64, 100, 1 << 16, 1, "int8"),  # one chunk, group pass in sub-blocks
    (20000, 12, 100, 4096, 2, "int8"),  # huge ties, many chunks, two devices
    (9000, 128, 700, 1 << 11, 1, "int8"),  # wide (uint64) words on CPU, k > group count
    (3000, 40, 3000, 1 << 16, 1, "int8"),  # k = N: the whole chunk ranked directly
    (40000, 300, 10, 1 << 15, 2, "int8"),  # distances past 255, several sub-blocks a chunk
    (37, 7, 37, 8, 1, "int8"),
    (5000, 64, 100, 1 << 16, 1, "bfloat16"),  # TPUs' type
    (9000, 128, 700, 1 << 11, 2, "bfloat16"),
    (3000, 40, 3000, 1 << 16, 1, "bfloat16"),
  ],
)
def test_matmul_engine_equals_the_popcount_engine(n, bits, k, chunk, devices, dtype, monkeypatch):
  """The matrix-product engine (int8 as on GPUs, bf16 as on TPUs) gives the popcount
  engine's distances, indices and tie order exactly."""
  monkeypatch.setattr(hamming, "matmul_dtype", lambda platform: jnp.dtype(dtype))
  rng = np.random.default_rng(n + bits)
  db = hamming.pack_codes(random_codes(rng, n, bits, p=0.8))
  q = hamming.pack_codes(random_codes(rng, 13, bits, p=0.8))
  mesh = sharding.data_mesh(jax.devices()[:devices])
  mm = hamming.HammingIndex(db, mesh=mesh, chunk_size=chunk, engine="matmul")
  pc = hamming.HammingIndex(db, mesh=mesh, chunk_size=chunk, engine="popcount")
  assert mm.engine_for(8) == "matmul" and pc.engine_for(8) == "popcount"
  d, i = mm.search(q, k, query_batch=8)
  rd, ri = np_topk(q, db, k)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, ri)
  pd, pi = pc.search(q, k, query_batch=8)
  np.testing.assert_array_equal(d, pd)
  np.testing.assert_array_equal(i, pi)


def test_engine_choice_and_bad_engine():
  db = hamming.pack_codes(random_codes(np.random.default_rng(0), 100, 64))
  index = hamming.HammingIndex(db)
  assert index.engine == "auto"
  assert index.engine_for(256) == "popcount"  # CPU: the popcount, whatever the batch
  index.platform = "gpu"  # the choice "auto" makes on an accelerator
  assert index.engine_for(hamming.MATMUL_MIN_BATCH) == "matmul"
  assert index.engine_for(hamming.MATMUL_MIN_BATCH - 1) == "popcount"
  with pytest.raises(Exception, match="engine must be one of"):
    hamming.HammingIndex(db, engine="gemm")


def test_unpacked_products_are_distances():
  """(B - <q, x>) / 2 over the unpacked +-1 words is the popcount of q ^ x."""
  rng = np.random.default_rng(1)
  words = rng.integers(0, 2**32, (20, 3), dtype=np.uint64).astype(np.uint32)
  d = hamming._matmul_distances(hamming._unpack_pm(jnp.asarray(words[:4]), jnp.int8), words.T)
  np.testing.assert_array_equal(np.asarray(d), np_distances(words[:4], words))


def test_subset_topk_is_the_scan_of_the_subset_in_archive_ids():
  """A spatial filter's ranking: the exact scan of the kept rows, ties by archive id."""
  rng = np.random.default_rng(7)
  db = hamming.pack_codes(random_codes(rng, 3000, 24, p=0.85))
  q = hamming.pack_codes(random_codes(rng, 5, 24, p=0.85))
  rows = np.sort(rng.choice(3000, 700, replace=False))
  d, i = hamming.subset_topk(q, db, rows[::-1], 50)  # any order in, ids out
  rd, ri = hamming.HammingIndex(db[rows]).search(q, 50)
  np.testing.assert_array_equal(d, rd)
  np.testing.assert_array_equal(i, rows[ri])
  with pytest.raises(ValueError, match="k must be an integer in"):
    hamming.subset_topk(q, db, rows, 701)
  with pytest.raises(ValueError, match="indices in 0..2999"):
    hamming.subset_topk(q, db, [3000], 1)
