"""rshash_jax.metrics against hand-worked cases and plain per-query numpy loops."""

import numpy as np
import pytest

from rshash_jax.retrieval import hamming, metrics


def ranked(qc, dbc):
  """Per query: database indices sorted by (Hamming distance, index), and distances."""
  d = (qc[:, None, :] != dbc[None, :, :]).sum(-1)
  return [sorted(range(len(dbc)), key=lambda j: (d[i, j], j)) for i in range(len(qc))], d


def relevant(ql, dl):
  if ql.ndim == 1:
    return ql[:, None] == dl[None, :]
  return (ql @ dl.T) > 0


def ref_map(qc, dbc, ql, dl, topk=None, normalization="retrieved", no_relevant="zero"):
  orders, _ = ranked(qc, dbc)
  rel = relevant(ql, dl)
  aps = []
  for i, order in enumerate(orders):
    n = len(order) if topk is None else topk
    hits, s = 0, 0.0
    for r, j in enumerate(order[:n], start=1):
      if rel[i, j]:
        hits += 1
        s += hits / r
    total = rel[i].sum()
    z = {"retrieved": hits, "min": min(n, total), "all": total}[normalization]
    if hits == 0:
      if no_relevant == "zero":
        aps.append(0.0)
      continue
    aps.append(s / z)
  return np.mean(aps) if aps else 0.0


# Hand-worked: query 0000; database 0000 (rel), 1111 (rel), 0001 (not), 0011 (rel).
# Ranking: idx0 (d0, rel), idx2 (d1), idx3 (d2, rel), idx1 (d4, rel).
HQ = np.array([[-1, -1, -1, -1]])
HDB = np.array([[-1, -1, -1, -1], [1, 1, 1, 1], [-1, -1, -1, 1], [-1, -1, 1, 1]])
HQL, HDL = np.array([0]), np.array([0, 0, 1, 0])


def test_hand_worked_map_and_variants():
  assert metrics.mean_average_precision(HQ, HDB, HQL, HDL) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
  assert metrics.mean_average_precision(HQ, HDB, HQL, HDL, topk=2) == pytest.approx(1.0)
  assert metrics.mean_average_precision(
    HQ, HDB, HQL, HDL, topk=2, normalization="min"
  ) == pytest.approx(0.5)
  assert metrics.mean_average_precision(
    HQ, HDB, HQL, HDL, topk=2, normalization="all"
  ) == pytest.approx(1 / 3)


def test_hand_worked_tie_goes_to_lower_index():
  # Both database items are at distance 1; the irrelevant one has the lower index.
  db = np.array([[-1, -1, -1, 1], [-1, -1, 1, -1]])
  assert metrics.mean_average_precision(HQ, db, HQL, np.array([1, 0])) == pytest.approx(0.5)
  assert metrics.mean_average_precision(HQ, db, HQL, np.array([0, 1])) == pytest.approx(1.0)


def test_hand_worked_pr_curve_and_at_k():
  curve = metrics.pr_curve_by_radius(HQ, HDB, HQL, HDL)
  np.testing.assert_allclose(curve["precision"], [1, 1 / 2, 2 / 3, 2 / 3, 3 / 4])
  np.testing.assert_allclose(curve["recall"], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
  pr = metrics.precision_recall_at_k(HQ, HDB, HQL, HDL, ks=(1, 2, 3, 10))
  assert pr["precision"] == pytest.approx({1: 1.0, 2: 0.5, 3: 2 / 3, 4: 3 / 4})
  assert pr["recall"] == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 4: 1.0})
  assert metrics.precision_at_radius(HQ, HDB, HQL, HDL, radius=2) == pytest.approx(2 / 3)


def test_no_relevant_item_zero_or_skip():
  ql = np.array([0, 5])  # class 5 has no database item
  q = np.vstack([HQ, HQ])
  assert metrics.mean_average_precision(q, HDB, ql, HDL) == pytest.approx(29 / 36 / 2)
  assert metrics.mean_average_precision(q, HDB, ql, HDL, no_relevant="skip") == pytest.approx(
    29 / 36
  )


def _random_problem(seed, nq, ndb, bits, classes, multi):
  rng = np.random.default_rng(seed)
  qc = np.where(rng.random((nq, bits)) < 0.5, 1, -1)
  dbc = np.where(rng.random((ndb, bits)) < 0.5, 1, -1)
  if multi:
    ql = (rng.random((nq, classes)) < 0.2).astype(np.int32)
    dl = (rng.random((ndb, classes)) < 0.2).astype(np.int32)
  else:
    ql, dl = rng.integers(0, classes, nq), rng.integers(0, classes, ndb)
  return qc, dbc, ql, dl


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("topk", [None, 1, 7, 50])
@pytest.mark.parametrize("normalization", metrics.NORMALIZATIONS)
@pytest.mark.parametrize("no_relevant", metrics.NO_RELEVANT)
def test_map_matches_reference_with_many_ties(multi, topk, normalization, no_relevant):
  qc, dbc, ql, dl = _random_problem(3, 20, 120, 6, 7, multi)  # 6 bits: heavy ties
  got = metrics.mean_average_precision(
    qc, dbc, ql, dl, topk, normalization=normalization, no_relevant=no_relevant
  )
  want = ref_map(qc, dbc, ql, dl, topk, normalization, no_relevant)
  assert got == pytest.approx(want, abs=1e-12)


def test_packed_and_unpacked_codes_agree_and_k_not_multiple_of_32():
  qc, dbc, ql, dl = _random_problem(4, 15, 200, 45, 5, False)
  a = metrics.mean_average_precision(qc, dbc, ql, dl)
  b = metrics.mean_average_precision(hamming.pack_codes(qc), hamming.pack_codes(dbc), ql, dl)
  assert a == b == pytest.approx(ref_map(qc, dbc, ql, dl))


def test_pr_curve_matches_reference():
  qc, dbc, ql, dl = _random_problem(5, 11, 90, 10, 4, True)
  _, d = ranked(qc, dbc)
  rel = relevant(ql, dl)
  curve = metrics.pr_curve_by_radius(qc, dbc, ql, dl)
  for r in range(11):
    within = d <= r
    p = [
      (rel[i] & within[i]).sum() / within[i].sum() if within[i].any() else 0.0 for i in range(11)
    ]
    rc = [(rel[i] & within[i]).sum() / rel[i].sum() for i in range(11) if rel[i].any()]
    assert curve["precision"][r] == pytest.approx(np.mean(p))
    assert curve["recall"][r] == pytest.approx(np.mean(rc))
  skip = metrics.pr_curve_by_radius(qc, dbc, ql, dl, empty="skip")
  assert skip["precision"][0] >= curve["precision"][0]


def test_report_agrees_with_single_metrics():
  qc, dbc, ql, dl = _random_problem(6, 30, 150, 16, 6, False)
  rep = metrics.retrieval_report(qc, dbc, ql, dl, map_ks=(10, 100), ks=(1, 11, 150, 400))
  assert rep["map"] == pytest.approx(metrics.mean_average_precision(qc, dbc, ql, dl))
  assert rep["map_at"][10] == pytest.approx(metrics.mean_average_precision(qc, dbc, ql, dl, 10))
  at = metrics.precision_recall_at_k(qc, dbc, ql, dl, ks=(1, 11, 150))
  assert rep["precision_at"] == pytest.approx(at["precision"])
  assert rep["recall_at"][150] == pytest.approx(1.0)
  assert len(rep["pr_curve"]["precision"]) == 17


def test_accuracy():
  assert metrics.accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
  assert metrics.accuracy(np.eye(3)[[2, 0]], [2, 1]) == 0.5
  with pytest.raises(ValueError, match="same N"):
    metrics.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="empty"):
    metrics.accuracy([], [])


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="q_labels has 2 rows but there are 1 codes"):
    metrics.mean_average_precision(HQ, HDB, np.array([0, 1]), HDL)
  with pytest.raises(ValueError, match="db_labels has 3 rows"):
    metrics.mean_average_precision(HQ, HDB, HQL, HDL[:3])
  with pytest.raises(ValueError, match="code length mismatch"):
    metrics.mean_average_precision(HQ[:, :3], HDB, HQL, HDL)
  with pytest.raises(ValueError, match="normalization"):
    metrics.mean_average_precision(HQ, HDB, HQL, HDL, normalization="bogus")
  with pytest.raises(ValueError, match="topk must be"):
    metrics.mean_average_precision(HQ, HDB, HQL, HDL, topk=5)
  with pytest.raises(ValueError, match="non-empty"):
    metrics.mean_average_precision(HQ[:0], HDB, HQL[:0], HDL)
  with pytest.raises(ValueError, match="not the same kind"):
    metrics.mean_average_precision(HQ, HDB, np.eye(2)[[0]], HDL)


# --- Measures beyond same-class mAP (methods.md section 8) --------------------------------


def _ap_of_order(rel_in_order):
  hits, s = 0, 0.0
  for r, x in enumerate(rel_in_order, start=1):
    if x:
      hits += 1
      s += hits / r
  return s / max(hits, 1)


def ref_tie_aware_ap(d, rel):
  """The expectation of AP by enumerating every order within groups of equal distance."""
  import itertools  # pylint: disable=g-import-not-at-top

  groups = [list(np.flatnonzero(d == v)) for v in sorted(set(d.tolist()))]
  total, count = 0.0, 0
  for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
    order = [j for p in perms for j in p]
    total += _ap_of_order(rel[order]) if rel.any() else 0.0
    count += 1
  return total / count


def test_tie_aware_map_is_the_expectation_over_tie_orders():
  rng = np.random.default_rng(0)
  for trial in range(12):
    bits, n, nq = 4, 7, 3
    qc = rng.integers(0, 2, (nq, bits))
    dbc = (
      rng.integers(0, 2, (n, bits)) if trial % 3 else np.repeat(rng.integers(0, 2, (1, bits)), n, 0)
    )
    ql, dl = rng.integers(0, 3, nq), rng.integers(0, 3, n)
    d = (qc[:, None, :] != dbc[None, :, :]).sum(-1)
    rel = ql[:, None] == dl[None, :]
    want = np.mean([ref_tie_aware_ap(d[i], rel[i]) for i in range(nq)])
    got = metrics.tie_aware_map(
      hamming.pack_codes(qc, binary=True), hamming.pack_codes(dbc, binary=True), ql, dl
    )
    assert got == pytest.approx(want, abs=1e-12), trial
    report = metrics.retrieval_report(
      hamming.pack_codes(qc, binary=True),
      hamming.pack_codes(dbc, binary=True),
      ql,
      dl,
      ks=(1,),
      bits=bits,
    )
    assert report["map_tie_aware"] == pytest.approx(want, abs=1e-12)


def test_tie_aware_map_sees_collapsed_codes_that_index_order_rewards():
  # One code for every database item: index-order mAP depends on where the relevant items
  # sit in the archive, the tie-aware mAP is the random-order expectation.
  db = np.ones((6, 8), np.int8)
  dl = np.array([0, 0, 0, 1, 1, 1])
  q, ql = np.ones((1, 8), np.int8), np.array([0])
  assert (
    metrics.mean_average_precision(hamming.pack_codes(q), hamming.pack_codes(db), ql, dl) == 1.0
  )
  got = metrics.tie_aware_map(hamming.pack_codes(q), hamming.pack_codes(db), ql, dl)
  assert got == pytest.approx(ref_tie_aware_ap(np.zeros(6), dl == 0)) and got < 0.7


def ref_neighbour_recall(qc, dbc, qf, df, k):
  """Per query: the k nearest by cosine (ties by index), each counted with its probability
  of being in a Hamming top k drawn uniformly among the orders of equal distances."""
  d = (qc[:, None, :] != dbc[None, :, :]).sum(-1)
  qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
  dn = df / np.linalg.norm(df, axis=1, keepdims=True)
  out = []
  for i in range(len(qc)):
    sims = qn[i] @ dn.T
    true = sorted(range(len(dbc)), key=lambda j: (-sims[j], j))[:k]
    dist = sorted(d[i])
    kth = dist[k - 1]
    below = sum(x < kth for x in d[i])
    at = sum(x == kth for x in d[i])
    p = [1.0 if d[i, j] < kth else ((k - below) / at if d[i, j] == kth else 0.0) for j in true]
    out.append(sum(p) / k)
  return float(np.mean(out))


@pytest.mark.parametrize("tied", [False, True])
def test_neighbour_recall_against_a_plain_loop(tied):
  rng = np.random.default_rng(1)
  qc, dbc = rng.integers(0, 2, (9, 6)), rng.integers(0, 2, (40, 6))
  qf, df = rng.normal(size=(9, 5)), rng.normal(size=(40, 5))
  if tied:  # repeated reference rows: equal cosines, the true neighbours taken by index
    df = np.concatenate([df[:10]] * 4)
  got = metrics.neighbour_recall(
    hamming.pack_codes(qc, binary=True), hamming.pack_codes(dbc, binary=True), qf, df, ks=(1, 5, 10)
  )
  for k in (1, 5, 10):
    assert got[k] == pytest.approx(ref_neighbour_recall(qc, dbc, qf, df, k), abs=1e-12), k
  # Codes that are the sign of the reference itself find more neighbours than random codes;
  # one code for everything finds k / N of them in expectation.
  same = metrics.neighbour_recall(
    hamming.pack_codes(np.sign(qf)), hamming.pack_codes(np.sign(df)), qf, df, ks=(10,)
  )
  one = metrics.neighbour_recall(
    hamming.pack_codes(np.ones((9, 6))), hamming.pack_codes(np.ones((40, 6))), qf, df, ks=(10,)
  )
  assert one[10] == pytest.approx(10 / 40) and same[10] > got[10]


def test_code_usage_counts_codes_and_bit_entropy():
  codes = np.array([[1, -1, 1], [1, -1, -1], [1, -1, 1], [1, 1, 1]])
  usage = metrics.code_usage(hamming.pack_codes(codes), bits=3)
  assert usage["distinct_codes"] == 3 and usage["distinct_fraction"] == 0.75
  p = np.array([1.0, 0.25, 0.75])
  h = [0.0 if x in (0, 1) else -x * np.log2(x) - (1 - x) * np.log2(1 - x) for x in p]
  np.testing.assert_allclose(usage["bit_entropy_per_bit"], h)
  assert usage["bit_entropy"] == pytest.approx(np.mean(h))


def test_map_by_similarity_against_a_plain_loop():
  rng = np.random.default_rng(2)
  qf, df = rng.normal(size=(7, 4)), rng.normal(size=(30, 4))
  ql, dl = rng.integers(0, 3, 7), rng.integers(0, 3, 30)
  qn, dn = (
    qf / np.linalg.norm(qf, axis=1, keepdims=True),
    df / np.linalg.norm(df, axis=1, keepdims=True),
  )
  want = np.mean(
    [_ap_of_order((dl == ql[i])[np.argsort(-(qn[i] @ dn.T), kind="stable")]) for i in range(7)]
  )
  assert metrics.map_by_similarity(qf, df, ql, dl) == pytest.approx(want, abs=1e-12)
