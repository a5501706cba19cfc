"""The function the browser runs: RGB pixels in 0–255 → calibrated probabilities.

The page hands over what `tf.browser.fromPixels` gives after a resize and a
cast, so everything else the model needs (ImageNet mean/std, eval-mode batch
norm, the fitted temperature, softmax) lives inside the graph: the JS side
stays a resize and one `predict` call, and the JAX parity check runs exactly
this function.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from aplantida_jax.models import blocks
from aplantida_jax.models import preprocess

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


def _affine(bn_params, bn_stats, epsilon, use_scale=True, use_bias=True):
  """Eval-mode batch norm as `x * a + b` with per-channel (rank-1) a and b."""
  a = jax.lax.rsqrt(bn_stats["var"] + epsilon)
  if use_scale:
    a = a * bn_params["scale"]
  b = -bn_stats["mean"] * a + (bn_params["bias"] if use_bias else 0.0)
  return a, b


def _fold_batch_norm(next_fun, args, kwargs, context):
  """Method interceptor: eval-mode batch norm folded for the browser graph.

  Flax computes `(x - mean) * scale * rsqrt(var + eps) + bias` with [1,1,1,C]
  operands: three elementwise ops per layer in TF.js, and the converter's
  batch-norm folding only knows TF's FusedBatchNorm. Here, in a conv → BN
  pair (`models.blocks.ConvBN`), the scale goes into the kernel and the BN is
  only `+ b`, which the converter fuses into the convolution as its bias (as
  Keras models get); any other BN becomes one multiply-add.
  """
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  paired = isinstance(module.parent, blocks.ConvBN)
  if isinstance(module, nn.Conv) and paired and not module.use_bias:
    parent = module.parent.variables
    a, _ = _affine(parent["params"]["bn"], parent["batch_stats"]["bn"], module.parent.bn_epsilon)
    kernel = module.variables["params"]["kernel"] * a
    return module.clone(parent=None).apply({"params": {"kernel": kernel}}, *args, **kwargs)
  if isinstance(module, nn.BatchNorm):
    use_running_average = nn.merge_param(
      "use_running_average", module.use_running_average, kwargs.get("use_running_average")
    )
    if use_running_average and module.axis == -1 and kwargs.get("mask") is None:
      a, b = _affine(
        module.variables.get("params", {}),
        module.variables["batch_stats"],
        module.epsilon,
        module.use_scale,
        module.use_bias,
      )
      x = args[0]
      y = x + b.astype(x.dtype) if paired else x * a.astype(x.dtype) + b.astype(x.dtype)
      return y.astype(module.dtype or x.dtype)
  return next_fun(*args, **kwargs)


def serving_fn(model, temperature: float = 1.0):
  """`(variables, images [B,H,W,3] float32 0–255) → softmax(logits / T)`.

  Normalisation is the training pipeline's `(x/255 - mean)/std` folded into
  one subtract and one multiply; batch norm is one multiply-add per layer
  (`_fold_batch_norm`). The model computes in float32 whatever dtype it
  trained in: TF.js has no bfloat16.
  """
  if getattr(model, "dtype", None) is not None:
    model = model.clone(dtype=jnp.float32)
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature} (eval/calibration.json)")
  mean = preprocess.MEAN_255
  inv_std = 1.0 / preprocess.STD_255
  inv_temperature = np.float32(1.0 / temperature)

  def serve(variables, images):
    with nn.intercept_methods(_fold_batch_norm):
      logits = model.apply(variables, (images - mean) * inv_std, train=False)
    return jax.nn.softmax(logits * inv_temperature, axis=-1)

  return serve


def to_tf_module(serve, variables, image_size: int) -> tf.Module:
  """jax2tf conversion into a tf.Module ready for `tf.saved_model.save`.

  The flags are the ones TF.js can execute (DESIGN.md, "Pinned stack"):
  plain TF ops (enable_xla=False, non-native serialization); weights as
  tf.Variables so they are stored once, not inlined per call, and frozen to
  constants by the TF.js converter; with_gradient=True because otherwise
  jax2tf wraps outputs in PreventGradient, which the converter rejects; a
  static batch of 1 because a polymorphic batch adds shape assertions that
  become Switch/Merge and force `executeAsync` in the browser.
  """
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  weights = [
    tf.Variable(np.asarray(leaf), trainable=False, name=f"w{i}") for i, leaf in enumerate(leaves)
  ]

  def serve_flat(flat_weights, images):
    return serve(jax.tree_util.tree_unflatten(treedef, flat_weights), images)

  converted = jax2tf.convert(
    serve_flat, enable_xla=False, native_serialization=False, with_gradient=True
  )
  module = tf.Module()
  module.weights = weights

  @tf.function(
    autograph=False,
    input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name=INPUT_NAME)],
  )
  def serving_default(images):
    return {OUTPUT_NAME: converted(weights, images)}

  module.serving_default = serving_default
  return module


def jax_probabilities(serve, variables, images) -> np.ndarray:
  """The reference for parity: `serve` in JAX on a batch of images (float32 0–255)."""
  return np.asarray(jax.jit(serve)(variables, jnp.asarray(images, jnp.float32)))
