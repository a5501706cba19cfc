"""Building blocks shared by MobileNetV2 and EfficientNet-Lite.

Only ops that TF.js runs after `jax2tf.convert(enable_xla=False)`: convolution,
depthwise convolution (`feature_group_count`), batch norm, ReLU6 and add.
Convolutions use TF-style "SAME" padding (extra row/column at the bottom/right
for stride 2), which is what both reference implementations do, so imported
weights see the same pixels they were trained on.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def round_filters(filters: float, multiplier: float, divisor: int = 8) -> int:
  """Scales a channel count to a multiple of `divisor`, never >10% below target.

  The rounding both reference implementations use (Keras `_make_divisible`,
  TF EfficientNet `round_filters`); matching it keeps imported shapes equal.
  """
  scaled = filters * multiplier
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


# He-normal over fan-out, as in the TF EfficientNet and torchvision MobileNetV2
# references (not Flax's truncated LeCun default).
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def relu6(x):
  """min(max(x, 0), 6): quantisation-friendly ReLU used by both families."""
  return jnp.minimum(jnp.maximum(x, 0), 6)


def _depthwise_taps(x_padded, kernel_size, strides, out_hw):
  """(i, j, the input pixels that meet kernel tap (i, j) for every output pixel)."""
  n, _, _, c = x_padded.shape
  (ho, wo), (sh, sw) = out_hw, strides
  for i in range(kernel_size[0]):
    for j in range(kernel_size[1]):
      yield (
        i,
        j,
        lax.slice(
          x_padded,
          (0, i, j, 0),
          (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
          (1, sh, sw, 1),
        ),
      )


def _depthwise_grads_by_taps(x, kernel, dy, strides, pads):
  """Both depthwise-conv gradients as k*k shifted multiply-adds at output resolution.

  XLA:CPU lowers the transposed depthwise convolution to a generic loop nest: for
  a stride-2 layer the input gradient takes ~40x longer than this (1.05 s vs 26 ms
  for 16x80x80x96, jaxlib 0.6.2), and the whole EfficientNet-Lite0 step is 2.5x
  slower. The input gradient is computed per output phase (row, column mod
  stride) so nothing is written at input resolution more than once.
  """
  n, h, w, c = x.shape
  _, ho, wo, _ = dy.shape
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  (top, bottom), (left, right) = pads
  x_padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  d_kernel = jnp.stack(
    [
      jnp.sum(tap * dy, axis=(0, 1, 2), dtype=jnp.float32)
      for _, _, tap in _depthwise_taps(x_padded, (kh, kw), strides, (ho, wo))
    ]
  )
  d_kernel = d_kernel.reshape(kernel.shape).astype(kernel.dtype)
  # Padded input row r*sh + q*... : phase (r, s) collects the taps i = r mod sh, j = s mod sw.
  hq = -(-max(h + top + bottom, (ho - 1) * sh + kh) // sh)
  wq = -(-max(w + left + right, (wo - 1) * sw + kw) // sw)
  rows = []
  for r in range(sh):
    phases = []
    for s in range(sw):
      acc = jnp.zeros((n, hq, wq, c), dy.dtype)
      for i in range(r, kh, sh):
        for j in range(s, kw, sw):
          a, b = (i - r) // sh, (j - s) // sw
          acc += jnp.pad(dy * kernel[i, j, 0], ((0, 0), (a, hq - ho - a), (b, wq - wo - b), (0, 0)))
      phases.append(acc)
    rows.append(jnp.stack(phases, axis=3))
  dx_padded = jnp.stack(rows, axis=2).reshape(n, hq * sh, wq * sw, c)
  return dx_padded[:, top : top + h, left : left + w], d_kernel


def _depthwise_conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(
    x,
    kernel,
    strides,
    pads,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv_fast_grad(x, kernel, strides, pads):
  return _depthwise_conv(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
  return _depthwise_conv(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, dy):
  x, kernel = residuals

  def generic(x, kernel, dy):
    return jax.vjp(lambda x, k: _depthwise_conv(x, k, strides, pads), x, kernel)[1](dy)

  def by_taps(x, kernel, dy):
    return _depthwise_grads_by_taps(x, kernel, dy, strides, pads)

  return lax.platform_dependent(x, kernel, dy, cpu=by_taps, default=generic)


_depthwise_conv_fast_grad.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """`lax.conv_general_dilated` for NHWC depthwise convs, with a fast CPU gradient.

  Plugged into `nn.Conv(conv_general_dilated=...)`: the forward pass (and so the
  exported graph) is the plain convolution; only the backward pass differs, on CPU.
  """
  del dimension_numbers, precision  # NHWC/HWIO, as nn.Conv passes for 2-D inputs
  if (lhs_dilation or rhs_dilation) and set((lhs_dilation or ()) + (rhs_dilation or ())) != {1}:
    raise ValueError("depthwise_conv_general_dilated supports no dilation")
  if feature_group_count != lhs.shape[-1] or rhs.shape[2] != 1:
    raise ValueError("depthwise_conv_general_dilated needs feature_group_count == input channels")
  strides = tuple(window_strides)
  pads = (
    lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    if isinstance(padding, str)
    else padding
  )
  return _depthwise_conv_fast_grad(lhs, rhs, strides, tuple(tuple(p) for p in pads))


class ConvBN(nn.Module):
  """Conv (no bias) → batch norm → optional ReLU6; depthwise when `depthwise`."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  depthwise: bool = False
  activation: bool = True
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      strides=(self.strides, self.strides),
      padding="SAME",
      use_bias=False,
      feature_group_count=x.shape[-1] if self.depthwise else 1,
      conv_general_dilated=depthwise_conv_general_dilated if self.depthwise else None,
      kernel_init=CONV_INIT,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      name="bn",
    )(x)
    return relu6(x) if self.activation else x


class InvertedResidual(nn.Module):
  """MBConv: 1x1 expand → kxk depthwise → 1x1 linear project (+ skip).

  The skip (and its stochastic-depth drop, `drop_path_rate`, which needs the
  "dropout" rng in training) exists only when stride is 1 and widths match.
  """

  features: int
  expand_ratio: int
  kernel_size: int = 3
  strides: int = 1
  drop_path_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv_bn = functools.partial(
      ConvBN, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype
    )
    in_features = x.shape[-1]
    y = x
    if self.expand_ratio != 1:
      y = conv_bn(features=in_features * self.expand_ratio, name="expand")(y, train)
    y = conv_bn(
      features=y.shape[-1],
      kernel_size=self.kernel_size,
      strides=self.strides,
      depthwise=True,
      name="depthwise",
    )(y, train)
    y = conv_bn(features=self.features, activation=False, name="project")(y, train)
    if self.strides == 1 and in_features == self.features:
      if self.drop_path_rate:
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
      y = y + x
    return y
