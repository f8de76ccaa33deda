"""Unsupervised shallow hashing baselines on the same features as the deep methods.

- LSH (Charikar 2002): signs of random Gaussian projections of mean-centred features.
- ITQ (Gong & Lazebnik, CVPR 2011): PCA to K dimensions, then an orthogonal rotation R
  minimising the quantisation error ||B - V R||_F, alternating B = sgn(V R) and the
  orthogonal Procrustes solution for R (50 iterations, as in the paper). Past 256 MiB of
  features it is fitted in row slices (the covariance, then V in a scratch file).

Both are fitted on database (training) features only and use no labels. Codes are
{-1, +1} (x >= 0 -> +1).
"""

import dataclasses
from typing import Optional

import numpy as np

from rshash_jax import errors, scratch
from rshash_jax.models import signs


@dataclasses.dataclass
class LinearHash:
  """codes = sign((x - mean) @ projection)."""

  mean: np.ndarray
  projection: np.ndarray

  def __call__(self, x: np.ndarray, rows: int = scratch.ROWS) -> np.ndarray:
    """Codes of x [N, D] (memory-mapped or not), in slices of `rows` rows."""
    if x.shape[0] <= rows:
      return signs.signs((np.asarray(x, np.float64) - self.mean) @ self.projection)
    return np.concatenate([self(x[i : i + rows], rows) for i in range(0, x.shape[0], rows)])


def fit_lsh(train: np.ndarray, bits: int, seed: int = 0) -> LinearHash:
  x = np.asarray(train, np.float64)
  w = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
  return LinearHash(x.mean(axis=0), w)


# ITQ's exact fit holds the training features in float64 (and the SVD's work) up to this.
ITQ_IN_MEMORY_BYTES = 256 << 20
ITQ_METHODS = ("auto", "exact", "sliced")


def fit_itq(
  train: np.ndarray,
  bits: int,
  iterations: int = 50,
  seed: int = 0,
  *,
  method: str = "auto",
  rows: int = scratch.ROWS,
  directory: Optional[str] = None,
) -> LinearHash:
  """ITQ on train [N, D] (memory-mapped or not).

  `exact`: the textbook fit in memory (PCA by SVD of the centred matrix). `sliced`: in
  slices of `rows` rows, PCA from the D x D covariance (float64; each direction's largest
  entry made positive), the N x bits projections V in a scratch array under `directory`,
  one pass over V per iteration: process memory O(D^2 + rows * D), flat in N. Both solve
  the same problem and differ only in the principal directions' signs, so the rotation
  starts elsewhere and may end in another local optimum. `auto`: exact while the features
  take at most ITQ_IN_MEMORY_BYTES in float64, sliced beyond."""
  n, d = train.shape
  if bits > min(n, d):
    raise errors.InvalidInput(f"ITQ needs bits <= min(num_train, dim) = {min(n, d)}, got {bits}")
  if method not in ITQ_METHODS:
    raise errors.InvalidInput(f"ITQ method must be one of {ITQ_METHODS}, got {method!r}")
  if method == "auto":
    method = "exact" if n * d * 8 <= ITQ_IN_MEMORY_BYTES else "sliced"
  rng = np.random.default_rng(seed)
  if method == "exact":
    xc = np.array(train, np.float64)  # a copy, centred in place: one N x D array, not two
    mean = xc.mean(axis=0)
    xc -= mean
    _, _, vt = np.linalg.svd(xc, full_matrices=False)  # PCA: top right singular vectors
    pca = vt[:bits].T
    v = xc @ pca
    r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
    for _ in range(iterations):
      b = signs.signs(v @ r).astype(np.float64)
      u, _, wt = np.linalg.svd(b.T @ v)
      r = (u @ wt).T
    return LinearHash(mean, pca @ r)
  parts = lambda a: (np.asarray(a[i : i + rows], np.float64) for i in range(0, n, rows))
  mean = sum(p.sum(axis=0) for p in parts(train)) / n
  cov = np.zeros((d, d))
  for p in parts(train):
    p = p - mean  # a view of train when it is float64 already: never in place
    cov += p.T @ p
  _, vecs = np.linalg.eigh(cov)
  pca = vecs[:, ::-1][:, :bits]  # top-`bits` principal directions
  pca = pca * np.sign(pca[np.abs(pca).argmax(axis=0), np.arange(bits)])
  v = scratch.empty((n, bits), np.float64, directory)
  for i, p in zip(range(0, n, rows), parts(train)):
    v[i : i + rows] = (p - mean) @ pca
  r, _ = np.linalg.qr(rng.standard_normal((bits, bits)))
  for _ in range(iterations):
    m = np.zeros((bits, bits))
    for p in parts(v):
      m += signs.signs(p @ r).astype(np.float64).T @ p
    u, _, wt = np.linalg.svd(m)
    r = (u @ wt).T
  return LinearHash(mean, pca @ r)
