"""MobileNetV2 (Sandler et al. 2018), the browser student.

Layout and rounding follow Keras `applications.MobileNetV2`: stem 32·α,
inverted residual stages (t, c, n, s) below, 1280 top features (scaled only
when α > 1), global mean pool, classifier head.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aplantida_jax.models import blocks
from aplantida_jax.models import heads

# (expand ratio t, output channels c, repeats n, first stride s)
STAGES = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
  num_classes: int
  width: float = 1.0  # the width multiplier α
  dropout_rate: float = 0.2
  head_dim: int = 0  # see heads.ClassifierHead
  bn_momentum: float = 0.9  # Flax examples/imagenet; 0.99 suits long runs
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = dict(bn_momentum=self.bn_momentum, bn_epsilon=1e-3, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = blocks.ConvBN(
      blocks.round_filters(32, self.width), kernel_size=3, strides=2, name="stem", **norm
    )(x, train)
    index = 0
    for expand_ratio, channels, repeats, stride in STAGES:
      for i in range(repeats):
        x = blocks.InvertedResidual(
          blocks.round_filters(channels, self.width),
          expand_ratio,
          strides=stride if i == 0 else 1,
          name=f"block{index}",
          **norm,
        )(x, train)
        index += 1
    top_features = blocks.round_filters(1280, max(self.width, 1.0))
    x = blocks.ConvBN(top_features, name="top", **norm)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return heads.ClassifierHead(
      self.num_classes, self.head_dim, self.dropout_rate, self.dtype, name="head"
    )(x, train)
