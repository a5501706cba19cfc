"""Parameter counts and download sizes, from shapes alone (no training, no weights).

Answers "how big is the browser model with 9,000 species?" for any model
config: `jax.eval_shape` of `init` costs no FLOPs and no memory. Every
variable counts, batch-norm statistics included, so the estimate is a slight
upper bound on the shards: the converter folds part of batch norm into the
convolution kernels (about 6% less for a narrow MobileNetV2).
"""

import jax
import jax.numpy as jnp
import numpy as np

from aplantida_jax import models

BYTES = {"float16": 2, "uint16": 2, "uint8": 1, "": 4}


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def variable_counts(variables) -> dict:
  """{"params": n, "batch_stats": n, "total": n} of a variables dict or its shapes."""
  counts = {name: count(tree) for name, tree in variables.items()}
  return {**counts, "total": sum(counts.values())}


def weights_mb(num_values: int, quantize: str = "float16") -> float:
  """Weight bytes in MB (10^6) at the export's storage dtype."""
  return num_values * BYTES[quantize] / 1e6


def estimate(model_name: str, num_classes: int, quantize: str = "float16", **model_kwargs) -> dict:
  """Variable counts and weight MB of `model_name` with `num_classes`, from shapes only."""
  model = models.get_model(model_name, num_classes, **model_kwargs)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  counts = variable_counts(dict(shapes))
  head = count(shapes["params"]["head"])
  return {
    "num_classes": num_classes,
    **counts,
    "head_params": head,
    "mb": round(weights_mb(counts["total"], quantize), 2),
  }


def class_count_estimates(
  model_name: str,
  model_kwargs: dict,
  num_classes: int = 9000,
  head_dim: int = 256,
  quantize: str = "float16",
) -> dict:
  """The `num_classes` size with the model's own head and with a factorised one."""
  kwargs = {k: v for k, v in model_kwargs.items() if k != "head_dim"}
  return {
    "dense_head": estimate(model_name, num_classes, quantize, **kwargs),
    f"factorised_head_{head_dim}": estimate(
      model_name, num_classes, quantize, head_dim=head_dim, **kwargs
    ),
  }
