"""One tiny exported model shared by test_export_tfjs.py and test_browser.py.

A MobileNetV2 (width 0.35, 56 px, 4 classes) whose batch-norm statistics are
estimated on the tiny dataset's train images (so its outputs depend on the
input, unlike a fresh init), saved as a real orbax checkpoint in the train
loop's layout, calibrated (eval/calibration.json), then exported with the
real CLI. The export takes minutes on 2 busy cores, so it is built once per
pytest session under the session's base temp folder.
"""

import csv
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.export import parity
from aplantida_jax.export import serving
from aplantida_jax.models import preprocess
from aplantida_jax.train import checkpointing
from configs import training
from tests import helpers
from tests import tiny_dataset

IMAGE_SIZE = (
  56  # 64 px test photos → centre crop of 0.875 is exactly 56: the browser resizes nothing
)
PHOTO_SIZE = 64
NUM_CLASSES = 4
ROLLUP = {"genus": 0.6, "family": None, "set_size": 3}
# A neutral prior (every log-ratio 0) as the evaluate stage writes it: the export must ship it.
REGION_PRIOR = {
  "scale": 1.0,
  "strength": 1.0,
  "threshold": 0.3,
  "rollup": ROLLUP,
  "regions": {"spain": {"countries": ["ES"], "log_ratio": [0.0] * NUM_CLASSES}},
}
TEMPERATURE = 1.3
THRESHOLD = 0.4
MODEL_KWARGS = {"width": 0.35}
STUDENT = "student/finetune"


class _EvalState:
  """What StageCheckpoints.maybe_save_best reads from a train state."""

  def __init__(self, variables):
    self.variables = variables

  def eval_variables(self):
    return self.variables


def _train_config():
  config = training.training_config(
    output_dir=STUDENT, model_name="mobilenet_v2", image_size=IMAGE_SIZE
  )
  config.model.num_classes = NUM_CLASSES
  config.model.kwargs = MODEL_KWARGS
  return config


def _variables(dataset_dir):
  """Random init with batch-norm statistics of the train images (momentum 0 = one batch)."""
  model = models.get_model("mobilenet_v2", NUM_CLASSES, **MODEL_KWARGS)
  variables = model.init(
    jax.random.PRNGKey(0), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False
  )
  images = parity.split_images(dataset_dir, "train", 32, IMAGE_SIZE, 0.875)
  mean = np.asarray(preprocess.IMAGENET_MEAN) * 255
  std = np.asarray(preprocess.IMAGENET_STD) * 255
  stats_model = models.get_model("mobilenet_v2", NUM_CLASSES, bn_momentum=0.0, **MODEL_KWARGS)
  _, updated = jax.jit(functools.partial(stats_model.apply, train=True, mutable=["batch_stats"]))(
    variables, (images - mean) / std, rngs={"dropout": jax.random.PRNGKey(1)}
  )
  return jax.tree.map(
    np.asarray, {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  )


def _write_workdir(workdir):
  dataset_dir = os.path.join(workdir, "dataset")
  tiny_dataset.write_tiny_dataset(
    dataset_dir, num_classes=NUM_CLASSES, size=PHOTO_SIZE, per_class={"train": 8, "val": 4}
  )
  with open(os.path.join(dataset_dir, "attributions.csv"), "w", newline="") as f:
    csv.writer(f).writerows(
      [["sha256", "species", "author", "license"], ["ab12", "Rosa rubra", "test", "CC0-1.0"]]
    )
  student = os.path.join(workdir, STUDENT)
  os.makedirs(student)
  fileio.write_json(os.path.join(student, workdir_lib.CONFIG_FILE), _train_config().to_dict())
  checkpoints = checkpointing.StageCheckpoints(student, _train_config().checkpoint)
  checkpoints.maybe_save_best(1, _EvalState(_variables(dataset_dir)), {"val_top1": 0.5})
  checkpoints.close()
  os.makedirs(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "eval", "calibration.json"), "w") as f:
    json.dump(
      {
        "temperature": TEMPERATURE,
        "threshold": THRESHOLD,
        "checkpoint": {"stage_dir": STUDENT, "which": "best"},
        "region_prior": "region_prior.json",
        "rollup": ROLLUP,
      },
      f,
    )
  fileio.write_json(os.path.join(workdir, "eval", "region_prior.json"), REGION_PRIOR)


def tiny_export(base_dir):
  """Builds (once) and returns the workdir; its tfjs/ holds the export."""
  workdir = os.path.join(str(base_dir), "tfjs_workdir")
  done = os.path.join(workdir, "export.done")
  if os.path.exists(done):
    return workdir
  if os.path.exists(workdir):
    raise RuntimeError(f"{workdir} is a half-built export from a failed run; delete it")
  _write_workdir(workdir)
  parity_images = 0 if parity.node_missing_reason() else 8
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(helpers.ROOT, "tools", "export_tfjs.py"),
      f"--workdir={workdir}",
      f"--config.export.parity_images={parity_images}",
    ],
    cwd=helpers.ROOT,
    env=helpers.cli_env(),
    capture_output=True,
    text=True,
    timeout=1200,
  )
  if proc.returncode != 0:
    raise RuntimeError(f"tools/export_tfjs.py failed:\n{proc.stderr[-5000:]}")
  with open(os.path.join(workdir, "export_summary.json"), "w") as f:
    f.write(proc.stdout.strip().splitlines()[-1])
  open(done, "w").close()
  return workdir


def load_student(workdir):
  """(model, variables) of the exported checkpoint."""
  variables = checkpointing.load_variables(os.path.join(workdir, STUDENT))
  return models.get_model("mobilenet_v2", NUM_CLASSES, **MODEL_KWARGS), variables


@functools.cache
def _reference(workdir):
  model, variables = load_student(workdir)
  serve = jax.jit(serving.serving_fn(model, TEMPERATURE))
  return lambda image: np.asarray(serve(variables, image[None]))[0]


def jax_probabilities(workdir, images):
  """The JAX serving function on each image (batch 1, compiled once per test session)."""
  reference = _reference(workdir)
  return np.stack([reference(np.asarray(image, np.float32)) for image in images])
