"""Trained stage → model + variables, and logits over a dataset split.

The evaluation, soft-label and export stages read checkpoints only through
here, so a stage folder is the whole interface: config.json says which model
was trained (num_classes resolved), orbax holds the variables.
"""

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.evaluation import metrics
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


def compress(logits, labels, k):
  """One batch's logits [B, C] → the device half of metrics.Scores, O(B·K) to copy back.

  {top_logits [B, K] descending, top_classes, tail_logit [B] (the tail's log-mean-exp;
  −inf when K = C), label_logit and label_rank [B] (ties to the lower class, as
  metrics.Scores.of), log_z and dlog_z [B, |BETAS|] (log Σ exp(β·logits) and its
  β-derivative at metrics.BETAS), finite [B] (the row holds no NaN/inf)}: metrics.Scores'
  per-example fields, by name. jit-compiled, with k static.
  """
  num_classes = logits.shape[-1]
  k = min(k, num_classes)
  top, classes = jax.lax.top_k(logits, k)
  tail = jnp.full(logits.shape[:1], -jnp.inf)
  if k < num_classes:
    rest = logits.at[jnp.arange(len(logits))[:, None], classes].set(-jnp.inf)
    tail = jax.nn.logsumexp(rest, axis=-1) - jnp.log(num_classes - k)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  lower = jnp.arange(num_classes)[None, :] < labels[:, None]
  rank = jnp.sum((logits > label_logit) | ((logits == label_logit) & lower), axis=-1)
  scaled = jnp.asarray(metrics.BETAS, logits.dtype)[None, :, None] * logits[:, None, :]
  log_z = jax.nn.logsumexp(scaled, axis=-1)
  dlog_z = jnp.sum(jax.nn.softmax(scaled, axis=-1) * logits[:, None, :], axis=-1)
  return {
    "top_logits": top,
    "top_classes": classes,
    "tail_logit": tail,
    "label_logit": label_logit[:, 0],
    "label_rank": rank,
    "log_z": log_z,
    "dlog_z": dlog_z,
    "finite": jnp.all(jnp.isfinite(logits), axis=-1),
  }


def shifted_summary(logits, labels, offsets, beta):
  """Per row of `offsets` [V, C], what a fixed-temperature score needs of softmax(β·(logits + o)).

  {log_z, top, label [V, B] (log Σ exp, max and label entry of β·(logits + o)), rank [V, B]
  (the label's, ties to the lower class)}: O(V·B) to copy back, no sort and one exp pass per
  view (region_prior.ShiftedScores holds them).
  """
  num_classes = logits.shape[-1]
  lower = jnp.arange(num_classes)[None, :] < labels[:, None]

  def one(offset):
    z = beta * (logits + offset.astype(logits.dtype))
    label = jnp.take_along_axis(z, labels[:, None], axis=-1)
    return {
      "log_z": jax.nn.logsumexp(z, axis=-1),
      "top": jnp.max(z, axis=-1),
      "label": label[:, 0],
      "rank": jnp.sum((z > label) | ((z == label) & lower), axis=-1),
    }

  return jax.lax.map(one, offsets)


def predict_split(
  stage_dir, dataset_dir, split, batch_size=64, which="best", keep=32, offsets=None, beta=1.0
):
  """metrics.Scores of every record of `split`, in record order, with its metadata.

  Returns {"scores": metrics.Scores (K = keep), "labels": int32 [N], "regions": [[str]],
  "sha256": [str]}, and with `offsets` [V, C] also "views": {log_z, top, label, rank} arrays
  [V, N] of softmax(beta · (logits + offsets[v])) (shifted_summary; the region prior's
  candidates, evaluation/region_prior.py). Memory is O(N·keep + V·N), never O(N·C). Images
  get the eval transform of the stage's config; a NaN/inf logit anywhere is a ValueError
  naming the stage.
  """
  model, variables, config = load_model(stage_dir, which)
  offsets = np.zeros((0, config.model.num_classes), np.float32) if offsets is None else offsets

  @jax.jit
  def scores_of(v, images, labels, offsets):
    logits = steps.forward(model.apply, v, images, None, train=False)[0]
    return compress(logits, labels, keep), shifted_summary(logits, labels, offsets, beta)

  metadata = input_pipeline.read_metadata(dataset_dir, split)
  n = len(metadata["labels"])
  k = min(keep, config.model.num_classes)
  columns = {
    "top_logits": np.zeros((n, k)),
    "top_classes": np.zeros((n, k), np.int64),
    "tail_logit": np.zeros(n),
    "label_logit": np.zeros(n),
    "label_rank": np.zeros(n, np.int64),
    "log_z": np.zeros((n, len(metrics.BETAS))),
    "dlog_z": np.zeros((n, len(metrics.BETAS))),
    "finite": np.zeros(n, bool),
  }
  view_columns = {
    name: np.zeros((len(offsets), n), np.int64 if name == "rank" else np.float64)
    for name in ("log_z", "top", "label", "rank")
  }
  for batch in tqdm(
    input_pipeline.eval_batches(
      config.input, dataset_dir, split, batch_size, shard_by_process=False
    ),
    desc=f"predict {split}",
    total=-(-n // batch_size),
    disable=None,
  ):
    real = batch["mask"] > 0
    outputs, view_outputs = jax.device_get(
      scores_of(variables, batch["image"], batch["label"], offsets)
    )
    for name, column in columns.items():
      column[batch["index"][real]] = outputs[name][real]
    for name, column in view_columns.items():
      column[:, batch["index"][real]] = view_outputs[name][:, real]
  bad = np.flatnonzero(~columns.pop("finite"))
  if bad.size:
    raise ValueError(
      f"{stage_dir} on {split}: {bad.size} of {n} rows of logits hold NaN/inf (first at "
      f"record {bad[0]}); the checkpoint diverged or its inputs are corrupt. Re-train (lower "
      "the learning rate) or pick an earlier checkpoint."
    )
  labels = metadata["labels"].astype(np.int64)
  scores = metrics.Scores(**columns, labels=labels, num_classes=config.model.num_classes)
  return {
    "scores": scores,
    **({"views": view_columns} if len(offsets) else {}),
    "labels": metadata["labels"],
    "regions": metadata["regions"],
    "sha256": metadata["sha256"],
  }
