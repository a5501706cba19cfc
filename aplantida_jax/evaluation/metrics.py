"""Classification metrics on logits: pure numpy, no model and no files.

Everything here takes `logits` and integer `labels [N]` (and, where it matters,
per-image region codes) so the same code scores a teacher, a student, a
calibrated model (pass `logits / T`) or a synthetic test case. `logits` is a
dense [N, C] array or `Scores`, what the evaluate stage keeps of each image's
logits: its top-K logits and classes, the label's logit and rank, and the exact
log-partition log Σ exp(logits / T) with its slope at 32 temperatures. That is
O(N·(K + 64)) memory instead of O(N·C) (90k val images × 9,000 classes: 3.2 GB
of float32 logits, 70 MB of Scores at K = 32), exact for every count (top-k
accuracy for k ≤ K, per-class tables, confusions) and, up to a cubic
interpolation between the stored temperatures, for every probability (NLL,
Brier, confidence, ECE, the temperature fit; BUILD.md, "Bounded-memory
evaluation", measures the error). The student-teacher KL spreads each tail
evenly over its classes. Dense logits become Scores with K = C: exact everywhere.

Conventions, chosen once so every number in a report means the same thing:
- Ties between logits go to the lower class index, exactly like `np.argmax`; so
  a constant model is right only on class 0, never "right everywhere".
- Top-k with k >= C counts every example as a hit (the report says k).
- Macro accuracy is the mean of per-class accuracies over classes present in
  `labels` (long-tailed plant data: a rare species weighs as much as a common one).
- ECE/MCE use `n_bins` equal-width confidence bins (lo, hi] over (0, 1], where
  confidence is the max softmax probability: ECE = sum_b |B|/N * |acc(B) - conf(B)|,
  MCE = max over non-empty bins of |acc(B) - conf(B)| (Guo et al. 2017).
- Brier score is the multi-class one: mean over examples of sum_c (p_c - 1[c=y])^2,
  so it lies in [0, 2].
- Student-teacher agreement follows big_vision's distillation `agree` distance:
  top-1 agree = same argmax; top-5 agree = the teacher's top-1 class is among the
  student's top 5. KL is KL(teacher || student) at temperature 1, in nats.
"""

import dataclasses

import numpy as np

from aplantida_jax.data.records import region_mask

# Inverse temperatures at which Scores keep each example's exact log-partition (and its
# slope): Hermite interpolation between them is exact to ~1e-6 nats for T in [0.025, 20]
# (BUILD.md, "Bounded-memory evaluation"). Up to 40 so that Brier's Σp² = Z(2β)/Z(β)² holds
# down to T = 0.05 (config.eval.t_min's default).
BETAS = np.geomspace(0.05, 40.0, 32)


class Columns:
  """Mixin for a dataclass whose every field is a per-example array [N, ...]."""

  def take(self, mask):
    """The examples where `mask` [N] holds (or at `mask`'s indices)."""
    return type(self)(*(getattr(self, f.name)[mask] for f in dataclasses.fields(self)))

  @classmethod
  def concatenate(cls, parts):
    """The examples of `parts` in order."""
    return cls(
      *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls))
    )


@dataclasses.dataclass(frozen=True)
class Scores:
  """O(K + |BETAS|) numbers per example instead of C logits; `scores / T` acts like logits / T.

  top_logits [N, K] float64, descending (ties: lower class first); top_classes [N, K];
  tail_logit [N]: log-mean-exp of the other C − K logits (−inf when K = C), used only
  for the KL to a teacher; labels [N]; label_logit [N] and label_rank [N] (0 = top-1, ties
  to the lower class) of the label; log_z, dlog_z [N, |BETAS|]: log Σ_c exp(β·logit_c)
  and its β-derivative at each β of BETAS. All of the unscaled logits; `beta` is the 1/T
  applied so far.
  """

  top_logits: np.ndarray
  top_classes: np.ndarray
  tail_logit: np.ndarray
  labels: np.ndarray
  label_logit: np.ndarray
  label_rank: np.ndarray
  log_z: np.ndarray
  dlog_z: np.ndarray
  num_classes: int
  beta: float = 1.0

  @classmethod
  def of(cls, logits, labels, k=None, *, num_classes=None, what="split"):
    """Dense [N, C] logits (validated: check_dense) → Scores; k=None keeps every class (exact)."""
    logits, labels = check_dense(logits, labels, num_classes, what)
    n, c = logits.shape
    k = c if k is None else min(k, c)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, order, axis=1)
    tail = np.full(n, -np.inf)
    if k < c:
      rest = logits.copy()
      np.put_along_axis(rest, order, -np.inf, axis=1)
      tail = _logsumexp(rest) - np.log(c - k)
    label_logit = logits[np.arange(n), labels]
    lower_index = np.arange(c)[None, :] < labels[:, None]
    above = (logits > label_logit[:, None]) | ((logits == label_logit[:, None]) & lower_index)
    log_z, dlog_z = _partition_at(logits, BETAS)
    return cls(top, order, tail, labels, label_logit, above.sum(1), log_z, dlog_z, c)

  def __len__(self):
    return len(self.labels)

  def __truediv__(self, temperature):
    return dataclasses.replace(self, beta=self.beta / temperature)

  @property
  def k(self):
    return self.top_logits.shape[1]

  @property
  def exact(self):
    """Every class is kept (K = C): no interpolation anywhere."""
    return self.k == self.num_classes

  @property
  def predicted(self):
    """argmax class [N]."""
    return self.top_classes[:, 0]

  def scaled(self, logits):
    """`logits` of these scores at the applied temperature."""
    return self.beta * logits

  def log_partition(self, multiple=1.0):
    """log Σ_c exp(multiple · logit_c / T) [N]."""
    return self.partition(self.beta * multiple)[0]

  def partition(self, beta):
    """(log Z(β), d/dβ, d²/dβ²) [N] each, of the unscaled logits at inverse temperature β.

    Exact from the top K when K = C; else the Hermite cubic through the stored values and
    slopes at the two BETAS around β.
    """
    if self.exact:
      log_z, slope = _partition_at(self.top_logits, np.array([beta]))
      probs = np.exp(beta * self.top_logits - log_z)
      curvature = np.sum(probs * self.top_logits**2, axis=1) - slope[:, 0] ** 2
      return log_z[:, 0], slope[:, 0], np.maximum(curvature, 0.0)
    if not BETAS[0] <= beta <= BETAS[-1]:
      raise ValueError(
        f"temperature {1 / beta:.4g} is outside [{1 / BETAS[-1]:.3g}, {1 / BETAS[0]:.3g}], "
        "where the kept scores hold the log-partition; keep config.eval.t_min/t_max in it."
      )
    i = int(np.clip(np.searchsorted(BETAS, beta) - 1, 0, len(BETAS) - 2))
    h = BETAS[i + 1] - BETAS[i]
    t = (beta - BETAS[i]) / h
    z0, z1 = self.log_z[:, i], self.log_z[:, i + 1]
    d0, d1 = self.dlog_z[:, i], self.dlog_z[:, i + 1]
    value = (
      (2 * t**3 - 3 * t**2 + 1) * z0
      + (t**3 - 2 * t**2 + t) * h * d0
      + (-2 * t**3 + 3 * t**2) * z1
      + (t**3 - t**2) * h * d1
    )
    slope = (
      (6 * t**2 - 6 * t) / h * z0
      + (3 * t**2 - 4 * t + 1) * d0
      + (-6 * t**2 + 6 * t) / h * z1
      + (3 * t**2 - 2 * t) * d1
    )
    curvature = (
      (12 * t - 6) / h**2 * z0
      + (6 * t - 4) / h * d0
      + (6 - 12 * t) / h**2 * z1
      + (6 * t - 2) / h * d1
    )
    return value, slope, np.maximum(curvature, 0.0)

  def rank_of(self, classes):
    """0-based rank of `classes` [N] among each example's top K; K where it is not there."""
    hits = self.top_classes == np.asarray(classes)[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), self.k)


def _logsumexp(x, axis=1):
  high = np.max(x, axis=axis, keepdims=True)
  high = np.where(np.isfinite(high), high, 0.0)
  return np.log(np.sum(np.exp(x - high), axis=axis)) + np.squeeze(high, axis)


def _partition_at(logits, betas):
  """(log Σ exp(β·z), Σ softmax(β·z)·z) [N, len(betas)] of logits z [N, C], chunked by β."""
  log_z = np.stack([_logsumexp(b * logits) for b in betas], axis=1)
  slope = np.stack(
    [np.sum(np.exp(b * logits - lz[:, None]) * logits, axis=1) for b, lz in zip(betas, log_z.T)],
    axis=1,
  )
  return log_z, slope


def as_scores(logits, labels=None, what="split", num_classes=None):
  """Scores of dense logits (validated) or the given Scores (labels, when given, checked)."""
  if isinstance(logits, Scores):
    if labels is not None and not np.array_equal(np.asarray(labels), logits.labels):
      raise ValueError(f"{what}: the labels differ from those the scores were made with.")
    if num_classes is not None and logits.num_classes != num_classes:
      raise ValueError(_class_count_error(what, logits.num_classes, num_classes))
    if not len(logits):
      raise ValueError(_empty_error(what))
    return logits
  return Scores.of(logits, labels, num_classes=num_classes, what=what)


def _empty_error(what):
  return (
    f"{what}: empty split (0 examples). Check dataset/manifest.json counts and re-run the "
    "export stage with a split fraction that leaves examples in this split."
  )


def _class_count_error(what, have, want):
  return (
    f"{what}: logits have {have} classes but classes.json lists {want}; the "
    "checkpoint was trained on a different dataset. Evaluate it with its own dataset."
  )


def check_dense(logits, labels, num_classes=None, what="split"):
  """Validated (float64 logits, int64 labels); raises ValueError naming the problem and fix."""
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"{what}: logits must have shape [N, C], got {logits.shape}.")
  n, c = logits.shape
  if n == 0:
    raise ValueError(_empty_error(what))
  if labels.shape != (n,):
    raise ValueError(
      f"{what}: labels shape {labels.shape} does not match logits shape {logits.shape}; "
      "expected labels [N]."
    )
  if num_classes is not None and c != num_classes:
    raise ValueError(_class_count_error(what, c, num_classes))
  bad_rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
  if bad_rows.size:
    raise ValueError(
      f"{what}: {bad_rows.size} of {n} rows of logits hold NaN/inf (first at index {bad_rows[0]}); "
      "the checkpoint diverged or its inputs are corrupt. Re-train (lower the learning rate) "
      "or pick an earlier checkpoint."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what}: labels must be integers, got dtype {labels.dtype}.")
  outside = np.flatnonzero((labels < 0) | (labels >= c))
  if outside.size:
    raise ValueError(
      f"{what}: label {labels[outside[0]]} (index {outside[0]}) is outside the class range [0, {c}); "
      "the shards and the model disagree on the classes. Re-run export and train on the same dataset."
    )
  return logits.astype(np.float64), labels.astype(np.int64)


def log_softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits):
  return np.exp(log_softmax(logits))


def label_ranks(logits, labels):
  """0-based rank of the true label (0 = top-1); ties go to the lower class index."""
  return as_scores(logits, labels).label_rank


def topk_accuracy(logits, labels, k):
  """Fraction of examples whose label is among the k highest logits (micro average)."""
  return float(np.mean(label_ranks(logits, labels) < k))


def per_class_accuracy(logits, labels, k, num_classes=None):
  """(support [C], top-k accuracy [C] with NaN where a class has no examples)."""
  scores = as_scores(logits, labels, num_classes=num_classes)
  support = np.bincount(scores.labels, minlength=scores.num_classes)
  hits = np.bincount(scores.labels, weights=scores.label_rank < k, minlength=scores.num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    return support, np.where(support > 0, hits / np.maximum(support, 1), np.nan)


def macro_topk_accuracy(logits, labels, k):
  """Mean over classes present in `labels` of their top-k accuracy."""
  _, accuracy = per_class_accuracy(logits, labels, k)
  return float(np.nanmean(accuracy))


def per_class_table(logits, labels, class_names=None):
  """One row per class: index, species, support, top1, top5 (None when support is 0)."""
  support, top1 = per_class_accuracy(logits, labels, 1)
  _, top5 = per_class_accuracy(logits, labels, 5)
  names = class_names or [str(i) for i in range(len(support))]
  return [
    {
      "index": i,
      "species": names[i],
      "support": int(support[i]),
      "top1": None if support[i] == 0 else float(top1[i]),
      "top5": None if support[i] == 0 else float(top5[i]),
    }
    for i in range(len(support))
  ]


def nll(logits, labels):
  """Mean negative log-likelihood of the true label, in nats."""
  scores = as_scores(logits, labels)
  return float(np.mean(scores.log_partition() - scores.scaled(scores.label_logit)))


def brier_score(logits, labels):
  """Multi-class Brier score: mean over examples of sum_c (p_c - onehot_c)^2."""
  scores = as_scores(logits, labels)
  log_z = scores.log_partition()
  sum_squares = np.exp(scores.log_partition(2.0) - 2 * log_z)  # Σ p² = Z(2β) / Z(β)²
  label_prob = np.exp(scores.scaled(scores.label_logit) - log_z)
  return float(np.mean(sum_squares - 2 * label_prob + 1))


def confidence_and_correct(logits, labels):
  """(max softmax probability [N], argmax == label [N]): what calibration is about."""
  scores = as_scores(logits, labels)
  confidence = np.exp(scores.scaled(scores.top_logits[:, 0]) - scores.log_partition())
  return confidence, scores.label_rank == 0


def reliability_bins(confidence, correct, n_bins=15):
  """Per equal-width bin (lo, hi]: edges, count, mean accuracy, mean confidence (NaN if empty)."""
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}; set config.eval.n_bins.")
  index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
  count = np.bincount(index, minlength=n_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    accuracy = np.bincount(index, weights=correct, minlength=n_bins) / count
    mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
  return {
    "edges": np.linspace(0.0, 1.0, n_bins + 1),
    "count": count,
    "accuracy": accuracy,
    "confidence": mean_confidence,
  }


def ece_of(confidence, correct, n_bins=15):
  """ECE of (max probability, argmax right) pairs: what calibration_errors reports as "ece"."""
  return _bin_errors(reliability_bins(confidence, correct, n_bins))["ece"]


def calibration_errors(logits, labels, n_bins=15):
  """{"ece", "mce"} of the max-probability prediction over `n_bins` equal-width bins."""
  return _bin_errors(reliability_bins(*confidence_and_correct(logits, labels), n_bins))


def _bin_errors(bins):
  filled = bins["count"] > 0
  gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
  weight = bins["count"][filled] / bins["count"].sum()
  return {"ece": float(np.sum(weight * gap)), "mce": float(gap.max())}


def confusion_counts(logits, labels):
  """{(true, predicted argmax): count} over the examples, sparse (at most N pairs, not C²)."""
  scores = as_scores(logits, labels)
  pairs, counts = np.unique(
    np.stack([scores.labels, scores.predicted], axis=1), axis=0, return_counts=True
  )
  return {(int(t), int(p)): int(n) for (t, p), n in zip(pairs, counts)}


def top_confusions(logits, labels, k=10, class_names=None):
  """The k largest off-diagonal confusion counts, largest first (ties: lower true, then predicted, index)."""
  scores = as_scores(logits, labels)
  support = np.bincount(scores.labels, minlength=scores.num_classes)
  off_diagonal = sorted(
    ((-n, t, p) for (t, p), n in confusion_counts(scores, None).items() if t != p)
  )[:k]
  names = class_names or [str(i) for i in range(scores.num_classes)]
  return [
    {
      "true": t,
      "true_species": names[t],
      "predicted": p,
      "predicted_species": names[p],
      "count": -n,
      "fraction_of_true": float(-n / support[t]),
    }
    for n, t, p in off_diagonal
  ]


def region_accuracy(logits, labels, regions, regions_config):
  """{name: {"n", "top1", "top5"}} for "global" and each configured region (None when n is 0)."""
  ranks = label_ranks(logits, labels)
  if len(regions) != len(ranks):
    raise ValueError(
      f"regions has {len(regions)} entries but there are {len(ranks)} labels; "
      "pass one list of country codes per example."
    )
  masks = {"global": np.ones(len(ranks), bool)}
  masks.update(
    {name: region_mask(regions, list(countries)) for name, countries in regions_config.items()}
  )
  result = {}
  for name, mask in masks.items():
    n = int(mask.sum())
    result[name] = {
      "n": n,
      "top1": float(np.mean(ranks[mask] < 1)) if n else None,
      "top5": float(np.mean(ranks[mask] < 5)) if n else None,
    }
  return result


def _log_probs_of(scores, classes):
  """log p(class) [N, K'] of `classes` [N, K'] under `scores`: exact in its top K, else the
  tail's per-class log-probability."""
  hits = scores.top_classes[:, :, None] == classes[:, None, :]  # [N, K, K']
  logits = np.where(
    hits.any(axis=1),
    np.take_along_axis(scores.top_logits, hits.argmax(axis=1), axis=1),
    scores.tail_logit[:, None],
  )
  return scores.scaled(logits) - scores.log_partition()[:, None]


def teacher_agreement(student_logits, teacher_logits):
  """{"top1_agree", "top5_agree", "kl_teacher_student"}: how closely the student follows the teacher.

  Agreement is exact (for Scores with K ≥ 5). KL sums over the teacher's top K and its
  tail mass; a class outside the student's top K gets the student's tail probability.
  """
  teacher = as_scores_unlabelled(teacher_logits, "teacher logits")
  student = as_scores_unlabelled(student_logits, "student logits")
  if (len(student), student.num_classes) != (len(teacher), teacher.num_classes):
    raise ValueError(
      f"student logits ({len(student)}, {student.num_classes}) and teacher logits "
      f"({len(teacher)}, {teacher.num_classes}) must both be [N, C] with the same shape; "
      "score both on the same split and classes."
    )
  ranks = student.rank_of(teacher.predicted)
  teacher_log_z = teacher.log_partition()[:, None]
  teacher_top = teacher.scaled(teacher.top_logits) - teacher_log_z
  kl = np.sum(np.exp(teacher_top) * (teacher_top - _log_probs_of(student, teacher.top_classes)), 1)
  if not teacher.exact:
    teacher_tail = teacher.scaled(teacher.tail_logit) - teacher_log_z[:, 0]  # per class
    student_tail = student.scaled(student.tail_logit) - student.log_partition()
    kl += (teacher.num_classes - teacher.k) * np.exp(teacher_tail) * (teacher_tail - student_tail)
  return {
    "top1_agree": float(np.mean(ranks < 1)),
    "top5_agree": float(np.mean(ranks < 5)),
    "kl_teacher_student": float(np.mean(kl)),
  }


def as_scores_unlabelled(logits, what):
  """Scores of logits without labels (class 0 stands in; ranks are not used)."""
  if isinstance(logits, Scores):
    return logits
  logits = np.asarray(logits)
  if logits.ndim != 2:
    raise ValueError(f"{what}: logits must have shape [N, C], got {logits.shape}.")
  return as_scores(logits, np.zeros(len(logits), np.int64), what)


def summary(logits, labels, regions, regions_config, n_bins=15, num_classes=None, what="split"):
  """The headline metrics of one set of logits, as a JSON-ready dict.

  Per-class rows and confusions are separate calls: they do not change under
  temperature scaling, so a report needs them once, not before and after.
  """
  scores = as_scores(logits, labels, what, num_classes)
  return {
    "n": int(len(scores)),
    "num_classes": int(scores.num_classes),
    "top1": topk_accuracy(scores, None, 1),
    "top5": topk_accuracy(scores, None, 5),
    "macro_top1": macro_topk_accuracy(scores, None, 1),
    "macro_top5": macro_topk_accuracy(scores, None, 5),
    "nll": nll(scores, None),
    "brier": brier_score(scores, None),
    **calibration_errors(scores, None, n_bins),
    "regions": region_accuracy(scores, None, regions, regions_config),
  }
