"""The one sign rule: a code bit is +1 where the network output is >= 0, else -1.

Zero counts as +1, so a code never has a zero bit (the papers' sgn leaves 0 undefined).
Training losses (quantisation terms), the shallow baselines, the encoders and the bit
packing of `retrieval.hamming` all take their bits from here.
"""

import jax.numpy as jnp
import numpy as np


def bits(x):
  """The set bits of real values `x` (numpy or JAX): x >= 0."""
  return x >= 0


def signs(x):
  """{-1, +1} codes of real values: int8 for numpy input, x's dtype for JAX arrays and tracers."""
  if isinstance(x, (np.ndarray, np.generic, float, int)):
    return np.where(bits(np.asarray(x)), 1, -1).astype(np.int8)
  return jnp.where(bits(x), 1, -1).astype(x.dtype)
