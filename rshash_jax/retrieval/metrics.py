"""Retrieval and classification metrics, each defined once.

Definitions (the same in docs/retrieval.md):

* Ranking. The database is ranked for each query by Hamming distance, ties broken
  by the lower database index (`rshash_jax.retrieval.hamming` contract): a stable order
  is what the papers' code computes and is exactly reproducible. With collapsed codes
  (many items at one distance) it rewards the archive order, so the tie-aware mAP below
  is reported beside it.
* Tie-aware AP (McFee & Lanckriet 2009): the expectation of the full-ranking AP over
  uniformly random orders inside each group of equal distance, in closed form. Groups i
  in increasing distance hold n_i items, r_i relevant; N_i items and R_i relevant come
  before; R relevant in all: E[AP] = (1/R) sum_i (r_i/n_i) sum_{j=1..n_i}
  (R_i + 1 + (j-1)(r_i-1)/(n_i-1)) / (N_i + j), the (j-1) term 0 when n_i = 1.
* Neighbour recall@k: the fraction of a query's k nearest database items under a
  reference float embedding (cosine; ties in it by the lower index) that are in its
  Hamming top k, an item at the k-th distance counted with probability (slots left at
  that distance) / (items at that distance). It does not use labels.
* Code usage: distinct codes among the database codes, and each bit's entropy
  H(p) = -p log2 p - (1-p) log2 (1-p), p = the fraction of codes with the bit set.
* Relevance. Labels are class ids [N] or multi-hot [N, C]; a database item is
  relevant to a query iff they share at least one label.
* Average precision over the first n ranked items (n = N for the full ranking,
  n = k for mAP@k): AP = (1 / Z) * sum over relevant ranks r <= n of P@r, where
  P@r = (relevant among the first r) / r. The normaliser Z is named by
  `normalization`:
    - "retrieved" (default; DPSH/DHCNN/HashNet code): relevant items among the n;
    - "min": min(n, relevant items in the whole database);
    - "all": relevant items in the whole database.
  For the full ranking all three are equal.
* A query with no relevant item among the n (so Z would be 0) scores AP = 0 with
  `no_relevant="zero"` (default: the system found nothing) or is left out of the
  mean with `no_relevant="skip"`. mAP is the mean of AP over the counted queries.
* P@k = relevant among the first k / k; R@k = relevant among the first k / all
  relevant (queries with no relevant item in the database are left out of R@k).
* Hamming-radius P-R curve, for every radius r = 0..bits: precision(r) = relevant
  items within distance <= r / items within <= r, recall(r) = relevant within r /
  all relevant. Queries that retrieve nothing within r count as precision 0 with
  `empty="zero"` (default) or are left out with `empty="skip"`; recall leaves out
  queries with no relevant item in the database.
* Accuracy = fraction of predictions equal to the label (argmax of logits).
* Multi-label F1: a label is predicted where its logit > 0; per label
  F1 = 2 TP / (2 TP + FP + FN) over the queries (1.0 for a label neither present nor
  predicted anywhere, which then leaves no error to score); macro = mean of the per-label
  F1, micro = 2 sum TP / (2 sum TP + sum FP + sum FN).
"""

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np

from rshash_jax import config_defaults, errors, scratch
from rshash_jax.parallel import sharding
from rshash_jax.retrieval import hamming

NORMALIZATIONS = ("retrieved", "min", "all")
NO_RELEVANT = ("zero", "skip")

_MAX_BLOCK = 1 << 20  # elements of a [queries, database] block held at once (~30 MB of temporaries)


def _codes(name: str, codes) -> Tuple[np.ndarray, Optional[int]]:
  """Returns packed codes and their bit count (None when given already packed)."""
  arr = np.asarray(codes)
  if arr.dtype == np.uint32:
    return hamming.check_packed(name, arr), None
  if arr.ndim != 2 or arr.shape[0] == 0:
    raise errors.InvalidInput(
      f"{name} must be a non-empty 2-D array of codes, got shape {arr.shape}"
    )
  return hamming.pack_codes(arr), arr.shape[1]


def _labels(name: str, labels, n: int) -> np.ndarray:
  lab = np.asarray(labels)
  if lab.ndim not in (1, 2):
    raise errors.InvalidInput(
      f"{name} must be class ids [N] or multi-hot [N, C], got shape {lab.shape}"
    )
  if lab.shape[0] != n:
    raise errors.InvalidInput(f"{name} has {lab.shape[0]} rows but there are {n} codes")
  if lab.ndim == 1 and not np.issubdtype(lab.dtype, np.integer):
    raise errors.WrongType(f"{name} as class ids must be integers, got dtype {lab.dtype}")
  return lab


class _Problem:
  """Validated inputs of a retrieval evaluation, and the relevance they imply."""

  def __init__(self, q_codes, db_codes, q_labels, db_labels, bits=None):
    self.q, qbits = _codes("q_codes", q_codes)
    self.db, dbbits = _codes("db_codes", db_codes)
    if self.q.shape[1] != self.db.shape[1] or (qbits and dbbits and qbits != dbbits):
      raise errors.InvalidInput(
        f"code length mismatch: queries {qbits or self.q.shape[1] * 32} bits, "
        f"database {dbbits or self.db.shape[1] * 32} bits"
      )
    self.bits = int(bits or qbits or dbbits or self.q.shape[1] * hamming.WORD_BITS)
    self.q_labels = _labels("q_labels", q_labels, self.q.shape[0])
    self.db_labels = _labels("db_labels", db_labels, self.db.shape[0])
    if self.q_labels.ndim != self.db_labels.ndim or (
      self.q_labels.ndim == 2 and self.q_labels.shape[1] != self.db_labels.shape[1]
    ):
      raise errors.InvalidInput(
        f"q_labels {self.q_labels.shape} and db_labels {self.db_labels.shape} "
        "are not the same kind of label"
      )
    self.num_query, self.num_db = self.q.shape[0], self.db.shape[0]
    if self.db_labels.ndim == 1:
      _, inv = np.unique(np.concatenate([self.db_labels, self.q_labels]), return_inverse=True)
      counts = np.bincount(inv[: self.num_db], minlength=inv.max() + 1)
      self.num_relevant = counts[inv[self.num_db :]]
    else:
      self.num_relevant = np.concatenate(
        [self.relevance(s, e).sum(1) for s, e in self.query_blocks()]
      )

  def query_blocks(self) -> Iterator[Tuple[int, int]]:
    step = max(1, _MAX_BLOCK // self.num_db)
    for s in range(0, self.num_query, step):
      yield s, min(s + step, self.num_query)

  def relevance(self, s: int, e: int, db_index: Optional[np.ndarray] = None) -> np.ndarray:
    """Bool [e - s, N] (or [e - s, k] at `db_index`): shares at least one label."""
    ql = self.q_labels[s:e]
    if db_index is None:
      if ql.ndim == 1:
        return ql[:, None] == self.db_labels[None, :]
      return (ql.astype(np.float32) @ self.db_labels.T.astype(np.float32)) > 0
    dl = self.db_labels[db_index]  # [e - s, k] or [e - s, k, C]
    if ql.ndim == 1:
      return ql[:, None] == dl
    return np.einsum("qc,qkc->qk", ql.astype(np.float32), dl.astype(np.float32)) > 0

  def distances(self, s: int, e: int) -> np.ndarray:
    return np.asarray(hamming.hamming_distances(self.q[s:e], self.db)).astype(np.uint16)

  def ranked_relevance(self, topk: Optional[int]) -> Iterator[Tuple[int, int, np.ndarray]]:
    """Yields (start, end, relevance of the first n ranked items [e - s, n])."""
    n = self.num_db if topk is None else int(topk)
    if not 1 <= n <= self.num_db:
      raise errors.InvalidInput(f"topk must be in [1, {self.num_db}] (database size), got {topk}")
    if n == self.num_db:
      for s, e in self.query_blocks():
        # Stable sort of small unsigned ints (radix sort): ties keep index order.
        order = np.argsort(self.distances(s, e), axis=1, kind="stable")
        yield s, e, np.take_along_axis(self.relevance(s, e), order, axis=1)
    else:
      # This process's devices: metrics run on every process alone, with no collective.
      _, idx = hamming.hamming_topk(
        self.q, self.db, n, mesh=sharding.data_mesh(jax.local_devices())
      )
      for s, e in self.query_blocks():
        yield s, e, self.relevance(s, e, idx[s:e])


def _check_choice(name, value, choices):
  if value not in choices:
    raise errors.InvalidInput(f"{name} must be one of {choices}, got {value!r}")


def _average_precision(rel: np.ndarray, num_relevant: np.ndarray, normalization: str):
  """AP of ranked relevance rows [Q, n]; returns (ap [Q], has_relevant [Q])."""
  n = rel.shape[1]
  hits = np.cumsum(rel, axis=1, dtype=np.int64)
  prec_sum = (hits / np.arange(1, n + 1) * rel).sum(axis=1)
  retrieved = hits[:, -1]
  z = {"retrieved": retrieved, "min": np.minimum(n, num_relevant), "all": num_relevant}[
    normalization
  ]
  has = retrieved > 0
  ap = np.where(has, prec_sum / np.maximum(z, 1), 0.0)
  return ap, has


def _mean(values: np.ndarray, counted: np.ndarray) -> float:
  return float(values[counted].mean()) if counted.any() else 0.0


def mean_average_precision(
  q_codes,
  db_codes,
  q_labels,
  db_labels,
  topk: Optional[int] = None,
  *,
  normalization: str = "retrieved",
  no_relevant: str = "zero",
) -> float:
  """mAP of Hamming ranking (full ranking when topk is None, else mAP@topk).

  Codes: packed uint32 (`hamming.pack_codes`) or unpacked [N, K] real / {-1,+1} /
  {0,1}. Labels: class ids [N] or multi-hot [N, C]; relevant = shares a label.
  Ties in distance are broken by lower database index. AP normaliser
  (`normalization`): "retrieved" relevant in the top-k (default), "min"
  min(k, all relevant) or "all" relevant; queries with no relevant item in the
  evaluated list count as 0 (`no_relevant="zero"`) or are skipped ("skip").
  See the module docstring for the full definition.
  """
  _check_choice("normalization", normalization, NORMALIZATIONS)
  _check_choice("no_relevant", no_relevant, NO_RELEVANT)
  prob = _Problem(q_codes, db_codes, q_labels, db_labels)
  aps, has = [], []
  for s, e, rel in prob.ranked_relevance(topk):
    ap, h = _average_precision(rel, prob.num_relevant[s:e], normalization)
    aps.append(ap)
    has.append(h)
  ap, has = np.concatenate(aps), np.concatenate(has)
  return _mean(ap, has if no_relevant == "skip" else np.ones_like(has))


def _at_k(rel: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]):
  hits = np.cumsum(rel, axis=1, dtype=np.int64)
  idx = np.asarray(ks) - 1
  p = hits[:, idx] / np.asarray(ks)
  r = hits[:, idx] / np.maximum(num_relevant, 1)[:, None]
  return p, r


def _valid_ks(ks: Sequence[int], n: int) -> Tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  if not ks or any(k < 1 for k in ks):
    raise errors.InvalidInput(f"ks must be positive integers, got {ks}")
  return tuple(sorted(set(min(k, n) for k in ks)))


def precision_recall_at_k(
  q_codes, db_codes, q_labels, db_labels, ks: Sequence[int] = config_defaults.DHCNN_KS
) -> Dict[str, Dict[int, float]]:
  """Mean P@k and R@k for each k (k larger than the database is clipped to it).

  Returns {"precision": {k: P@k}, "recall": {k: R@k}}; R@k leaves out queries with
  no relevant item in the database.
  """
  prob = _Problem(q_codes, db_codes, q_labels, db_labels)
  ks = _valid_ks(ks, prob.num_db)
  ps, rs = [], []
  for s, e, rel in prob.ranked_relevance(max(ks)):
    p, r = _at_k(rel, prob.num_relevant[s:e], ks)
    ps.append(p)
    rs.append(r)
  p, r = np.concatenate(ps), np.concatenate(rs)
  has = prob.num_relevant > 0
  return {
    "precision": {k: float(p[:, j].mean()) for j, k in enumerate(ks)},
    "recall": {k: _mean(r[:, j], has) for j, k in enumerate(ks)},
  }


def _radius_counts(prob: _Problem) -> Tuple[np.ndarray, np.ndarray]:
  """Cumulative counts [Q, bits + 1] of all / relevant items within radius r."""
  nb = prob.bits + 1
  within, within_rel = [], []
  for s, e in prob.query_blocks():
    d = prob.distances(s, e).astype(np.int64)
    rows = np.arange(e - s)[:, None] * nb
    flat = (rows + np.minimum(d, prob.bits)).ravel()
    size = (e - s) * nb
    hist_all = np.bincount(flat, minlength=size).reshape(e - s, nb)
    hist_rel = np.bincount(flat, weights=prob.relevance(s, e).ravel(), minlength=size)
    within.append(np.cumsum(hist_all, axis=1))
    within_rel.append(np.cumsum(hist_rel.reshape(e - s, nb), axis=1))
  return np.concatenate(within), np.concatenate(within_rel)


def _tie_aware_ap(
  within: np.ndarray, within_rel: np.ndarray, num_relevant: np.ndarray
) -> np.ndarray:
  """E[AP] [Q] over random orders within equal distances, from the cumulative counts of
  `_radius_counts` (the closed form of the module docstring; AP 0 without relevant items)."""
  n = np.diff(within, axis=1, prepend=0).astype(np.float64)  # items at each distance
  r = np.diff(within_rel, axis=1, prepend=0).astype(np.float64)
  before, rel_before = within - n, within_rel - r
  total = int(within[:, -1].max()) if within.size else 0
  harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, total + 1))])
  b0 = before.astype(np.int64)
  s1 = harmonic[b0 + n.astype(np.int64)] - harmonic[b0]  # sum_j 1 / (N_i + j)
  s2 = n - (before + 1) * s1  # sum_j (j - 1) / (N_i + j)
  slope = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
  group = np.where(n > 0, r / np.maximum(n, 1) * ((rel_before + 1) * s1 + slope * s2), 0.0)
  return np.where(num_relevant > 0, group.sum(1) / np.maximum(num_relevant, 1), 0.0)


def _pr_curve(prob: _Problem, empty: str, counts=None) -> Dict[str, np.ndarray]:
  within, within_rel = counts if counts is not None else _radius_counts(prob)
  prec = within_rel / np.maximum(within, 1)
  counted = within > 0 if empty == "skip" else np.ones_like(within, bool)
  has = prob.num_relevant > 0
  recall = within_rel[has] / prob.num_relevant[has][:, None]
  return {
    "radius": np.arange(prob.bits + 1),
    "precision": np.array([_mean(prec[:, r], counted[:, r]) for r in range(prob.bits + 1)]),
    "recall": recall.mean(0) if has.any() else np.zeros(prob.bits + 1),
  }


def pr_curve_by_radius(
  q_codes, db_codes, q_labels, db_labels, *, bits: Optional[int] = None, empty: str = "zero"
) -> Dict[str, np.ndarray]:
  """Precision and recall within Hamming radius r, for every r in 0..bits.

  `bits` defaults to the code length (known from unpacked codes, else 32 * words).
  Returns {"radius": [bits + 1], "precision": [bits + 1], "recall": [bits + 1]}.
  """
  _check_choice("empty", empty, NO_RELEVANT)
  prob = _Problem(q_codes, db_codes, q_labels, db_labels, bits=bits)
  return _pr_curve(prob, empty)


def tie_aware_map(q_codes, db_codes, q_labels, db_labels, *, bits: Optional[int] = None) -> float:
  """Mean over queries of the tie-aware AP of the full ranking (module docstring)."""
  prob = _Problem(q_codes, db_codes, q_labels, db_labels, bits=bits)
  return float(_tie_aware_ap(*_radius_counts(prob), prob.num_relevant).mean())


def unit_rows(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm (float32): cosines become dot products."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_k_mask(sim: np.ndarray, k: int) -> np.ndarray:
  """Per row of sim [B, N], a mask of its k largest entries, ties at the k-th value to the
  lower index (the set a stable descending sort puts first), without sorting the row."""
  kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
  above = sim > kth
  tied = sim == kth
  # The first (k - #above) tied entries of each row, by index.
  room = (k - above.sum(1, keepdims=True)).astype(np.int32)
  return above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= room))


def neighbour_recall(
  q_codes, db_codes, q_reference, db_reference, ks: Sequence[int] = (10, 100)
) -> Dict[int, float]:
  """{k: neighbour recall@k} (module docstring) of packed codes against reference float
  embeddings [Q, D] / [N, D] of the same queries and database items, for each k < N."""
  q, _ = _codes("q_codes", q_codes)
  db, _ = _codes("db_codes", db_codes)
  # The database reference may be memory-mapped: read as it is (no copy when float32),
  # scaled by its rows' inverse norms in each block rather than copied to unit rows.
  qr, dr = unit_rows(q_reference), np.asarray(db_reference, np.float32)
  if qr.shape[0] != q.shape[0] or dr.shape[0] != db.shape[0] or qr.shape[1] != dr.shape[1]:
    raise errors.InvalidInput(
      f"reference embeddings {qr.shape} / {dr.shape} do not match {q.shape[0]} queries and "
      f"{db.shape[0]} database codes"
    )
  # k >= N finds every item whatever the codes: such k are left out.
  ks = tuple(k for k in _valid_ks(ks, db.shape[0]) if k < db.shape[0])
  inv_norm = np.empty(dr.shape[0], np.float32)
  for i in range(0, dr.shape[0], scratch.ROWS):
    rows = slice(i, i + scratch.ROWS)
    inv_norm[rows] = 1 / np.maximum(np.linalg.norm(dr[rows], axis=1), 1e-12)
  found = {k: [] for k in ks}
  step = max(1, _MAX_BLOCK // db.shape[0])
  for s in range(0, q.shape[0], step):
    e = min(s + step, q.shape[0])
    d = np.asarray(hamming.hamming_distances(q[s:e], db))  # int32
    sim = (qr[s:e] @ dr.T) * inv_norm
    for k in ks:
      true = _top_k_mask(sim, k)
      kth = np.partition(d, k - 1, axis=1)[:, k - 1 : k]  # the k-th smallest distance
      below, at = d < kth, d == kth
      # Expected hits among the true neighbours: every item below the k-th distance is
      # in the Hamming top k; the (k - #below) places left go to the #at tied items with
      # equal probability.
      p_at = (k - below.sum(1)) / at.sum(1)
      hit = (below & true).sum(1) + p_at * (at & true).sum(1)
      found[k].append(hit / k)
      del true, below, at
    del d, sim
  return {k: float(np.concatenate(v).mean()) for k, v in found.items()}


def code_usage(db_codes, bits: Optional[int] = None) -> Dict[str, Any]:
  """{"distinct_codes", "distinct_fraction", "bit_entropy" (mean over bits, in bits),
  "bit_entropy_per_bit"} of the database codes (module docstring)."""
  db, known = _codes("db_codes", db_codes)
  k = int(bits or known or db.shape[1] * hamming.WORD_BITS)
  if db.shape[0] == 0:
    raise errors.InvalidInput("code usage of an empty database is undefined")
  distinct = int(np.unique(db, axis=0).shape[0])
  p = (hamming.unpack_codes(db, k) > 0).mean(0)  # each bit's frequency
  with np.errstate(divide="ignore", invalid="ignore"):
    h = -np.nan_to_num(p * np.log2(p)) - np.nan_to_num((1 - p) * np.log2(1 - p))
  return {
    "distinct_codes": distinct,
    "distinct_fraction": distinct / db.shape[0],
    "bit_entropy": float(h.mean()),
    "bit_entropy_per_bit": h.tolist(),
  }


def map_by_similarity(q_features, db_features, q_labels, db_labels) -> float:
  """Full-ranking mAP of a float embedding ranked by cosine similarity (ties by the lower
  index), same relevance and AP as `mean_average_precision`: a reference for codes."""
  qf, df = unit_rows(q_features), unit_rows(db_features)
  # Placeholder codes: only _Problem's label checks, relevance and blocks are used.
  zeros = lambda n: np.zeros((n, 1), np.uint32)
  prob = _Problem(zeros(qf.shape[0]), zeros(df.shape[0]), q_labels, db_labels)
  aps = []
  for s, e in prob.query_blocks():
    order = np.argsort(-(qf[s:e] @ df.T), axis=1, kind="stable")
    rel = np.take_along_axis(prob.relevance(s, e), order, axis=1)
    aps.append(_average_precision(rel, prob.num_relevant[s:e], "retrieved")[0])
  return float(np.concatenate(aps).mean())


def precision_at_radius(
  q_codes, db_codes, q_labels, db_labels, radius: int = 2, *, empty: str = "zero"
) -> float:
  """Mean precision of the items within Hamming distance <= radius (see pr_curve_by_radius)."""
  curve = pr_curve_by_radius(q_codes, db_codes, q_labels, db_labels, empty=empty)
  if not 0 <= radius < len(curve["precision"]):
    raise errors.InvalidInput(f"radius must be in [0, {len(curve['precision']) - 1}], got {radius}")
  return float(curve["precision"][radius])


def multilabel_f1(logits, labels) -> Dict[str, Any]:
  """{"per_label": [C] F1, "macro", "micro"} of logits > 0 against multi-hot labels [N, C]."""
  lg, lab = np.asarray(logits), np.asarray(labels)
  if lg.ndim != 2 or lab.shape != lg.shape or lg.size == 0:
    raise errors.InvalidInput(
      f"logits {lg.shape} and multi-hot labels {lab.shape} must be [N, C] with N > 0"
    )
  pred, truth = lg > 0, lab > 0
  tp = (pred & truth).sum(0).astype(np.float64)
  fp = (pred & ~truth).sum(0).astype(np.float64)
  fn = (~pred & truth).sum(0).astype(np.float64)
  denom = 2 * tp + fp + fn
  per = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 1.0)
  micro = float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1))
  return {"per_label": per.tolist(), "macro": float(per.mean()), "micro": micro}


def accuracy(predictions, labels) -> float:
  """Fraction of correct predictions; `predictions` are class ids [N] or logits [N, C]."""
  pred = np.asarray(predictions)
  lab = np.asarray(labels)
  if pred.ndim == 2:
    pred = pred.argmax(-1)
  if pred.ndim != 1 or lab.ndim != 1 or pred.shape != lab.shape:
    raise errors.InvalidInput(
      f"predictions {np.asarray(predictions).shape} and labels {lab.shape} "
      "must be [N] (or logits [N, C]) with the same N"
    )
  if pred.size == 0:
    raise errors.InvalidInput("accuracy of an empty set is undefined")
  return float((pred == lab).mean())


def retrieval_report(
  q_codes,
  db_codes,
  q_labels,
  db_labels,
  *,
  map_ks: Sequence[int] = (),
  ks: Sequence[int] = config_defaults.DHCNN_KS,
  bits: Optional[int] = None,
) -> Dict:
  """Everything an evaluation writes, from one full ranking (same definitions as above).

  Returns map (full ranking, index order within ties), map_tie_aware, map_at {k: mAP@k},
  precision_at / recall_at {k: ...}, and pr_curve {radius, precision, recall} lists,
  with default options.
  """
  prob = _Problem(q_codes, db_codes, q_labels, db_labels, bits=bits)
  p_ks = _valid_ks(ks, prob.num_db)
  m_ks = _valid_ks(map_ks, prob.num_db) if map_ks else ()
  full_ap, at_ap, ps, rs = [], {k: [] for k in m_ks}, [], []
  for s, e, rel in prob.ranked_relevance(None):
    nrel = prob.num_relevant[s:e]
    full_ap.append(_average_precision(rel, nrel, "retrieved")[0])
    for k in m_ks:
      at_ap[k].append(_average_precision(rel[:, :k], nrel, "retrieved")[0])
    p, r = _at_k(rel, nrel, p_ks)
    ps.append(p)
    rs.append(r)
  p, r = np.concatenate(ps), np.concatenate(rs)
  has = prob.num_relevant > 0
  counts = _radius_counts(prob)
  pr = _pr_curve(prob, "zero", counts)
  return {
    "num_query": prob.num_query,
    "num_database": prob.num_db,
    "map": float(np.concatenate(full_ap).mean()),
    "map_tie_aware": float(_tie_aware_ap(*counts, prob.num_relevant).mean()),
    "map_at": {k: float(np.concatenate(v).mean()) for k, v in at_ap.items()},
    "precision_at": {k: float(p[:, j].mean()) for j, k in enumerate(p_ks)},
    "recall_at": {k: _mean(r[:, j], has) for j, k in enumerate(p_ks)},
    "pr_curve": {name: values.tolist() for name, values in pr.items()},
  }
