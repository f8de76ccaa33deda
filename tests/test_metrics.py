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
