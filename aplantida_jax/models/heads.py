"""Classifier head: pooled features → (dropout) → logits, optionally low-rank.

With thousands of species a dense 1280×9000 head alone holds 11.5M parameters
(more than the backbone); `head_dim=d` factorises it into features → d →
classes (a linear low-rank product, no extra op types for TF.js). Models put
it under the name "head", so `params["head"]` is the whole subtree to replace
when the class count changes.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class ClassifierHead(nn.Module):
  num_classes: int
  head_dim: int = 0  # 0 = one dense layer; d > 0 = features → d → classes
  dropout_rate: float = 0.0  # needs the "dropout" rng when train=True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool):
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    if self.head_dim:
      x = nn.Dense(self.head_dim, dtype=self.dtype, name="bottleneck")(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)  # losses and softmax stay in float32
