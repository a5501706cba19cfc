"""Knowledge-distillation loss against a sparse (top-k + remaining mass) teacher.

  loss = α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE(hard label, student)

The teacher distribution at temperature T is stored sparse (soft_labels.py):
the k largest probabilities, their class indices and the remaining mass r.

Remaining mass: an extra "other" bucket. The target is the (k+1)-outcome
distribution (p_1..p_k, r) and the student's own distribution is collapsed
the same way (q_1..q_k, q_rest = its tempered mass outside those k classes):

  KL = Σ_i p_i·log(p_i / q_i) + r·log(r / q_rest)

Why the bucket and not spreading r uniformly over the C−k other classes: the
uniform spread invents a tail the teacher never said (with thousands of
species the true tail sits on a few look-alikes, not everywhere) and would pull
the student towards a flat tail; the bucket only asks that the student put
mass r outside the top-k, leaving the shape of the tail free. It is the exact
KL of the coarsened distributions (a lower bound of the full KL, equal to it
when k = C), needs O(k) target memory per image, and q_rest is computed with a
log-sum-exp over the non-top-k logits, so it never underflows to log(0).
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from aplantida_jax.train import steps


def normalized_target(topk_probs, rest_mass):
  """float32 (p, r) rescaled to sum to 1 (float16 storage rounds the sum)."""
  p = topk_probs.astype(jnp.float32)
  r = jnp.maximum(rest_mass.astype(jnp.float32), 0.0)
  total = jnp.maximum(jnp.sum(p, axis=-1) + r, 1e-12)  # 0 only on padding rows
  return p / total[:, None], r / total


def sparse_kl(student_logits, topk_probs, topk_classes, rest_mass, temperature):
  """Per-example KL(teacher_T ‖ student_T) with the "other" bucket (see module doc).

  student_logits [B, C]; topk_probs [B, k] (teacher probabilities at T);
  topk_classes [B, k] int; rest_mass [B] = 1 − Σ topk_probs.
  """
  p, r = normalized_target(topk_probs, rest_mass)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q_topk = jnp.take_along_axis(log_q, topk_classes, axis=-1)
  in_topk = (
    jnp.zeros(log_q.shape, bool).at[jnp.arange(log_q.shape[0])[:, None], topk_classes].set(True)
  )
  has_rest = ~jnp.all(in_topk, axis=-1)
  # Double where: no NaN gradient when every class is in the top-k (k = C).
  masked = jnp.where(in_topk, -jnp.inf, log_q)
  masked = jnp.where(has_rest[:, None], masked, 0.0)
  log_q_rest = jnp.where(has_rest, jax.nn.logsumexp(masked, axis=-1), 0.0)
  topk_term = jnp.sum(xlogy(p, p) - p * log_q_topk, axis=-1)
  rest_term = jnp.where(has_rest, xlogy(r, r) - r * log_q_rest, 0.0)
  return topk_term + rest_term


def kd_loss(
  student_logits,
  labels,
  topk_probs,
  topk_classes,
  rest_mass,
  *,
  alpha,
  temperature,
  label_smoothing=0.0,
):
  """Per-example α·T²·KL + (1−α)·CE, and its two parts (for metrics)."""
  kl = sparse_kl(student_logits, topk_probs, topk_classes, rest_mass, temperature)
  ce = steps.cross_entropy(student_logits, labels, label_smoothing)
  return alpha * temperature**2 * kl + (1 - alpha) * ce, kl, ce


def sparse_target(teacher_probs, k):
  """Dense teacher probabilities [B, C] → (top-k probs, classes, remaining mass)."""
  probs, classes = jax.lax.top_k(teacher_probs, min(k, teacher_probs.shape[-1]))
  return probs, classes.astype(jnp.int32), jnp.maximum(1.0 - jnp.sum(probs, axis=-1), 0.0)
