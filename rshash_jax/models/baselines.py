"""Unsupervised shallow hashing baselines on the same features as the deep methods.

- LSH (Charikar 2002): signs of random Gaussian projections of mean-centred features.
- ITQ (Gong & Lazebnik, CVPR 2011): PCA to K dimensions, then an orthogonal rotation R
  minimising the quantisation error ||B - V R||_F, alternating B = sgn(V R) and the
  orthogonal Procrustes solution for R (50 iterations, as in the paper).

Both are fitted on database (training) features only and use no labels. Codes are
{-1, +1} (x >= 0 -> +1).
"""

import dataclasses

import numpy as np

from rshash_jax import errors
from rshash_jax.models import signs


@dataclasses.dataclass
class LinearHash:
  """codes = sign((x - mean) @ projection)."""

  mean: np.ndarray
  projection: np.ndarray

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return signs.signs((np.asarray(x, np.float64) - self.mean) @ self.projection)


def fit_lsh(train: np.ndarray, bits: int, seed: int = 0) -> LinearHash:
  x = np.asarray(train, np.float64)
  w = np.random.default_rng(seed).standard_normal((x.shape[1], bits))
  return LinearHash(x.mean(axis=0), w)


def fit_itq(train: np.ndarray, bits: int, iterations: int = 50, seed: int = 0) -> LinearHash:
  x = np.asarray(train, np.float64)
  if bits > min(x.shape):
    raise errors.InvalidInput(f"ITQ needs bits <= min(num_train, dim) = {min(x.shape)}, got {bits}")
  mean = x.mean(axis=0)
  xc = x - mean
  # PCA: top-`bits` right singular vectors.
  _, _, vt = np.linalg.svd(xc, full_matrices=False)
  pca = vt[:bits].T
  v = xc @ pca
  r, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((bits, bits)))
  for _ in range(iterations):
    b = signs.signs(v @ r).astype(np.float64)
    u, _, wt = np.linalg.svd(b.T @ v)
    r = (u @ wt).T
  return LinearHash(mean, pca @ r)
