"""A 2-D convolution in the form each platform runs fastest: on CPU its kernel gradient is a
matrix product over input patches; on accelerators a strided one runs space-to-depth.

XLA:CPU computes a convolution's kernel gradient as another convolution, with the batch as
its feature dimension and the output's height x width as its window (27 x 27 for VGG-F's
conv2), which its convolution library runs at a fraction of the forward pass's speed. The
same gradient is `sum over (n, y, x) of patch(n, y, x)^T dY(n, y, x)`: one matrix product
per kernel tap over the strided input slice of that tap, or, for few input channels, one
product over all taps' patches stacked; the values agree to float32 rounding. The forward
pass and the input gradient stay XLA's. Timings of both forms: docs/performance.md.

On accelerators a strided convolution is computed as a stride-1 convolution over the
input rearranged space-to-depth (each s x s block of pixels becomes one pixel of s*s*C
channels, the kernel zero-padded to a multiple of s and rearranged alike), the form
TPU ResNet input layers use. VGG-F's conv1 (11x11/4 over 3 channels) is then a 3x3
convolution over 48 channels, which the GPU's matrix units take without padding the
channels. Values are the same up to summation order.

`Conv` keeps nn.Conv's parameters ('kernel' [kh, kw, Cin, Cout], 'bias'), so checkpoints
and converted weights load unchanged. impl "auto" is "patches" on CPU and
"space_to_depth" elsewhere; "xla" is the plain convolution everywhere. A test pins all
three to nn.Conv's values and gradients.
"""

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rshash_jax.models.backbones import common

_DN = ("NHWC", "HWIO", "NHWC")
_STACK_BELOW_CHANNELS = 32  # fewer input channels: one product over all taps' patches


def conv_impl(impl: str) -> str:
  """'auto' -> 'patches' on CPU, 'space_to_depth' on accelerators; or 'xla'."""
  return common.backend_impl(
    "conv", impl, cpu="patches", accelerator="space_to_depth", others=("xla",)
  )


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def conv_space_to_depth(x, kernel, strides, padding):
  """_conv(x, kernel, strides, padding) as a stride-1 VALID convolution over s x s blocks.

  Output pixel (y, x) reads padded input rows y*s .. y*s + kh - 1; with the kernel padded
  with zeros to bh*s rows (bh = ceil(kh / s)), those rows are blocks y .. y + bh - 1 of
  the input cut into s-row blocks: a bh x bw convolution over blocks of s*s*C channels.
  """
  sh, sw = strides
  if (sh, sw) == (1, 1):
    return _conv(x, kernel, strides, padding)
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  (pt, pb), (pl, pr) = padding
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  bh, bw = -(-kh // sh), -(-kw // sw)  # the kernel's extent in blocks
  hp, wp = (ho - 1 + bh) * sh, (wo - 1 + bw) * sw  # the padded input rows / columns read
  x = jnp.pad(x, ((0, 0), (pt, max(hp - pt - h, 0)), (pl, max(wp - pl - w, 0)), (0, 0)))[
    :, :hp, :wp
  ]
  x = x.reshape(b, hp // sh, sh, wp // sw, sw, cin).transpose(0, 1, 3, 2, 4, 5)
  k = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
  k = k.reshape(bh, sh, bw, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  return _conv(
    x.reshape(b, hp // sh, wp // sw, sh * sw * cin),
    k.reshape(bh, bw, sh * sw * cin, cout),
    (1, 1),
    ((0, 0), (0, 0)),
  )


def kernel_grad_by_patches(x, g, kernel_shape, strides, padding):
  """d(sum(g * conv(x, k))) / dk for NHWC x and HWIO k: matrix products over patches."""
  kh, kw, cin, cout = kernel_shape
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  b, ho, wo, _ = g.shape
  taps = [
    lax.slice(
      xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  g2 = g.reshape(-1, cout)
  if cin < _STACK_BELOW_CHANNELS:
    patches = jnp.stack(taps, axis=3).reshape(-1, kh * kw * cin)
    return (patches.T @ g2).reshape(kernel_shape)
  return jnp.stack([t.reshape(-1, cin).T @ g2 for t in taps]).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patches_grad(x, kernel, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], ...]):
  """lax.conv_general_dilated(NHWC, HWIO) with the kernel gradient of kernel_grad_by_patches."""
  return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, res, g):
  x, kernel = res
  _, input_vjp = jax.vjp(
    lambda x: _conv(x, kernel, strides, padding), x
  )  # dropped by XLA when unused
  dk = kernel_grad_by_patches(x, g, kernel.shape, strides, padding).astype(kernel.dtype)
  return input_vjp(g)[0], dk


conv_patches_grad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """nn.Conv(features, (k, k), (s, s), padding=((p, p), (p, p))) with a bias; see conv_impl."""

  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  dtype: Any = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features)
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    strides, padding = (self.stride, self.stride), ((self.pad, self.pad), (self.pad, self.pad))
    impl = conv_impl(self.impl)
    if impl == "patches":
      y = conv_patches_grad(x, kernel, strides, padding)
    elif impl == "space_to_depth":
      y = conv_space_to_depth(x, kernel, strides, padding)
    else:
      y = _conv(x, kernel, strides, padding)
    return y + bias.astype(self.dtype)
