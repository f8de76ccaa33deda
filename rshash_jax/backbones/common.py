"""What every backbone shares: preprocessing description and weight-checking helpers."""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rshash_jax import errors

Params = Dict[str, Any]

IMAGENET_MEAN_RGB_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB_01 = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a backbone wants its input: pixels in [0, 255] RGB are mapped to
  `(x[..., channels] * scale - mean) / std` at `size` x `size`.

  `mean` is per channel (3,) or a mean image (H, W, 3) in the model's channel order,
  resized to `size` when it differs (VGG-F ships a 224x224 mean image).
  """
  size: int
  mean: Any = (0.0, 0.0, 0.0)
  std: Any = (1.0, 1.0, 1.0)
  scale: float = 1.0
  bgr: bool = False

  def __call__(self, images, dtype=jnp.float32):
    """images: uint8/float [B, size, size, 3] RGB in [0, 255] -> normalised model input."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-3:] != (self.size, self.size, 3):
      raise errors.InvalidInput(f"expected images [..., {self.size}, {self.size}, 3], got {x.shape}")
    if self.bgr:
      x = x[..., ::-1]
    mean = jnp.asarray(self.mean, jnp.float32)
    if mean.ndim == 3 and mean.shape[:2] != (self.size, self.size):
      mean = jax.image.resize(mean, (self.size, self.size, 3), "bilinear")
    return ((x * self.scale - mean) / jnp.asarray(self.std, jnp.float32)).astype(dtype)

  def to_config(self) -> Dict[str, Any]:
    """JSON-friendly form (a mean image is stored as its per-channel average)."""
    mean = np.asarray(self.mean, np.float64)
    if mean.ndim == 3:
      mean = mean.mean(axis=(0, 1))
    return dict(size=self.size, mean=mean.tolist(), std=np.asarray(self.std).tolist(),
                scale=self.scale, bgr=self.bgr)


def _head(items, n: int = 8, sep: str = ", ") -> str:
  return sep.join(items[:n]) + (f"{sep}... ({len(items) - n} more)" if len(items) > n else "")


def check_and_assign(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, np.ndarray],
                     source: str) -> Dict[str, np.ndarray]:
  """Checks that `found` has exactly the `expected` names and shapes.

  Raises ValueError naming every missing, unexpected and mis-shaped entry of `source`.
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  bad = [f"{k}: expected {tuple(expected[k])}, found {tuple(np.shape(found[k]))}"
         for k in sorted(set(expected) & set(found)) if tuple(np.shape(found[k])) != tuple(expected[k])]
  if missing or unexpected or bad:
    lines = []
    if missing:
      lines.append(f"missing ({len(missing)}): {_head(missing)}")
    if unexpected:
      lines.append(f"unexpected ({len(unexpected)}): {_head(unexpected)}")
    if bad:
      lines.append(f"wrong shape ({len(bad)}): {_head(bad, sep='; ')}")
    raise errors.InvalidInput(f"{source}: weights do not match the model\n  " + "\n  ".join(lines))
  return {k: np.asarray(found[k], np.float32) for k in expected}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> Params:
  """{'a/b': x} -> {'a': {'b': x}}."""
  out: Params = {}
  for name, v in flat.items():
    *path, leaf = name.split("/")
    node = out
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def param_shapes(module, size: int) -> Dict[str, Tuple[int, ...]]:
  """Flat {name: shape} of `module`'s params for a [1, size, size, 3] input."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def missing_weights_error(what: str, how: str, path: Optional[str] = None) -> errors.NotFound:
  where = f" at {path}" if path else ""
  return errors.NotFound(f"{what} weights not found{where}. {how}")
