"""Model registry: configs name a model by string, code gets a Flax module.

Every model maps float32 NHWC images (ImageNet mean/std normalised) to float32
logits with `__call__(x, train: bool)`; batch norm lives in "batch_stats" and
dropout / stochastic depth need the "dropout" rng when `train=True`.
"""

import functools

import jax
import jax.numpy as jnp

from aplantida_jax.models import efficientnet_lite
from aplantida_jax.models import mobilenet_v2


def _lite(name, num_classes, **kwargs):
  width, depth, _, dropout = efficientnet_lite.VARIANTS[name]
  defaults = dict(width_coefficient=width, depth_coefficient=depth, dropout_rate=dropout)
  return efficientnet_lite.EfficientNetLite(num_classes, **{**defaults, **kwargs})


_BUILDERS = {
  "mobilenet_v2": lambda num_classes, **kw: mobilenet_v2.MobileNetV2(num_classes, **kw),
  **{name: functools.partial(_lite, name) for name in efficientnet_lite.VARIANTS},
}
MODELS = tuple(_BUILDERS)

# The resolution each model was designed (and pretrained) for.
DEFAULT_RESOLUTION = {
  "mobilenet_v2": 224,
  **{name: v[2] for name, v in efficientnet_lite.VARIANTS.items()},
}


def _check_name(name):
  if name not in _BUILDERS:
    raise ValueError(
      f"Unknown model {name!r} (config.model.name); choose one of {', '.join(MODELS)}."
    )


def get_model(name: str, num_classes: int, **kwargs):
  """The Flax module `name`; kwargs override its fields (width, head_dim, ...).

  `dtype` may be a string ("bfloat16") as it comes from a config.
  """
  _check_name(name)
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return _BUILDERS[name](num_classes, **kwargs)


def from_config(model_config):
  """The module a config's `model` section names (num_classes resolved, > 0)."""
  return get_model(
    model_config.name,
    model_config.num_classes,
    dtype=model_config.dtype,
    **model_config.kwargs.to_dict(),
  )


def default_resolution(name: str) -> int:
  _check_name(name)
  return DEFAULT_RESOLUTION[name]


def init_variables(model, rngs, image_size: int):
  """`model.init` on one image_size² RGB image, compiled at XLA optimisation level 0.

  Initialisation runs once, but its threefry draws (one stream per parameter) make
  the optimised compile slow (BUILD.md, "Compiling model.init"). The draws are the
  same; the float transforms of them may differ in the last bit (3e-8), and every run
  takes this same path, so a seed still fixes them.
  """
  init = jax.jit(functools.partial(model.init, train=False))
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  compiled = init.lower(rngs, image).compile(compiler_options={"xla_backend_optimization_level": 0})
  return compiled(rngs, image)
