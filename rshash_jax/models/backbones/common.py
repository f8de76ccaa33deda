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
  `channels` > 3 (data.bands=all): R, G, B first, then the other bands; those take the
  average of the R, G, B means and standard deviations (`with_channels`).
  """

  size: int
  mean: Any = (0.0, 0.0, 0.0)
  std: Any = (1.0, 1.0, 1.0)
  scale: float = 1.0
  bgr: bool = False
  channels: int = 3

  def with_channels(self, channels: int) -> "Preprocessing":
    """This preprocessing for images of `channels` bands, R, G, B first (see the class)."""
    if channels == self.channels:
      return self
    if self.channels != 3 or channels < 3:
      raise errors.InvalidInput(
        f"cannot adapt a {self.channels}-channel preprocessing to {channels} channels"
      )

    def extend(v):
      v = np.asarray(v, np.float32)
      v = np.broadcast_to(v, v.shape[:-1] + (3,)) if v.ndim else np.full((3,), v, np.float32)
      return np.concatenate(
        [v, np.repeat(v.mean(axis=-1, keepdims=True), channels - 3, axis=-1)], axis=-1
      )

    return dataclasses.replace(
      self, mean=extend(self.mean), std=extend(self.std), channels=int(channels)
    )

  def __call__(self, images, dtype=jnp.float32):
    """images: uint8/float [B, size, size, C] RGB (then other bands) in [0, 255] -> normalised
    model input."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-3:] != (self.size, self.size, self.channels):
      raise errors.InvalidInput(
        f"expected images [..., {self.size}, {self.size}, {self.channels}], got {x.shape}"
      )
    if self.bgr:
      x = (
        jnp.concatenate([x[..., 2::-1], x[..., 3:]], axis=-1) if self.channels > 3 else x[..., ::-1]
      )
    mean = jnp.asarray(self.mean, jnp.float32)
    if mean.ndim == 3 and mean.shape[:2] != (self.size, self.size):
      mean = jax.image.resize(mean, (self.size, self.size, mean.shape[-1]), "bilinear")
    return ((x * self.scale - mean) / jnp.asarray(self.std, jnp.float32)).astype(dtype)

  def to_config(self) -> Dict[str, Any]:
    """JSON-friendly form (a mean image is stored as its per-channel average)."""
    mean = np.asarray(self.mean, np.float64)
    if mean.ndim == 3:
      mean = mean.mean(axis=(0, 1))
    return dict(
      size=self.size,
      mean=mean.tolist(),
      std=np.asarray(self.std).tolist(),
      scale=self.scale,
      bgr=self.bgr,
      channels=self.channels,
    )


def backend_impl(
  what: str, impl: str, cpu: str, accelerator: str, others: Tuple[str, ...] = ()
) -> str:
  """Resolves a layer's implementation choice: one of ("auto", cpu, accelerator, *others);
  "auto" is `cpu` on the CPU backend and `accelerator` elsewhere. The choices compute the
  same function (tests pin them to each other); only their speed differs by platform."""
  impls = ("auto", cpu, accelerator, *others)
  if impl not in impls:
    raise ValueError(f"{what} impl must be one of {impls}, got {impl!r}")
  if impl == "auto":
    return cpu if jax.default_backend() == "cpu" else accelerator
  return impl


def _head(items, n: int = 8, sep: str = ", ") -> str:
  return sep.join(items[:n]) + (f"{sep}... ({len(items) - n} more)" if len(items) > n else "")


def check_and_assign(
  expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, np.ndarray], source: str
) -> Dict[str, np.ndarray]:
  """Checks that `found` has exactly the `expected` names and shapes.

  Raises ValueError naming every missing, unexpected and mis-shaped entry of `source`.
  """
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  bad = [
    f"{k}: expected {tuple(expected[k])}, found {tuple(np.shape(found[k]))}"
    for k in sorted(set(expected) & set(found))
    if tuple(np.shape(found[k])) != tuple(expected[k])
  ]
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


def param_shapes(module, size: int, channels: int = 3) -> Dict[str, Tuple[int, ...]]:
  """Flat {name: shape} of `module`'s params for a [1, size, size, channels] input."""
  shapes = jax.eval_shape(
    lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))
  )
  return {k: tuple(v.shape) for k, v in flatten(shapes).items()}


def missing_weights_error(what: str, how: str, path: Optional[str] = None) -> errors.NotFound:
  where = f" at {path}" if path else ""
  return errors.NotFound(f"{what} weights not found{where}. {how}")
