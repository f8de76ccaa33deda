"""k-means over rows that need not fit in memory: chunked Lloyd iterations.

MrHash's stage 2 starts its cluster centres from k-means on the autoencoder's latents of
every training image. scipy's `kmeans2` wants the whole array in memory; at archive scale
(10^6-10^7 images) the latents live in a memory-mapped file instead. Here:

  init   k-means++ (Arthur & Vassilvitskii 2007) on a seeded sample of at most `sample`
         rows (the sample is read, never the whole array);
  Lloyd  `iters` iterations, each one pass over the rows in chunks of `chunk`: every row to
         its nearest centre (squared Euclidean), each centre to the mean of its rows; a
         centre that gets no row keeps its place (scipy kmeans2's `missing="warn"`);
  best   of `n_init` restarts by inertia (one more pass each).

The arithmetic is float64 and the same as scipy's `kmeans2(z, init, minit="matrix",
iter=iters)` from the same initial centres, so the result equals it up to the order of
the sums (tests/test_mrhash.py checks both, and chunked against in-memory). Memory is
O(chunk x (d + k)) beyond the centres, whatever the number of rows.
"""

from typing import Optional, Tuple

import numpy as np

from rshash_jax import errors


def _chunks(z, chunk: int):
  for i in range(0, z.shape[0], chunk):
    yield np.asarray(z[i : i + chunk], np.float64)


def _nearest(x: np.ndarray, centres: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(index of the nearest centre, squared distance to it) of each row of x."""
  d = (
    np.sum(x * x, axis=1, keepdims=True)
    - 2.0 * (x @ centres.T)
    + np.sum(centres * centres, axis=1)[None, :]
  )
  i = np.argmin(d, axis=1)
  return i, np.maximum(d[np.arange(len(x)), i], 0.0)


def plus_plus(sample: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding on `sample` [m, d] (m >= k): each next centre drawn with probability
  proportional to the squared distance to the nearest centre chosen so far."""
  x = np.asarray(sample, np.float64)
  centres = [x[rng.integers(len(x))]]
  d2 = np.sum((x - centres[0]) ** 2, axis=1)
  for _ in range(1, k):
    total = d2.sum()
    j = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
    centres.append(x[j])
    d2 = np.minimum(d2, np.sum((x - x[j]) ** 2, axis=1))
  return np.stack(centres)


def lloyd(z, centres: np.ndarray, iters: int, chunk: int) -> np.ndarray:
  """`iters` Lloyd iterations from `centres` over the rows of z, read in chunks."""
  c = np.array(centres, np.float64)
  k, d = c.shape
  for _ in range(iters):
    sums, counts = np.zeros((k, d)), np.zeros(k)
    for x in _chunks(z, chunk):
      i, _ = _nearest(x, c)
      np.add.at(sums, i, x)
      counts += np.bincount(i, minlength=k)
    filled = counts > 0
    c[filled] = sums[filled] / counts[filled, None]
  return c


def inertia(z, centres: np.ndarray, chunk: int) -> float:
  return float(sum(_nearest(x, centres)[1].sum() for x in _chunks(z, chunk)))


def kmeans(
  z,
  k: int,
  *,
  n_init: int = 1,
  seed: int = 0,
  iters: int = 10,
  chunk: int = 1 << 16,
  sample: Optional[int] = 1 << 16,
) -> np.ndarray:
  """Best-of-`n_init` centres [k, d] (float32) of the rows of z [N, d] (any array that
  slices, a memory-mapped one included); see the module docstring."""
  n = z.shape[0]
  if not 1 <= k <= n:
    raise errors.InvalidInput(f"k-means: {k} clusters need 1..{n} rows, there are {n}")
  best, best_inertia = None, np.inf
  for r in range(n_init):
    rng = np.random.default_rng([seed, r])
    m = n if not sample or n <= sample else sample
    rows = np.arange(n) if m == n else np.sort(rng.choice(n, m, replace=False))
    init = plus_plus(np.asarray(z[rows], np.float64), k, rng)
    centres = lloyd(z, init, iters, chunk)
    value = inertia(z, centres, chunk)
    if value < best_inertia:
      best, best_inertia = centres, value
  return best.astype(np.float32)
