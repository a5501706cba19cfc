"""Pure train/eval steps and the `Task` that says what a stage optimises.

The loop jit-compiles these once; data parallelism comes from the shardings
of their inputs (batch split over the "data" mesh axis, state replicated), so
the same functions run on one CPU, N GPUs and several hosts.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from aplantida_jax.models import preprocess


def forward(apply_fn, variables, images, rng, train=True):
  """Logits (float32) and the updated batch stats of one forward pass."""
  if not train:
    return apply_fn(variables, preprocess.normalize(images), train=False).astype(jnp.float32), None
  logits, updates = apply_fn(
    variables,
    preprocess.normalize(images),
    train=True,
    rngs={"dropout": rng},
    mutable=["batch_stats"],
  )
  return logits.astype(jnp.float32), updates.get("batch_stats", variables.get("batch_stats", {}))


def cross_entropy(logits, labels, label_smoothing=0.0):
  """Per-example softmax cross-entropy against (smoothed) one-hot labels."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def topk_correct(logits, labels, k):
  """1.0 where the label is among the k highest logits; 0.0 for any row holding NaN/inf.

  Without the finiteness term a NaN row would count as a hit: no logit compares greater
  than a NaN label logit.
  """
  k = min(k, logits.shape[-1])
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  hit = jnp.sum(logits > label_logit, axis=-1) < k
  return (hit & jnp.all(jnp.isfinite(logits), axis=-1)).astype(jnp.float32)


def top1_agrees(logits, classes):
  """1.0 where argmax(logits) == classes (ties to the lower index); 0.0 for non-finite rows."""
  agree = jnp.argmax(logits, -1) == classes
  return (agree & jnp.all(jnp.isfinite(logits), axis=-1)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  """What a stage optimises; pipeline, loop, sharding and checkpoints are shared.

  loss_fn(apply_fn, variables, batch, rng, aux) -> (loss, (batch_stats, metrics))
    with a scalar loss to minimise, the updated batch stats and scalar metrics.
  join_fn: picklable (index, epoch, position, record) -> {name: np.ndarray}, extra
    batch fields per element (e.g. soft labels): index is the record index in the
    split, (epoch, position) the crop's epoch and train-view position (eval: 0 and
    the record index); runs in the Grain workers. An optional `crop_epochs`
    attribute E > 0 (soft_labels.SoftLabelJoin of replayed crops) makes
    input_pipeline.train_loader draw epoch e's crops as those of epoch e % E and
    hand the join that epoch.
  aux: pytree handed to loss_fn every step, replicated (e.g. online teachers).
  """

  loss_fn: Callable
  join_fn: Callable | None = None
  aux: Any = None


def classification_task(label_smoothing: float) -> Task:
  """Hard-label training: cross-entropy with label smoothing (teachers, fine-tune)."""

  def loss_fn(apply_fn, variables, batch, rng, aux):
    del aux
    logits, batch_stats = forward(apply_fn, variables, batch["image"], rng)
    loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
    return loss, (batch_stats, {"top1": topk_correct(logits, batch["label"], 1).mean()})

  return Task(loss_fn=loss_fn)


def global_norm(leaves):
  """L2 norm over a list of arrays, as one reduction of their concatenation.

  The same value as optax.global_norm, whose one reduction per tensor XLA:CPU compiles
  several times slower (BUILD.md, "Compile time").
  """
  return jnp.linalg.norm(jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves]))


def train_step(state, batch, rng, aux, *, loss_fn, augment=None):
  """One optimizer call on one (micro-)batch; the dropout rng follows state.step.

  augment (an augment.Augment): its device half (flip, jitter of each example's
  (crop_epoch, position)) turns batch["image"] into float32 0..255 before loss_fn sees it.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  if augment is not None:
    images = augment.flip_jitter(batch["image"], batch["crop_epoch"], batch["position"])
    batch = {**batch, "image": images}

  def objective(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    return loss_fn(state.apply_fn, variables, batch, step_rng, aux)

  (loss, (batch_stats, metrics)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, batch_stats)
  return new_state, {
    "loss": loss,
    "grad_norm": global_norm(state.trained_leaves(grads)),
    "param_norm": global_norm(jax.tree.leaves(new_state.params)),
    **metrics,
  }


def eval_step(state, batch):
  """Masked sums of loss, top-1 and top-5 hits and the count over one batch.

  batch["regions"] (optional) {name: [B] mask of the records in that region, padding 0}
  adds `<name>_top1`, `<name>_top5` and `<name>_count` sums.
  """
  logits, _ = forward(state.apply_fn, state.eval_variables(), batch["image"], None, train=False)
  mask = batch["mask"]
  top1 = topk_correct(logits, batch["label"], 1)
  top5 = topk_correct(logits, batch["label"], 5)
  sums = {
    "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
    "top1": jnp.sum(top1 * mask),
    "top5": jnp.sum(top5 * mask),
    "count": jnp.sum(mask),
  }
  for name, region in batch.get("regions", {}).items():
    sums.update(
      {
        f"{name}_top1": jnp.sum(top1 * region),
        f"{name}_top5": jnp.sum(top5 * region),
        f"{name}_count": jnp.sum(region),
      }
    )
  return sums
