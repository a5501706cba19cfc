"""Trained stage → model + variables, and logits over a dataset split.

The evaluation, soft-label and export stages read checkpoints only through
here, so a stage folder is the whole interface: config.json says which model
was trained (num_classes resolved), orbax holds the variables.
"""

import jax
import numpy as np
from tqdm import tqdm

from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import steps


def load_model(stage_dir, which="best"):
  """(flax module, {"params", "batch_stats"}, resolved training config).

  `which="best"` is the best val top-1 checkpoint, "latest" the last saved;
  EMA params are returned when the stage kept them.
  """
  config = workdir_lib.TrainedStage(stage_dir).config
  return models.from_config(config.model), checkpointing.load_variables(stage_dir, which), config


def predict_split(stage_dir, dataset_dir, split, batch_size=64, which="best"):
  """Logits of every record of `split`, in record order, with its metadata.

  Returns {"logits": float32 [N, C], "labels": int32 [N], "regions": [[str]],
  "sha256": [str]}. Images get the eval transform of the stage's config.
  """
  model, variables, config = load_model(stage_dir, which)
  apply = jax.jit(lambda v, images: steps.forward(model.apply, v, images, None, train=False)[0])
  metadata = input_pipeline.read_metadata(dataset_dir, split)
  logits = np.zeros((len(metadata["labels"]), config.model.num_classes), np.float32)
  for batch in tqdm(
    input_pipeline.eval_batches(
      config.input, dataset_dir, split, batch_size, shard_by_process=False
    ),
    desc=f"predict {split}",
    total=-(-len(logits) // batch_size),
    disable=None,
  ):
    real = batch["mask"] > 0
    logits[batch["index"][real]] = np.asarray(apply(variables, batch["image"]))[real]
  return {
    "logits": logits,
    "labels": metadata["labels"],
    "regions": metadata["regions"],
    "sha256": metadata["sha256"],
  }
