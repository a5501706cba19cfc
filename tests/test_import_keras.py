"""Keras applications.MobileNetV2 files import into our Flax MobileNetV2.

No download: the files are real Keras MobileNetV2s with random weights (batch
norm statistics too), written as the ImageNet download is (a tf-keras weights
.h5 with the download's name) or as saved models (.keras, .h5), and read back
by the importer's Keras. The reference is Keras itself on `x / 127.5 - 1`
input; the import gets the pipeline's mean/std input.

The stem caveat, measured here: Keras' stride-2 convolutions pad like ours
(SAME: for even sizes one zero row/column at the bottom/right; the depthwise
blocks' ZeroPadding2D(correct_pad) is the same padding), but the zeros mean
pixel 127.5 to Keras and the ImageNet mean colour after folding. Only the
stem's bottom row and right column see it; exact parity is checked on stems
whose bottom/right taps are zero, the border effect on a full random stem.
"""

import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax.models import blocks
from aplantida_jax.models import preprocess
from aplantida_jax.models import pretrained
from tests import test_models

ARCH = "mobilenet_v2"
DOWNLOAD_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{}_{}{}.h5"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "import_pretrained.py")
pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")


def _randomise(model, rng):
  """He-scaled kernels, batch norms with random scale, shift, mean and var."""
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    if len(weights) == 4:  # gamma, beta, moving mean, moving variance
      new = [
        rng.uniform(0.5, 1.5, weights[0].shape),
        rng.normal(0, 0.2, weights[1].shape),
        rng.normal(0, 0.2, weights[2].shape),
        rng.uniform(0.5, 2.0, weights[3].shape),
      ]
    elif layer.name == "predictions":
      kernel, bias = weights
      new = [
        rng.normal(0, 4 / np.sqrt(kernel.shape[0]), kernel.shape),
        rng.normal(0, 0.5, bias.shape),
      ]
    else:  # conv (H, W, I, O) or depthwise (H, W, C, 1): fan-in H·W·I or H·W
      (kernel,) = weights
      fan_in = np.prod(kernel.shape[:2]) * (1 if kernel.shape[3] == 1 else kernel.shape[2])
      new = [rng.normal(0, np.sqrt(2 / fan_in), kernel.shape)]
    layer.set_weights([w.astype(np.float32) for w in new])


def _zero_stem_border_taps(model):
  """Stem taps that meet the bottom/right padding → 0, so the fold is exact."""
  (kernel,) = model.get_layer("Conv1").get_weights()
  kernel[2, :] = 0
  kernel[:, 2] = 0
  model.get_layer("Conv1").set_weights([kernel])


def _pixels(n, res, seed):
  return np.random.RandomState(seed).uniform(0, 255, (n, res, res, 3)).astype(np.float32)


def _keras_input(pixels):
  return pixels / 127.5 - 1


def _pipeline_input(pixels):
  mean, std = np.float32(preprocess.IMAGENET_MEAN), np.float32(preprocess.IMAGENET_STD)
  return (pixels / 255 - mean) / std


def _flax_logits(variables, x, width):
  model = models.get_model(
    ARCH, variables["params"]["head"]["logits"]["bias"].shape[0], width=width
  )
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


@pytest.fixture(scope="module")
def download_224(tmp_path_factory):
  """α 1.0, 224 px, 1000 classes, saved as the ImageNet download: two stems.

  Yields {"exact"/"border": (import dir, weight file, Keras logits, Keras stem)}
  with the 4 test images; "exact" has the stem's bottom/right taps zeroed.
  """
  keras_model = tf_keras.applications.MobileNetV2(weights=None, classifier_activation=None)
  _randomise(keras_model, np.random.RandomState(0))
  stem = tf_keras.Model(keras_model.input, keras_model.get_layer("Conv1_relu").output)
  pixels = _pixels(4, 224, seed=1)
  out = {}
  for case in ("border", "exact"):
    if case == "exact":
      _zero_stem_border_taps(keras_model)
    folder = tmp_path_factory.mktemp(case)
    weight_file = str(folder / DOWNLOAD_NAME.format("1.0", 224, ""))
    keras_model.save_weights(weight_file)
    pretrained.import_keras_weights(ARCH, weight_file, str(folder / "import"))
    out[case] = (
      folder / "import",
      weight_file,
      keras_model(_keras_input(pixels), training=False).numpy(),
      stem(_keras_input(pixels), training=False).numpy(),
    )
  return out, pixels


def test_weights_download_matches_keras_logits_on_mean_std_input(download_224):
  cases, pixels = download_224
  directory, _, keras_logits, _ = cases["exact"]
  variables, _ = pretrained.load_pretrained(str(directory))
  logits = _flax_logits(variables, _pipeline_input(pixels), width=1.0)
  delta = np.abs(logits - keras_logits).max()
  print(
    f"\nα 1.0, 224 px, bottom/right stem taps 0: max |Δ logits| {delta:.1e} "
    f"(logits std {keras_logits.std():.2f})"
  )
  assert delta <= 1e-4
  assert (logits.argmax(1) == keras_logits.argmax(1)).all()


def test_folded_stem_differs_from_keras_only_on_the_padded_border(download_224):
  """Even input: padding is bottom/right only, as in Keras; the rest is exact."""
  cases, pixels = download_224
  directory, _, keras_logits, keras_stem = cases["border"]
  variables, _ = pretrained.load_pretrained(str(directory))
  x = _pipeline_input(pixels)
  stem = blocks.ConvBN(32, kernel_size=3, strides=2, bn_epsilon=1e-3).apply(
    {"params": variables["params"]["stem"], "batch_stats": variables["batch_stats"]["stem"]},
    x,
    train=False,
  )
  delta = np.abs(np.asarray(stem) - keras_stem)
  border = max(delta[:, -1].max(), delta[:, :, -1].max())
  logits_delta = np.abs(_flax_logits(variables, x, width=1.0) - keras_logits).max()
  print(
    f"\nfull random stem: interior max |Δ| {delta[:, :-1, :-1].max():.1e}, "
    f"bottom/right border {border:.3f}; logits max |Δ| {logits_delta:.2f} "
    f"(logits std {keras_logits.std():.2f})"
  )
  assert delta[:, :-1, :-1].max() <= 1e-5
  assert border > 1e-2  # the fold's known, documented border effect
  assert logits_delta > 1e-4  # beyond the parity tolerance: why that test zeroes those taps


def test_provenance_records_source_sha256_license_and_width(download_224):
  cases, _ = download_224
  directory, weight_file, _, _ = cases["exact"]
  variables, provenance = pretrained.load_pretrained(str(directory))
  assert provenance["source"] == os.path.basename(weight_file)
  assert provenance["weight_sha256"] == fileio.sha256_file(weight_file)
  assert provenance["license"] == "Apache-2.0"
  assert (provenance["arch"], provenance["width"]) == (ARCH, 1.0)
  assert (provenance["num_classes"], provenance["resolution"]) == (1000, 224)
  assert set(provenance["converter"]) == {"tensorflow", "keras", "jax", "flax"}
  assert variables["params"]["head"]["logits"]["kernel"].shape == (1280, 1000)


def test_merge_onto_12_classes_keeps_every_backbone_leaf_and_replaces_head(download_224):
  cases, _ = download_224
  imported, _ = pretrained.load_pretrained(str(cases["exact"][0]))
  model = models.get_model(ARCH, num_classes=12)
  init = test_models.random_variables(model, 224)
  merged, skipped = pretrained.merge_pretrained(init, imported)

  assert sorted(skipped) == ["params/head/logits/bias", "params/head/logits/kernel"]
  flat_merged = flax.traverse_util.flatten_dict(flax.core.unfreeze(merged))
  flat_imported = flax.traverse_util.flatten_dict(imported)
  assert set(flat_merged) == set(flat_imported)
  for path, value in flat_merged.items():
    if path[1] == "head":
      assert value.shape == {"kernel": (1280, 12), "bias": (12,)}[path[-1]]
    else:
      np.testing.assert_array_equal(value, flat_imported[path], err_msg="/".join(path))


def test_saved_model_without_top_imports_backbone_with_its_width(tmp_path):
  """Keras 3 .keras, α 0.35, include_top=False: no head, width from the model name.

  At 100 px block 6's stride-2 depthwise sees 25×25: odd sizes pad like Keras
  too (one row/column each side).
  """
  keras_model = tf.keras.applications.MobileNetV2(
    input_shape=(100, 100, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
  )
  _randomise(keras_model, np.random.RandomState(2))
  _zero_stem_border_taps(keras_model)
  path = str(tmp_path / "backbone.keras")
  keras_model.save(path)
  provenance = pretrained.import_keras_weights(ARCH, path, str(tmp_path / "import"))
  imported, _ = pretrained.load_pretrained(str(tmp_path / "import"))
  assert (provenance["width"], provenance["num_classes"], provenance["resolution"]) == (
    0.35,
    0,
    100,
  )
  assert "head" not in imported["params"]

  model = models.get_model(ARCH, num_classes=12, width=0.35)
  init = test_models.random_variables(model, 100)
  merged, skipped = pretrained.merge_pretrained(init, imported)
  assert sorted(skipped) == ["params/head/logits/bias", "params/head/logits/kernel"]
  pixels = _pixels(2, 100, seed=3)
  _, state = model.apply(
    merged,
    _pipeline_input(pixels),
    train=False,
    capture_intermediates=lambda module, _: module.name == "top",
  )
  features = np.asarray(state["intermediates"]["top"]["__call__"][0]).mean(axis=(1, 2))
  keras_features = keras_model(_keras_input(pixels), training=False).numpy()
  delta = np.abs(features - keras_features).max()
  print(f"\nα 0.35, 100 px, no top: max |Δ pooled features| {delta:.1e}")
  assert delta <= 1e-4


@pytest.fixture(scope="module")
def keras2_small(tmp_path_factory):
  """tf-keras α 0.35, 96 px, no top: a weights download and a saved .h5 model."""
  keras_model = tf_keras.applications.MobileNetV2(
    input_shape=(96, 96, 3), alpha=0.35, include_top=False, weights=None
  )
  _randomise(keras_model, np.random.RandomState(4))
  folder = tmp_path_factory.mktemp("keras2")
  weights = folder / DOWNLOAD_NAME.format("0.35", 96, "_no_top")
  keras_model.save_weights(str(weights))
  saved = folder / "model.h5"
  keras_model.save(str(saved))
  return weights, saved


def test_keras2_saved_model_and_weights_download_import_alike(keras2_small, tmp_path):
  """The .h5 model (read by tf-keras) and weights (read by tf.keras) give one tree."""
  weights, saved = keras2_small
  from_weights = pretrained.import_keras_weights(ARCH, str(weights), str(tmp_path / "w"))
  from_model = pretrained.import_keras_weights(ARCH, str(saved), str(tmp_path / "m"))
  assert from_model["converter"]["keras"] == tf_keras.__version__
  assert from_weights["converter"]["keras"] == tf.keras.__version__
  for provenance in (from_weights, from_model):
    assert (provenance["width"], provenance["num_classes"], provenance["resolution"]) == (
      0.35,
      0,
      96,
    )
  a, _ = pretrained.load_pretrained(str(tmp_path / "w"))
  b, _ = pretrained.load_pretrained(str(tmp_path / "m"))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_file_of_another_width_is_refused(keras2_small, tmp_path):
  weights, saved = keras2_small
  with pytest.raises(ValueError, match=r"width 0\.5 .*--width"):
    pretrained.import_keras_weights(ARCH, str(weights), str(tmp_path / "import"), width=0.5)
  with pytest.raises(ValueError, match=r"do not fit the Flax model .*'width': 0\.5"):
    pretrained.import_keras_weights(ARCH, str(saved), str(tmp_path / "import"), width=0.5)
  unnamed = tmp_path / "weights.h5"
  unnamed.write_bytes(weights.read_bytes())
  with pytest.raises(ValueError, match="Cannot tell the width.*--width"):
    pretrained.import_keras_weights(ARCH, str(unnamed), str(tmp_path / "import"))
  assert not (tmp_path / "import").exists()


@pytest.mark.parametrize(
  "saved_as, message",
  [("model", "not a keras.applications.MobileNetV2"), ("weights", "no layer Conv1")],
)
def test_file_of_another_architecture_is_refused(tmp_path, saved_as, message):
  """A tf-keras MobileNet (v1), saved with its architecture or as weights."""
  keras_model = tf_keras.applications.MobileNet(input_shape=(128, 128, 3), alpha=0.25, weights=None)
  path = str(tmp_path / "mobilenet_v1.h5")
  if saved_as == "model":
    keras_model.save(path)
  else:
    keras_model.save_weights(path)
  with pytest.raises(ValueError, match=message):
    pretrained.import_keras_weights(ARCH, path, str(tmp_path / "import"), width=0.25)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--arch", "mobilenet_v2"], "--arch mobilenet_v2 needs --keras FILE"),
    (
      ["--arch", "efficientnet_lite0", "--keras", "x.h5"],
      "--keras/--width/--trained-on are for --arch mobilenet_v2 only",
    ),
  ],
)
def test_cli_asks_for_keras_file_only_for_mobilenet_v2(tmp_path, args, message):
  result = subprocess.run(
    [sys.executable, TOOL, *args, "--out", str(tmp_path)],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode != 0
  assert result.stderr.startswith(f"import_pretrained: {message}")
  assert len(result.stderr.strip().splitlines()) == 1


def test_cli_imports_a_keras_weights_download(keras2_small, tmp_path):
  weights, _ = keras2_small
  result = subprocess.run(
    [
      sys.executable,
      TOOL,
      "--arch",
      "mobilenet_v2",
      "--keras",
      str(weights),
      "--out",
      str(tmp_path / "import"),
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  printed = json.loads(result.stdout)
  assert printed == pretrained.load_pretrained(str(tmp_path / "import"))[1]
  assert (printed["width"], printed["source"]) == (0.35, weights.name)
