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
import jax.numpy as jnp


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
        self.features, (self.kernel_size, self.kernel_size),
        strides=(self.strides, self.strides), padding="SAME", use_bias=False,
        feature_group_count=x.shape[-1] if self.depthwise else 1,
        kernel_init=CONV_INIT, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)
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
        ConvBN, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
        dtype=self.dtype)
    in_features = x.shape[-1]
    y = x
    if self.expand_ratio != 1:
      y = conv_bn(features=in_features * self.expand_ratio, name="expand")(
          y, train)
    y = conv_bn(features=y.shape[-1], kernel_size=self.kernel_size,
                strides=self.strides, depthwise=True, name="depthwise")(y, train)
    y = conv_bn(features=self.features, activation=False, name="project")(
        y, train)
    if self.strides == 1 and in_features == self.features:
      if self.drop_path_rate:
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3),
                       deterministic=not train)(y)
      y = y + x
    return y
