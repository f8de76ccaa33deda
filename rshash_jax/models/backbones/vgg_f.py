"""VGG-F / CNN-F (Chatfield et al. 2014) exactly as MatConvNet's `imagenet-vgg-f.mat`.

conv1 11x11/4 64 -> ReLU -> LRN -> maxpool 3x3/2 (pad bottom/right 1)
conv2 5x5/1 256 pad 2 -> ReLU -> LRN -> maxpool 3x3/2 (pad bottom/right 1)
conv3..5 3x3 256 pad 1 -> ReLU -> maxpool 3x3/2 (pad bottom/right 1)
fc6 (6x6 conv) 4096 -> ReLU -> fc7 4096 -> ReLU -> fc8 1000.
No dropout (the MatConvNet model has none). The hashing feature is relu7 (4096-d), the
DHCNN paper's choice. LRN is MatConvNet's `vl_nnnormalize`:
y = x / (kappa + alpha * sum_{depth window} x^2)^beta, parameters read from the file.

Weights: users bring `imagenet-vgg-f.mat` (227 MB, MatConvNet model zoo); kernels are
stored HWIO float32, the mean image in `normalization.averageImage` (or
`meta.normalization` in newer files). Input: RGB 0-255 minus the mean image, 224x224.
"""

import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rshash_jax import errors
from rshash_jax.untrusted import mat as safe_mat
from rshash_jax.models.backbones import common, conv

FEATURE_DIM = 4096
_CONVS = (
  ("conv1", 11, 4, 0, 64),
  ("conv2", 5, 1, 2, 256),
  ("conv3", 3, 1, 1, 256),
  ("conv4", 3, 1, 1, 256),
  ("conv5", 3, 1, 1, 256),
)
DEFAULT_LRN = (5.0, 2.0, 1e-4, 0.75)  # MatConvNet (depth, kappa, alpha, beta) of vgg-f
# Per-channel average of the vgg-f mean image, used when no .mat is given (random init).
DEFAULT_MEAN_RGB = (122.80, 114.88, 101.57)
_PROVENANCE = (
  "Download imagenet-vgg-f.mat from the MatConvNet model zoo "
  "(https://www.vlfeat.org/matconvnet/models/imagenet-vgg-f.mat) and pass its path "
  "as weights_path."
)


def preprocessing(mean: Any = DEFAULT_MEAN_RGB) -> common.Preprocessing:
  return common.Preprocessing(size=224, mean=mean)


def _channel_window_sum(a, lo: int, hi: int):
  """out[..., c] = sum of a[..., c - lo : c + hi + 1] (zero outside the channels)."""
  c = a.shape[-1]
  padded = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(lo, hi)])
  return sum(padded[..., i : i + c] for i in range(lo + hi + 1))


def _lrn_denominator(x32, depth: float, kappa: float, alpha: float):
  d = int(depth)
  return kappa + alpha * _channel_window_sum(jnp.square(x32), (d - 1) // 2, d // 2)


def lrn_impl(impl: str) -> str:
  """'auto' -> 'written' (the written-out gradient) on CPU, 'autodiff' on accelerators."""
  return common.backend_impl("lrn", impl, cpu="written", accelerator="autodiff")


def lrn(x, depth: float, kappa: float, alpha: float, beta: float, impl: str = "auto"):
  """MatConvNet cross-channel normalisation (window of `depth` channels, centred):
  y_c = x_c / D_c^beta, D_c = kappa + alpha * sum over the window of x^2, in float32.

  impl "written" has the gradient written out: dx_j = g_j / D_j^beta - 2 alpha beta x_j *
  (sum over the channels c whose window holds j of g_c y_c / D_c), D recomputed from x.
  On XLA:CPU autodiff of the forward kept several float32 intermediates per element and
  ran pow twice, so the CPU uses the written form; XLA:GPU fuses the autodiff form well,
  so accelerators keep "autodiff" (timings: docs/performance.md). A test pins both to the
  same values and gradients.
  """
  if lrn_impl(impl) == "written":
    return _lrn_written(x, depth, kappa, alpha, beta)
  return _lrn_plain(x, depth, kappa, alpha, beta)


def _lrn_plain(x, depth, kappa, alpha, beta):
  x32 = x.astype(jnp.float32)
  return (x32 / _lrn_denominator(x32, depth, kappa, alpha) ** beta).astype(x.dtype)


_lrn_written = jax.custom_vjp(_lrn_plain, nondiff_argnums=(1, 2, 3, 4))


def _lrn_fwd(x, depth, kappa, alpha, beta):
  return _lrn_plain(x, depth, kappa, alpha, beta), x


def _lrn_bwd(depth, kappa, alpha, beta, x, g):
  d = int(depth)
  x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
  den = _lrn_denominator(x32, depth, kappa, alpha)
  inv = den**-beta
  t = g32 * x32 * inv / den  # g_c y_c / D_c
  dx = g32 * inv - (2 * alpha * beta) * x32 * _channel_window_sum(t, d // 2, (d - 1) // 2)
  return (dx.astype(x.dtype),)


_lrn_written.defvjp(_lrn_fwd, _lrn_bwd)


def _pool(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding=((0, 1), (0, 1)))


class _FullyConnected(nn.Module):
  """A VALID convolution whose kernel covers the whole input (fc6: 6x6, fc7: 1x1) as the
  matrix product it is; params 'kernel' [H, W, Cin, Cout] and 'bias' as nn.Conv's, so the
  MatConvNet weights load unchanged. XLA:CPU runs the product faster than the convolution."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [B, H, W, C] (the kernel's window) or [B, C] (a 1x1 window) -> [B, features]."""
    window = x.shape[1:] if x.ndim == 4 else (1, 1, x.shape[-1])
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*window, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    y = x.reshape(x.shape[0], -1).astype(self.dtype) @ kernel.reshape(-1, self.features).astype(
      self.dtype
    )
    return y + bias.astype(self.dtype)


class VGGF(nn.Module):
  """Returns {'features': relu7 [B, 4096], 'logits': [B, num_classes]}."""

  num_classes: int = 1000
  lrn_params: Sequence[float] = DEFAULT_LRN
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # conv.conv_impl: how each platform computes it, not what
  lrn_impl: str = "auto"  # lrn_impl: the LRN gradient's form, likewise

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout in VGG-F
    x = x.astype(self.dtype)
    for name, k, s, p, f in _CONVS:
      x = nn.relu(conv.Conv(f, k, s, p, dtype=self.dtype, impl=self.conv_impl, name=name)(x))
      if name in ("conv1", "conv2"):
        x = lrn(x, *self.lrn_params, impl=self.lrn_impl)
      if name in ("conv1", "conv2", "conv5"):
        x = _pool(x)
    x = nn.relu(_FullyConnected(4096, dtype=self.dtype, name="fc6")(x))
    features = nn.relu(_FullyConnected(4096, dtype=self.dtype, name="fc7")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(features)
    return {"features": features, "logits": logits}


def _layer_prefixes(flat: Dict[str, np.ndarray]) -> Sequence[str]:
  """'layers/0', 'layers/1', ... in order (or 'layers' for a file of one layer)."""
  idx = sorted({int(k.split("/")[1]) for k in flat if re.match(r"layers/\d+/", k)})
  if idx:
    return [f"layers/{i}" for i in idx]
  return ["layers"] if any(k.startswith("layers/") for k in flat) else []


def _str(flat, key) -> Optional[str]:
  v = flat.get(key)
  return str(v) if v is not None and v.dtype.kind == "U" else None


def read_mat(path: str) -> Tuple[Dict[str, Any], Tuple[float, ...], np.ndarray]:
  """Reads a MatConvNet simplenn .mat: ({layer: [kernel, bias]}, lrn params, mean image).
  The file is parsed in a child process (rshash_jax.untrusted.mat): scipy's parser can crash on
  a malformed file."""
  flat = safe_mat.load_mat(path)
  prefixes = _layer_prefixes(flat)
  if not prefixes:
    raise errors.InvalidInput(f"{path}: no 'layers' variable; not a MatConvNet simplenn model")
  mean = flat.get("normalization/averageImage", flat.get("meta/normalization/averageImage"))
  if mean is None:
    raise errors.InvalidInput(f"{path}: no normalization.averageImage (mean image)")
  weights, lrn_params = {}, None
  for p in prefixes:
    kind, name = _str(flat, f"{p}/type"), _str(flat, f"{p}/name")
    if kind == "conv":
      pair = [flat.get(f"{p}/weights/0"), flat.get(f"{p}/weights/1")]
      if pair[0] is None:  # old files keep filters/biases as separate fields
        pair = [flat.get(f"{p}/filters"), flat.get(f"{p}/biases")]
      if any(a is None or a.dtype.kind not in "fiu" for a in pair) or name is None:
        raise errors.InvalidInput(f"{path}: conv layer {name!r} without numeric weights")
      weights[name] = [np.asarray(pair[0], np.float32), np.asarray(pair[1], np.float32).reshape(-1)]
    elif kind in ("normalize", "lrn") and lrn_params is None:
      param = flat.get(f"{p}/param")
      if param is None or param.dtype.kind not in "fiu" or param.size != 4:
        raise errors.InvalidInput(f"{path}: LRN layer {name!r} without its 4 parameters")
      lrn_params = tuple(float(v) for v in param.reshape(-1))
  if mean.dtype.kind not in "fiu":
    raise errors.InvalidInput(f"{path}: normalization.averageImage is not numeric")
  mean = np.asarray(mean, np.float32)
  if mean.ndim == 1:
    if mean.size != 3:
      raise errors.InvalidInput(f"{path}: averageImage of {mean.size} values, not 3 or [H, W, 3]")
    mean = mean.reshape(3)
  return weights, lrn_params or DEFAULT_LRN, mean


def convert(weights: Dict[str, Any], source: str = "weights") -> Dict[str, Any]:
  """{layer: [kernel HWIO (fc8 as 1x1xIxO), bias]} -> Flax variables {'params': ...}."""
  shapes = common.param_shapes(VGGF(), 224)
  flat = {}
  for name, (kernel, bias) in weights.items():
    kernel = np.asarray(kernel)
    want = shapes.get(f"params/{name}/kernel")
    # 1x1 convs (fc7, fc8) lose their unit dims to loadmat(squeeze_me); fc8 is our Dense.
    if (
      want is not None
      and kernel.shape != want
      and kernel.size == int(np.prod(want))
      and kernel.shape[-2:] == want[-2:]
    ):
      kernel = kernel.reshape(want)
    flat[f"params/{name}/kernel"], flat[f"params/{name}/bias"] = kernel, bias
  return common.unflatten(common.check_and_assign(shapes, flat, source))


def load_weights(
  path: Optional[str],
) -> Tuple[Dict[str, Any], common.Preprocessing, Tuple[float, ...]]:
  """Loads imagenet-vgg-f.mat: (Flax variables, preprocessing with its mean image, LRN params)."""
  if path is None:
    raise common.missing_weights_error("VGG-F ImageNet", _PROVENANCE)
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise common.missing_weights_error("VGG-F ImageNet", _PROVENANCE, path)
  weights, lrn_params, mean = read_mat(path)
  return convert(weights, source=path), preprocessing(mean), lrn_params
