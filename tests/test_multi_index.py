"""Multi-index hashing (rshash_jax/retrieval/multi_index.py): the scan's exact results.

The reference is the linear scan (`hamming.HammingIndex`), results compared in full
(distances and indices, so the tie order too), on uniform codes, on clustered codes with
many exact duplicates (learned codes' shape), at lengths that are not multiples of 32.
"""

import json
import os

import numpy as np
import pytest

from rshash_jax import errors
from rshash_jax.retrieval import hamming, multi_index


def _clustered(rng, n, bits, centres=12, flip=0.04):
  base = rng.integers(0, 2, (centres, bits))
  return base[rng.integers(0, centres, n)] ^ (rng.random((n, bits)) < flip)


def _queries(rng, db_bits, nq=40, flip=0.08):
  rows = db_bits[rng.integers(0, len(db_bits), nq)]
  return hamming.pack_codes(rows ^ (rng.random(rows.shape) < flip), binary=True)


@pytest.mark.parametrize(
  "bits,n,k,substrings",
  [
    (64, 4000, 10, None),
    (32, 3000, 100, None),
    (48, 2500, 7, 3),
    (128, 3000, 50, None),
    (16, 800, 30, 2),
    (24, 500, 500, None),
  ],
)
@pytest.mark.parametrize("kind", ["uniform", "clustered"])
def test_same_results_as_the_scan(bits, n, k, substrings, kind):
  rng = np.random.default_rng(bits + n + k)
  raw = rng.integers(0, 2, (n, bits)) if kind == "uniform" else _clustered(rng, n, bits)
  db = hamming.pack_codes(raw, binary=True)
  q = _queries(rng, raw)
  want_d, want_i = hamming.HammingIndex(db).search(q, k)
  index = multi_index.MultiIndex(db, bits=bits, substrings=substrings)
  got_d, got_i = index.search(q, k, query_batch=16)
  np.testing.assert_array_equal(got_d, want_d)
  np.testing.assert_array_equal(got_i, want_i)


def test_ties_broken_by_index_among_duplicates():
  rng = np.random.default_rng(1)
  raw = np.repeat(rng.integers(0, 2, (5, 64)), 200, axis=0)  # 5 codes, 200 copies each
  rng.shuffle(raw)
  db = hamming.pack_codes(raw, binary=True)
  q = db[:7]
  want = hamming.HammingIndex(db).search(q, 250)
  got = multi_index.MultiIndex(db).search(q, 250)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert (got[0][:, :200] == 0).all() and (np.diff(got[1][:, :200], axis=1) > 0).all()


def test_scan_fallback_when_probes_outnumber_codes():
  # One 32-bit substring over 300 codes: radius 2 already has 496 probes > 300 codes.
  rng = np.random.default_rng(2)
  raw = rng.integers(0, 2, (300, 32))
  db = hamming.pack_codes(raw, binary=True)
  q = _queries(rng, raw, flip=0.3)
  index = multi_index.MultiIndex(db, substrings=1)
  assert "keys" in index.tables[0]  # 32-bit substrings: sorted keys, not a directory
  want = hamming.HammingIndex(db).search(q, 20)
  got = index.search(q, 20)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_default_substrings_follow_log2_n():
  assert multi_index.default_substrings(64, 2**16) == 4
  assert multi_index.default_substrings(64, 2**20) == 4
  assert multi_index.default_substrings(32, 10**7) == 2
  assert multi_index.default_substrings(128, 10**8) == 5
  assert multi_index.default_substrings(64, 1) == 64  # tiny archives: 1-bit substrings
  assert multi_index.split(10, 3) == [(0, 4), (4, 3), (7, 3)]


def test_save_load_memory_mapped_same_results(tmp_path):
  rng = np.random.default_rng(3)
  raw = _clustered(rng, 3000, 40)
  db = hamming.pack_codes(raw, binary=True)
  q = _queries(rng, raw)
  built = multi_index.MultiIndex(db, bits=40)
  built.save(str(tmp_path / "mi"))
  loaded = multi_index.MultiIndex.load(str(tmp_path / "mi"))
  assert isinstance(loaded.codes, np.memmap)
  for a, b in zip(built.search(q, 25), loaded.search(q, 25)):
    np.testing.assert_array_equal(a, b)
  assert loaded.nbytes() == built.nbytes() > 0


def _saved(tmp_path):
  rng = np.random.default_rng(4)
  db = hamming.pack_codes(rng.integers(0, 2, (500, 64)), binary=True)
  d = str(tmp_path / "mi")
  multi_index.MultiIndex(db).save(d)
  return d


def test_load_refuses_a_tampered_table(tmp_path):
  d = _saved(tmp_path)
  p = os.path.join(d, "table0_order.npy")
  order = np.load(p)
  order[3] = 10**6  # an id past the database
  np.save(p, order)
  with pytest.raises(errors.Corrupt, match="table 0 is inconsistent"):
    multi_index.MultiIndex.load(d)


def test_load_refuses_wrong_dtype_missing_file_and_bad_meta(tmp_path):
  d = _saved(tmp_path)
  np.save(os.path.join(d, "table1_offsets.npy"), np.zeros(3, np.float32))
  with pytest.raises(errors.Corrupt, match="table1_offsets.npy: float32"):
    multi_index.MultiIndex.load(d)
  os.remove(os.path.join(d, "table1_offsets.npy"))
  with pytest.raises(errors.NotFound, match="table1_offsets.npy: missing"):
    multi_index.MultiIndex.load(d)
  meta = os.path.join(d, multi_index.META)
  with open(meta) as f:
    m = json.load(f)
  m["bits"] = 100
  with open(meta, "w") as f:
    json.dump(m, f)
  with pytest.raises(errors.Corrupt, match="inconsistent bits"):
    multi_index.MultiIndex.load(d)
  with pytest.raises(errors.NotFound, match="no multi-index here"):
    multi_index.MultiIndex.load(str(tmp_path / "nothing"))


def test_pickled_array_is_never_loaded(tmp_path):
  d = _saved(tmp_path)
  np.save(os.path.join(d, "codes.npy"), np.array([{"x": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(errors.Corrupt, match="codes.npy"):
    multi_index.MultiIndex.load(d)


def test_bad_arguments_are_named():
  db = hamming.pack_codes(np.random.default_rng(5).integers(0, 2, (100, 64)), binary=True)
  index = multi_index.MultiIndex(db)
  with pytest.raises(errors.InvalidInput, match=r"k must be an integer in \[1, 100\]"):
    index.search(db[:2], 101)
  with pytest.raises(errors.InvalidInput, match="code length mismatch"):
    index.search(db[:2, :1], 5)
  with pytest.raises(errors.InvalidInput, match="at most 32"):
    multi_index.MultiIndex(db, substrings=1)
  with pytest.raises(errors.InvalidInput, match="bits=20 does not match"):
    multi_index.MultiIndex(db, bits=20)


@pytest.mark.parametrize("budget", [1, 10**9])
def test_candidate_budget_hands_queries_to_the_scan_with_the_same_results(budget):
  rng = np.random.default_rng(6)
  raw = _clustered(rng, 5000, 64)
  db = hamming.pack_codes(raw, binary=True)
  q = _queries(rng, raw)
  want = hamming.HammingIndex(db).search(q, 30)
  index = multi_index.MultiIndex(db)
  got = index.search(q, 30, max_candidates=budget)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert index.scanned_queries == (len(q) if budget == 1 else 0)


def test_calibration_is_saved_and_auto_follows_it(tmp_path):
  """`calibrate` times both engines per k; auto takes the faster at the nearest k; every
  engine gives the scan's results; the choice survives save/load; a forged one is refused."""
  rng = np.random.default_rng(7)
  raw = _clustered(rng, 3000, 64)
  db = hamming.pack_codes(raw, binary=True)
  q = _queries(rng, raw)
  index = multi_index.MultiIndex(db, bits=64)
  assert index.engine_for(10) == "multi_index"  # nothing measured: the index
  cross = index.calibrate(queries=64, repeats=1)
  assert [e["k"] for e in cross["entries"]] == [10, 100] and cross["queries"] == 64
  for e in cross["entries"]:
    faster = "scan" if e["scan_s"] < e["multi_index_s"] else "multi_index"
    assert e["engine"] == faster and e["multi_index_s"] > 0 and e["scan_s"] > 0
  # The choice by hand: scan at k near 10, index at k near 100.
  cross["entries"][0]["engine"], cross["entries"][1]["engine"] = "scan", "multi_index"
  assert [index.engine_for(k) for k in (1, 10, 31, 32, 100, 5000)] == [
    "scan",
    "scan",
    "scan",
    "multi_index",
    "multi_index",
    "multi_index",
  ]
  want = hamming.HammingIndex(db).search(q, 10)
  before = index.scanned_queries
  for engine in ("auto", "scan", "multi_index"):
    got = index.search(q, 10, engine=engine)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if engine != "multi_index":  # whole-batch scans are not the index's fallbacks
      assert index.scanned_queries == before
  index.save(str(tmp_path / "idx"))
  loaded = multi_index.MultiIndex.load(str(tmp_path / "idx"))
  assert loaded.meta["crossover"] == cross and loaded.engine_for(10) == "scan"
  with pytest.raises(errors.InvalidInput, match="engine must be one of"):
    loaded.search(q, 10, engine="faiss")
  meta_path = tmp_path / "idx" / multi_index.META
  meta = json.loads(meta_path.read_text())
  meta["crossover"]["entries"][0]["engine"] = "rm -rf"
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(errors.Corrupt, match="crossover"):
    multi_index.MultiIndex.load(str(tmp_path / "idx"))
