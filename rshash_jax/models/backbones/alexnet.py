"""AlexNet as in torchvision (the DHCNN PyTorch demo's and MrHash's backbone), Flax linen.

features: conv 11x11/4 64 pad 2 -> ReLU -> maxpool 3/2 -> conv 5x5 192 pad 2 -> ReLU ->
maxpool 3/2 -> conv 3x3 384 -> ReLU -> conv 3x3 256 -> ReLU -> conv 3x3 256 -> ReLU ->
maxpool 3/2 -> adaptive average pool 6x6; classifier: dropout -> fc6 4096 -> ReLU ->
dropout -> fc7 4096 -> ReLU -> fc8. The hashing feature is relu7 (4096-d).

Weights: torchvision's `alexnet-owt-7be5be79.pth` (zip-format torch file), read without
torch; fc6 is permuted from torch's CHW flattening to our HWC flattening.
"""

import os
from typing import Any, Dict, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rshash_jax.models.backbones import common, torch_pickle

FEATURE_DIM = 4096
# flax name -> torchvision name
_TORCH_NAMES = {
  "conv1": "features.0",
  "conv2": "features.3",
  "conv3": "features.6",
  "conv4": "features.8",
  "conv5": "features.10",
  "fc6": "classifier.1",
  "fc7": "classifier.4",
  "fc8": "classifier.6",
}
_PROVENANCE = (
  "Download torchvision's alexnet-owt-7be5be79.pth "
  "(https://download.pytorch.org/models/alexnet-owt-7be5be79.pth) and pass its "
  "path as weights_path."
)


def preprocessing() -> common.Preprocessing:
  return common.Preprocessing(
    size=224,
    mean=tuple(255 * m for m in common.IMAGENET_MEAN_RGB_01),
    std=tuple(255 * s for s in common.IMAGENET_STD_RGB_01),
  )


def adaptive_avg_pool(x, out: int):
  """torch.nn.AdaptiveAvgPool2d on NHWC with static shapes."""
  h, w = x.shape[1:3]
  if (h, w) == (out, out):
    return x
  rows = []
  for i in range(out):
    r0, r1 = (i * h) // out, -(-((i + 1) * h) // out)
    cols = []
    for j in range(out):
      c0, c1 = (j * w) // out, -(-((j + 1) * w) // out)
      cols.append(jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


class AlexNet(nn.Module):
  """Returns {'features': relu7 [B, 4096], 'logits': [B, num_classes]}."""

  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding="VALID")
    conv = lambda f, k, s, p, name: nn.Conv(
      f, (k, k), (s, s), padding=((p, p), (p, p)), dtype=self.dtype, name=name
    )
    x = pool(nn.relu(conv(64, 11, 4, 2, "conv1")(x)))
    x = pool(nn.relu(conv(192, 5, 1, 2, "conv2")(x)))
    x = nn.relu(conv(384, 3, 1, 1, "conv3")(x))
    x = nn.relu(conv(256, 3, 1, 1, "conv4")(x))
    x = pool(nn.relu(conv(256, 3, 1, 1, "conv5")(x)))
    x = adaptive_avg_pool(x, 6).reshape(x.shape[0], -1)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc6")(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    features = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc7")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(features)
    return {"features": features, "logits": logits}


def convert_state_dict(state: Dict[str, np.ndarray], source: str = "state dict") -> Dict[str, Any]:
  """torchvision AlexNet state dict -> Flax variables {'params': ...}."""
  shapes = common.param_shapes(AlexNet(), 224)
  flat = {}
  for ours, theirs in _TORCH_NAMES.items():
    w, b = state.get(f"{theirs}.weight"), state.get(f"{theirs}.bias")
    if w is not None:
      w = np.asarray(w)
      if w.ndim == 4:  # OIHW -> HWIO
        w = w.transpose(2, 3, 1, 0)
      elif ours == "fc6" and w.shape == (4096, 256 * 36):  # CHW-flattened -> HWC-flattened
        w = w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(36 * 256, 4096)
      else:
        w = w.T
      flat[f"params/{ours}/kernel"] = w
    if b is not None:
      flat[f"params/{ours}/bias"] = b
  known = {f"{t}.{p}" for t in _TORCH_NAMES.values() for p in ("weight", "bias")}
  flat.update(
    {f"(torch) {k}": v for k, v in state.items() if k not in known}
  )  # reported as unexpected
  return common.unflatten(common.check_and_assign(shapes, flat, source))


def load_weights(path: Optional[str]) -> Dict[str, Any]:
  """Loads torchvision's AlexNet .pth (zip or legacy format) as Flax variables."""
  if path is None:
    raise common.missing_weights_error("AlexNet ImageNet", _PROVENANCE)
  if not os.path.isfile(path):
    raise common.missing_weights_error("AlexNet ImageNet", _PROVENANCE, os.fspath(path))
  return convert_state_dict(torch_pickle.load_state_dict(path), source=os.fspath(path))
