"""Evaluator kind "agreement": how closely the student follows the teachers' soft labels.

`config.evals.<name> = eval_config("agreement", split="val")` (configs/training.py) runs the student's eval variables over the split with each record's precomputed
row joined (sha256-checked) and returns top1_agree (same argmax as the
ensemble), top5_agree (the ensemble's top-1 in the student's top 5), kl
(KL(teacher_T ‖ student_T) at the soft labels' T) and count. Monitoring only:
without soft labels for the split (online distillation, a set made for
another dataset) it says why once and returns nothing.
"""

import functools
import os

import jax
import jax.numpy as jnp
from absl import logging

from aplantida_jax.distill import losses
from aplantida_jax.distill import soft_labels
from aplantida_jax.evaluation import evaluators
from aplantida_jax.train import sharding
from aplantida_jax.train import steps

TEACHER_FIELDS = ("teacher_probs", "teacher_classes", "teacher_rest")


def agreement_step(state, batch, *, temperature):
  """Masked sums of top-1/top-5 agreement and KL against the joined teacher rows."""
  logits, _ = steps.forward(
    state.apply_fn, state.eval_variables(), batch["image"], None, train=False
  )
  classes, mask = batch["teacher_classes"], batch["mask"]
  kl = losses.sparse_kl(logits, batch["teacher_probs"], classes, batch["teacher_rest"], temperature)
  return {
    "top1_agree": jnp.sum(steps.top1_agrees(logits, classes[:, 0]) * mask),
    "top5_agree": jnp.sum(steps.topk_correct(logits, classes[:, 0], 5) * mask),
    "kl": jnp.sum(jnp.where(mask > 0, kl, 0.0)),
    "count": jnp.sum(mask),
  }


class Agreement(evaluators.Evaluator):
  """Student vs the precomputed soft labels of one split."""

  FIELDS = ("soft_labels_dir",)

  def __init__(self, name, spec, **kwargs):
    super().__init__(name, spec, **kwargs)
    soft_dir = os.path.join(
      self.workdir, spec.get("soft_labels_dir") or self.config.distill.soft_labels_dir
    )
    try:
      self.join_fn, meta = soft_labels.open_split(soft_dir, self.dataset_dir, spec["split"])
    except (FileNotFoundError, ValueError) as e:
      logging.info("config.evals.%s (agreement) is skipped: %s", name, e)
      self.join_fn = None
      return
    self.keys = ("top1_agree", "top5_agree", "kl", "count")
    self.step = jax.jit(
      functools.partial(agreement_step, temperature=meta["temperature"]),
      out_shardings=sharding.replicated(self.mesh),
    )

  def run(self, state):
    if self.join_fn is None:
      return {}
    keep = ("image", "mask") + TEACHER_FIELDS
    batches = ({k: batch[k] for k in keep} for batch in self.batches(self.join_fn))
    totals = evaluators.summed_pass(self.step, state, batches, self.mesh)
    count = max(totals["count"], 1.0)
    return {**{k: v / count for k, v in totals.items() if k != "count"}, "count": totals["count"]}
