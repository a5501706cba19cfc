"""TF.js export: end to end from an orbax checkpoint, op check, sizes, Node parity."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf
from jax.experimental import jax2tf

from aplantida_jax import fileio
from aplantida_jax.export import convert
from aplantida_jax.export import opcheck
from aplantida_jax.export import parity
from aplantida_jax.export import serving
from aplantida_jax.export import sizes
from aplantida_jax.export import stage
from aplantida_jax.models import preprocess
from configs import export_tfjs as export_config
from tests import tfjs_fixture


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tfjs_fixture.tiny_export(tmp_path_factory.getbasetemp())


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_export_writes_the_pwa_folder(workdir):
  tfjs_dir = os.path.join(workdir, "tfjs")
  meta = _json(os.path.join(tfjs_dir, "metadata.json"))
  for name in meta["files"] + ["labels.json", "MODEL_CARD.md", "attributions.csv", "parity.json"]:
    assert os.path.exists(os.path.join(tfjs_dir, name)), name
  assert not os.path.exists(tfjs_dir + ".partial")
  assert meta["input"]["shape"] == [1, tfjs_fixture.IMAGE_SIZE, tfjs_fixture.IMAGE_SIZE, 3]
  assert (
    meta["temperature"] == tfjs_fixture.TEMPERATURE and meta["threshold"] == tfjs_fixture.THRESHOLD
  )
  assert meta["num_classes"] == tfjs_fixture.NUM_CLASSES and meta["weights_dtype"] == "float16"
  assert meta["dataset"]["manifest_sha256"] and len(meta["model"]["sha256"]) == 64
  classes = _json(os.path.join(workdir, "dataset", "classes.json"))
  assert [label["species"] for label in _json(os.path.join(tfjs_dir, "labels.json"))] == [
    c["species"] for c in classes
  ]
  card = open(os.path.join(tfjs_dir, "MODEL_CARD.md")).read()
  assert "attributions.csv" in card and f"T = {tfjs_fixture.TEMPERATURE:.4f}" in card
  # Every weight is stored as FP16.
  manifest = _json(os.path.join(tfjs_dir, "model.json"))["weightsManifest"]
  assert all(
    w.get("quantization", {}).get("dtype") == "float16"
    for g in manifest
    for w in g["weights"]
    if w["dtype"] == "float32"
  )


def test_saved_model_matches_jax(workdir):
  """The SavedModel (float32, a deliverable itself) computes the JAX serving function."""
  images = parity.split_images(
    os.path.join(workdir, "dataset"), "val", 4, tfjs_fixture.IMAGE_SIZE, 0.875
  )
  expected = tfjs_fixture.jax_probabilities(workdir, images)
  signature = tf.saved_model.load(os.path.join(workdir, "tfjs", "saved_model")).signatures[
    "serving_default"
  ]
  got = np.concatenate(
    [signature(image=tf.constant(image[None]))[serving.OUTPUT_NAME].numpy() for image in images]
  )
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_exports_the_calibrated_checkpoint(workdir):
  e = export_config.get_config().export
  student = os.path.join(workdir, tfjs_fixture.STUDENT)
  assert stage._checkpoint_dir(e, workdir) == student
  assert stage._calibration(workdir, student, 0.5)["temperature"] == tfjs_fixture.TEMPERATURE
  # A temperature fitted for another checkpoint is not applied to this one.
  other = stage._calibration(workdir, os.path.join(workdir, "teacher_global"), 0.5)
  assert other == {
    "temperature": 1.0,
    "threshold": 0.5,
    "source": None,
    "region_prior": None,
    "rollup": None,
  }
  with pytest.raises(FileNotFoundError, match="no trained stage"):
    stage._checkpoint_dir(e, workdir, checkpoint=os.path.join(workdir, "eval"))
  # The region prior fitted with that calibration ships beside the model, named in metadata.json.
  tfjs_dir = os.path.join(workdir, "tfjs")
  assert fileio.read_json(os.path.join(tfjs_dir, "metadata.json"))["region_prior"] == (
    "region_prior.json"
  )
  assert fileio.read_json(os.path.join(tfjs_dir, "region_prior.json")) == tfjs_fixture.REGION_PRIOR
  assert fileio.read_json(os.path.join(tfjs_dir, "metadata.json"))["rollup"] == tfjs_fixture.ROLLUP


def test_export_passes_its_own_op_check(workdir):
  tfjs_dir = os.path.join(workdir, "tfjs")
  ops = opcheck.check_tfjs(os.path.join(tfjs_dir, "model.json"))
  # Batch norm folded and ReLU6 fused: every convolution is one fused op, as in Keras models.
  assert (
    ops["_FusedConv2D"] + ops["FusedDepthwiseConv2dNative"] == 52
  )  # MobileNetV2's 52 convolutions
  assert not {"Conv2D", "DepthwiseConv2dNative", "Minimum"} & set(ops)
  opcheck.check_saved_model(os.path.join(tfjs_dir, "saved_model"))
  with pytest.raises(opcheck.OpCheckError, match="over export.max_mb"):
    opcheck.check_size(tfjs_dir, max_mb=0.01)


def test_allow_list_is_what_tfjs_executes():
  assert opcheck.TFJS_OPS <= opcheck.tfjs_supported_ops()
  assert not set(opcheck.FORBIDDEN) & opcheck.TFJS_OPS


def test_op_check_rejects_control_flow(tmp_path):
  """tf.cond: StatelessIf in the SavedModel, Switch/Merge once converted; both rejected."""
  module = tf.Module()
  module.f = tf.function(
    lambda x: {"y": tf.cond(tf.reduce_sum(x) > 0, lambda: x * 2.0, lambda: x - 1.0)},
    input_signature=[tf.TensorSpec([1, 4], tf.float32)],
  )
  saved = str(tmp_path / "saved_model")
  tf.saved_model.save(module, saved, signatures={"serving_default": module.f})
  with pytest.raises(opcheck.OpCheckError, match="If"):
    opcheck.check_saved_model(saved)
  convert.saved_model_to_tfjs(saved, str(tmp_path / "tfjs"))
  with pytest.raises(opcheck.OpCheckError, match="Merge|Switch"):
    opcheck.check_tfjs(str(tmp_path / "tfjs" / "model.json"))


@pytest.mark.parametrize(
  "flags, bad_op",
  [
    (dict(enable_xla=False, with_gradient=False), "PreventGradient"),
    (dict(enable_xla=True, with_gradient=True), "Xla"),
  ],
)
def test_op_check_rejects_wrong_jax2tf_flags(tmp_path, flags, bad_op):
  kernel = np.ones((3, 3, 3, 2), np.float32)

  def f(x):
    return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  converted = jax2tf.convert(f, native_serialization=False, **flags)
  module = tf.Module()
  module.f = tf.function(
    lambda x: {"y": converted(x)},
    autograph=False,
    input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)],
  )
  saved = str(tmp_path / "saved_model")
  tf.saved_model.save(module, saved, signatures={"serving_default": module.f})
  with pytest.raises(opcheck.OpCheckError, match=bad_op):
    opcheck.check_saved_model(saved)


def test_fused_biases_become_rank_one(tmp_path):
  """A constant [1,1,1,C] bias is relabelled [C]; an activation "bias" is split off."""

  def fused(name, x, bias, fused_ops):
    import base64  # pylint: disable=g-import-not-at-top

    return {
      "name": name,
      "op": "_FusedConv2D",
      "input": [x, "w", bias],
      "attr": {
        "T": {"type": "DT_FLOAT"},
        "num_args": {"i": "1"},
        "fused_ops": {"list": {"s": [base64.b64encode(o.encode()).decode() for o in fused_ops]}},
        "strides": {"list": {"i": ["1", "1", "1", "1"]}},
        "padding": {"s": "U0FNRQ=="},
      },
    }

  model = {
    "modelTopology": {
      "node": [
        {"name": "x", "op": "Placeholder"},
        {"name": "w", "op": "Const"},
        {"name": "b", "op": "Const"},
        fused("conv1", "x", "b", ["BiasAdd", "Relu6"]),
        fused("conv2", "conv1", "x", ["BiasAdd", "Relu6"]),
        {"name": "out", "op": "Identity", "input": ["conv2"]},
      ]
    },
    "weightsManifest": [
      {
        "paths": [],
        "weights": [
          {"name": "w", "shape": [1, 1, 3, 3], "dtype": "float32"},
          {"name": "b", "shape": [1, 1, 1, 3], "dtype": "float32"},
        ],
      }
    ],
  }
  path = str(tmp_path / "model.json")
  with open(path, "w") as f:
    json.dump(model, f)
  assert convert.fix_fused_biases(path) == {"reshaped": 1, "split": 1}
  fixed = _json(path)
  assert fixed["weightsManifest"][0]["weights"][1]["shape"] == [3]
  ops = {n["name"]: (n["op"], n.get("input")) for n in fixed["modelTopology"]["node"]}
  assert ops["conv1"][0] == "_FusedConv2D"
  assert ops["conv2/unfused"] == ("Conv2D", ["conv1", "w"])
  assert ops["conv2/add"] == ("AddV2", ["conv2/unfused", "x"])
  assert ops["conv2"] == ("Relu6", ["conv2/add"])  # keeps the name its consumers use
  assert ops["out"][1] == ["conv2"]


def test_sizes(workdir):
  _, variables = tfjs_fixture.load_student(workdir)
  estimate = sizes.estimate("mobilenet_v2", tfjs_fixture.NUM_CLASSES, **tfjs_fixture.MODEL_KWARGS)
  assert estimate["total"] == sizes.variable_counts(variables)["total"]
  # The estimate is an upper bound of the shards (batch norm partly folds into kernels).
  shards_mb = opcheck.folder_mb(os.path.join(workdir, "tfjs"))
  assert 0.7 * estimate["mb"] < shards_mb <= estimate["mb"] + 0.2
  big = sizes.class_count_estimates("mobilenet_v2", {"width": 1.0}, 9000, 256)
  dense, factorised = big["dense_head"], big["factorised_head_256"]
  assert dense["head_params"] == 1280 * 9000 + 9000
  assert factorised["head_params"] == 1280 * 256 + 256 + 256 * 9000 + 9000
  assert factorised["mb"] < dense["mb"]


@pytest.mark.skipif(
  parity.node_missing_reason() is not None, reason=str(parity.node_missing_reason())
)
def test_node_parity(workdir):
  """TF.js (FP16 weights, cpu and wasm backends in Node) agrees with JAX on val images."""
  images = parity.split_images(
    os.path.join(workdir, "dataset"), "val", 16, tfjs_fixture.IMAGE_SIZE, 0.875
  )
  expected = tfjs_fixture.jax_probabilities(workdir, images)
  assert expected.argmax(-1).tolist() != [expected.argmax(-1)[0]] * len(images)  # input matters
  result = parity.report(expected, parity.tfjs_probabilities(os.path.join(workdir, "tfjs"), images))
  for backend in parity.BACKENDS:
    got = result["backends"][backend]
    assert got["top1_agreement"] >= 0.99 and got["max_abs_diff"] <= 0.02, (backend, got)
  assert result["passed"]
  written = _json(os.path.join(workdir, "tfjs", "parity.json"))  # the stage's own check
  assert written["passed"] and set(written["backends"]) == set(parity.BACKENDS)
  for got in written["backends"].values():
    assert {"top1_agreement", "top1_agreement_raw", "n_decided", "max_abs_diff"} <= set(got)
  # The stage checked 8 val images (tfjs_fixture): it reports each side's accuracy on them.
  labels = parity.split_labels(os.path.join(workdir, "dataset"), "val", 8)
  shipped = parity.split_images(
    os.path.join(workdir, "dataset"), "val", 8, tfjs_fixture.IMAGE_SIZE, 0.875
  )
  assert len(labels) == len(shipped) == 8
  assert written["jax_top1_accuracy"] == pytest.approx(
    np.mean(tfjs_fixture.jax_probabilities(workdir, shipped).argmax(-1) == labels)
  )
  cpu = parity.tfjs_probabilities(os.path.join(workdir, "tfjs"), shipped, ("cpu",))["cpu"]
  assert written["backends"]["cpu"]["top1_accuracy"] == pytest.approx(
    np.mean(cpu["probabilities"].argmax(-1) == labels)
  )


def test_margin_aware_parity_passes_a_near_uniform_model_with_rounding_flips():
  """FP16-sized noise on near-tied probabilities flips argmaxes; that is not a mismatch."""
  rng = np.random.default_rng(0)
  reference = 1 / 20 + rng.normal(0, 1e-4, (64, 20))  # an unsure model: 20 near-ties
  reference /= reference.sum(-1, keepdims=True)
  candidate = reference + rng.normal(0, 3e-5, reference.shape)
  got = parity.compare(reference, candidate)
  assert got["top1_agreement_raw"] < 0.99  # raw agreement would fail it ...
  assert got["n_decided"] == 0 and got["top1_agreement"] == 1.0 and got["max_abs_diff"] < 1e-3
  report = parity.report(reference, {"cpu": {"probabilities": candidate, "median_ms": 1.0}})
  assert report["passed"]  # ... the margin-aware check does not
  flipped = reference.copy()  # a decided image whose answer flips is still a mismatch
  flipped[0] = 0.0
  flipped[0, :2] = (0.9, 0.1)
  swapped = flipped.copy()
  swapped[0, :2] = (0.1, 0.9)
  assert not parity.report(flipped, {"cpu": {"probabilities": swapped, "median_ms": 1.0}})["passed"]


@pytest.mark.skipif(
  parity.node_missing_reason() is not None, reason=str(parity.node_missing_reason())
)
def test_parity_fails_when_tfjs_sees_wrongly_normalised_input(workdir):
  """Real TF.js fed the ImageNet-normalised pixels instead of 0-255 RGB: the check must fail."""
  images = parity.split_images(
    os.path.join(workdir, "dataset"), "val", 8, tfjs_fixture.IMAGE_SIZE, 0.875
  )
  expected = tfjs_fixture.jax_probabilities(workdir, images)
  wrong = (
    (images / 255 - np.asarray(preprocess.IMAGENET_MEAN)) / np.asarray(preprocess.IMAGENET_STD)
  ).astype(np.float32)
  result = parity.report(
    expected, parity.tfjs_probabilities(os.path.join(workdir, "tfjs"), wrong, ("cpu",))
  )
  assert not result["passed"], result
  assert result["backends"]["cpu"]["max_abs_diff"] > parity.TARGET["max_abs_diff"]


def test_a_failed_export_keeps_the_previous_tfjs_folder(workdir, tmp_path):
  """The size check fails after jax2tf and TF.js conversion: the shipped folder is untouched."""
  copy = str(tmp_path / "w")
  shutil.copytree(workdir, copy)
  tfjs_dir = os.path.join(copy, "tfjs")
  before = {
    os.path.relpath(os.path.join(d, f), tfjs_dir): open(os.path.join(d, f), "rb").read()
    for d, _, files in os.walk(tfjs_dir)
    for f in files
  }
  config = export_config.get_config()
  config.export.max_mb = 0.001
  config.export.parity_images = 0
  with pytest.raises(opcheck.OpCheckError, match="MB"):
    stage.run(config, copy)
  after = {
    os.path.relpath(os.path.join(d, f), tfjs_dir): open(os.path.join(d, f), "rb").read()
    for d, _, files in os.walk(tfjs_dir)
    for f in files
  }
  assert after == before and "model.json" in after


@pytest.mark.parametrize("side", ["tfjs", "jax"])
def test_non_finite_probabilities_never_pass_parity(side):
  reference = np.full((4, 3), 1 / 3) + np.eye(4, 3) * 0.5
  reference /= reference.sum(-1, keepdims=True)
  candidate = reference.copy()
  (candidate if side == "tfjs" else reference)[1] = np.nan
  report = parity.report(reference, {"cpu": {"probabilities": candidate, "median_ms": 1.0}})
  assert not report["passed"]
  assert not np.isfinite(report["backends"]["cpu"]["max_abs_diff"])
