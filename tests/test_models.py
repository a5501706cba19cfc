"""Models: registry, shapes, batch-norm modes, bf16, head size, TF.js-safe export."""

import glob
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aplantida_jax import models
from aplantida_jax.models import blocks
from aplantida_jax.models import heads

# Tiny variants: the same code paths at a fraction of the compute.
TINY = {
  "mobilenet_v2": dict(width=0.35),
  **{name: dict(width_coefficient=0.25) for name in models.MODELS if name != "mobilenet_v2"},
}


def _param_count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _abstract_variables(model, res, batch=2):
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, res, res, 3)), train=False)
  )


def random_variables(model, res, seed=0):
  """Concrete variables with the model's shapes, filled by numpy.

  `model.init` takes minutes to compile on a loaded 2-core CPU (one threefry
  stream per parameter); these tests are about the forward pass, not the
  initialiser, so shapes come from eval_shape and values from numpy.
  """
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.normal(size=leaf.shape)
    if name in ("scale", "var"):
      value = 1 + 0.1 * np.abs(noise)
    elif name == "kernel":
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = 0.1 * noise
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, res))


def test_registry_lists_models_and_rejects_unknown_names():
  assert set(models.MODELS) == {"mobilenet_v2"} | {f"efficientnet_lite{i}" for i in range(5)}
  assert [models.default_resolution(f"efficientnet_lite{i}") for i in range(5)] == [
    224,
    240,
    260,
    280,
    300,
  ]
  with pytest.raises(ValueError, match="efficientnet_lite0"):
    models.get_model("resnet50", num_classes=3)


@pytest.mark.parametrize("name", models.MODELS)
def test_full_size_models_have_published_sizes_and_logit_shapes(name):
  """Param counts of the published architectures (Keras / TF lite README)."""
  published_millions = {
    "mobilenet_v2": 3.5,
    "efficientnet_lite0": 4.7,
    "efficientnet_lite1": 5.4,
    "efficientnet_lite2": 6.1,
    "efficientnet_lite3": 8.2,
    "efficientnet_lite4": 13.0,
  }
  model = models.get_model(name, num_classes=1000)
  logits, variables = jax.eval_shape(
    lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)), train=False)
  )
  assert round(_param_count(variables["params"]) / 1e6, 1) == (published_millions[name])
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32


def test_mobilenet_v2_trainable_count_equals_keras():
  model = models.get_model("mobilenet_v2", num_classes=1000)
  # keras.applications.MobileNetV2(weights=None): 3,504,872 trainable params.
  assert _param_count(_abstract_variables(model, 224)["params"]) == 3_504_872


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_train_mode_updates_batch_stats_and_eval_mode_uses_them(name):
  model = models.get_model(name, num_classes=5, **TINY[name])
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  # Same first image, different companions.
  other = x.at[1:].set(jax.random.normal(jax.random.PRNGKey(3), (3, 32, 32, 3)))
  variables = random_variables(model, 32)
  evaluate = jax.jit(lambda x: model.apply(variables, x, train=False))
  train = jax.jit(
    lambda x: model.apply(
      variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(2)}
    )
  )

  logits, updates = train(x)
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))
  # Train: normalised with batch statistics, so the batch changes the output.
  assert not np.allclose(logits[0], train(other)[0][0], atol=1e-4)
  # Eval: running statistics, so each image's logits ignore the rest.
  np.testing.assert_allclose(evaluate(x)[0], evaluate(other)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  f32 = models.get_model("mobilenet_v2", num_classes=7, width=0.35)
  bf16 = models.get_model("mobilenet_v2", num_classes=7, width=0.35, dtype="bfloat16")
  variables = random_variables(f32, 32)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_abstract_variables(bf16, 32)))

  def forward(model):
    return jax.jit(lambda v: model.apply(v, x, train=False))

  jaxpr = str(jax.make_jaxpr(forward(bf16))(variables))
  assert "conv_general_dilated" in jaxpr and "bf16[2,16,16" in jaxpr
  logits = forward(bf16)(variables)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, forward(f32)(variables), atol=0.15, rtol=0.1)


def test_factorised_head_is_much_smaller_than_dense_for_9000_classes():
  features = jnp.zeros((1, 1280))

  def head_params(head_dim):
    head = heads.ClassifierHead(9000, head_dim=head_dim)
    return _param_count(
      jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), features, train=False))
    )

  assert head_params(0) == 1280 * 9000 + 9000  # 11.5M
  assert head_params(256) == (1280 * 256 + 256) + (256 * 9000 + 9000)
  assert head_params(256) < head_params(0) / 4


def test_head_is_one_replaceable_subtree():
  model = models.get_model("efficientnet_lite0", num_classes=9000, head_dim=256)
  params = _abstract_variables(model, 32)["params"]
  assert set(params["head"]) == {"bottleneck", "logits"}
  assert params["head"]["logits"]["kernel"].shape == (256, 9000)
  backbone = {k: v for k, v in params.items() if k != "head"}
  other = _abstract_variables(models.get_model("efficientnet_lite0", num_classes=12), 32)["params"]
  assert jax.tree.map(lambda a: a.shape, backbone) == jax.tree.map(
    lambda a: a.shape, {k: v for k, v in other.items() if k != "head"}
  )


def _tfjs_op_names():
  """The TF ops the TF.js converter accepts (its op_list/*.json)."""
  # Found, not imported: importing tensorflowjs pulls in its Keras converters.
  spec = importlib.util.find_spec("tensorflowjs")
  package_dir = spec.submodule_search_locations[0]
  names = set()
  for path in glob.glob(os.path.join(package_dir, "op_list", "*.json")):
    with open(path) as f:
      names |= {op["tfOpName"] for op in json.load(f)}
  return names


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_jax2tf_without_xla_gives_plain_tfjs_ops_and_same_logits(name):
  tf = pytest.importorskip("tensorflow")
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  model = models.get_model(name, num_classes=10, **TINY[name])
  # 33 px: odd sizes exercise the asymmetric TF-style SAME padding.
  x = np.random.RandomState(0).normal(size=(2, 33, 33, 3)).astype(np.float32)
  # Non-trivial running statistics, so eval-mode batch norm is really tested.
  variables = random_variables(model, 33)

  tf_variables = tf.nest.map_structure(tf.Variable, variables)
  forward = jax2tf.convert(
    lambda v, x: model.apply(v, x, train=False),
    enable_xla=False,
    native_serialization=False,
    with_gradient=True,
  )
  function = tf.function(
    lambda x: forward(tf_variables, x),
    autograph=False,
    input_signature=[tf.TensorSpec(x.shape, tf.float32)],
  )
  np.testing.assert_allclose(
    function(x).numpy(),
    jax.jit(model.apply, static_argnames="train")(variables, x, train=False),
    rtol=1e-4,
    atol=1e-4,
  )

  graph_ops = {op.type for op in function.get_concrete_function().graph.get_operations()}
  assert not {op for op in graph_ops if op.startswith("Xla")}
  variable_ops = {"ReadVariableOp", "VarHandleOp"}  # frozen to Const on export
  assert graph_ops - variable_ops <= _tfjs_op_names(), graph_ops - variable_ops - _tfjs_op_names()


@pytest.mark.parametrize(
  "shape,kernel_size,stride",
  [
    ((2, 9, 9, 8), 3, 1),
    ((2, 9, 9, 8), 3, 2),
    ((2, 8, 8, 8), 3, 2),
    ((2, 11, 7, 16), 5, 2),
    ((1, 6, 6, 4), 5, 1),
    ((1, 3, 3, 4), 5, 2),
  ],
)
def test_depthwise_conv_cpu_gradient_equals_xla_transpose(shape, kernel_size, stride):
  """The tap-by-tap CPU gradient is the lax convolution's own gradient, for odd sizes too."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, shape[-1])), jnp.float32)

  def lax_conv(x, k):
    return jax.lax.conv_general_dilated(
      x,
      k,
      (stride, stride),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=shape[-1],
    )

  def ours(x, k):
    return blocks.depthwise_conv_general_dilated(
      x, k, (stride, stride), "SAME", feature_group_count=shape[-1]
    )

  np.testing.assert_array_equal(ours(x, kernel), lax_conv(x, kernel))
  dy = jnp.asarray(rng.normal(size=lax_conv(x, kernel).shape), jnp.float32)
  want = jax.vjp(lax_conv, x, kernel)[1](dy)
  got = jax.jit(lambda x, k, dy: jax.vjp(ours, x, k)[1](dy))(x, kernel, dy)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_rejects_what_it_does_not_compute():
  x, k = jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 1, 3))
  with pytest.raises(ValueError, match="dilation"):
    blocks.depthwise_conv_general_dilated(
      x, k, (1, 1), "SAME", rhs_dilation=(2, 2), feature_group_count=3
    )
  with pytest.raises(ValueError, match="feature_group_count"):
    blocks.depthwise_conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=1)
