"""EfficientNet-Lite0..4 (TF `efficientnet/lite`), the teacher family.

Lite differs from EfficientNet-B*: no squeeze-excite, ReLU6 instead of swish,
and the stem (32) and top (1280) widths plus the first and last stage depths
are not scaled. Block `block{N}` is block N of the flattened list, the same
index as `_blocks.N` in the efficientnet_pytorch weights that
`models/pretrained.py` imports.
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aplantida_jax.models import blocks
from aplantida_jax.models import heads

# (repeats, kernel, stride, expand ratio, output channels) of Lite0.
STAGES = (
  (1, 3, 1, 1, 16),
  (2, 3, 2, 6, 24),
  (2, 5, 2, 6, 40),
  (3, 3, 2, 6, 80),
  (3, 5, 1, 6, 112),
  (4, 5, 2, 6, 192),
  (1, 3, 1, 6, 320),
)

# name → (width coefficient, depth coefficient, resolution, dropout rate)
VARIANTS = {
  "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
  "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
  "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
  "efficientnet_lite3": (1.2, 1.4, 280, 0.3),
  "efficientnet_lite4": (1.4, 1.8, 300, 0.3),
}


def stage_plan(width_coefficient: float, depth_coefficient: float):
  """[(features, expand, kernel, stride)] per block, with Lite's fixed ends."""
  plan = []
  for index, (repeats, kernel, stride, expand, channels) in enumerate(STAGES):
    if 0 < index < len(STAGES) - 1:
      repeats = int(math.ceil(depth_coefficient * repeats))
    features = blocks.round_filters(channels, width_coefficient)
    plan += [(features, expand, kernel, stride if i == 0 else 1) for i in range(repeats)]
  return plan


class EfficientNetLite(nn.Module):
  num_classes: int
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2
  drop_path_rate: float = 0.2  # stochastic depth, grows linearly with depth
  head_dim: int = 0  # see heads.ClassifierHead
  bn_momentum: float = 0.99  # the TF reference
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  @nn.compact
  def __call__(self, x, train: bool):
    norm = dict(bn_momentum=self.bn_momentum, bn_epsilon=1e-3, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = blocks.ConvBN(32, kernel_size=3, strides=2, name="stem", **norm)(x, train)
    plan = stage_plan(self.width_coefficient, self.depth_coefficient)
    for index, (features, expand, kernel, stride) in enumerate(plan):
      x = blocks.InvertedResidual(
        features,
        expand,
        kernel_size=kernel,
        strides=stride,
        drop_path_rate=self.drop_path_rate * index / len(plan),
        name=f"block{index}",
        **norm,
      )(x, train)
    x = blocks.ConvBN(1280, name="top", **norm)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return heads.ClassifierHead(
      self.num_classes, self.head_dim, self.dropout_rate, self.dtype, name="head"
    )(x, train)
