"""Classification metrics on logits arrays: pure numpy, no model and no files.

Everything here takes `logits [N, C]` and integer `labels [N]` (and, where it
matters, per-image region codes) so the same code scores a teacher, a student,
a calibrated model (pass `logits / T`) or a synthetic test case.

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

import numpy as np

from aplantida_jax.data.records import region_mask


def check_inputs(logits, labels, num_classes=None, what="split"):
  """Validated (float64 logits, int64 labels); raises ValueError naming the problem and fix."""
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"{what}: logits must have shape [N, C], got {logits.shape}.")
  n, c = logits.shape
  if n == 0:
    raise ValueError(
      f"{what}: empty split (0 examples). Check dataset/manifest.json counts and re-run the "
      "export stage with a split fraction that leaves examples in this split."
    )
  if labels.shape != (n,):
    raise ValueError(
      f"{what}: labels shape {labels.shape} does not match logits shape {logits.shape}; "
      "expected labels [N]."
    )
  if num_classes is not None and c != num_classes:
    raise ValueError(
      f"{what}: logits have {c} classes but classes.json lists {num_classes}; the "
      "checkpoint was trained on a different dataset. Evaluate it with its own dataset."
    )
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
  logits, labels = check_inputs(logits, labels)
  true_logit = logits[np.arange(len(labels)), labels][:, None]
  lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
  return ((logits > true_logit) | ((logits == true_logit) & lower_index)).sum(axis=1)


def topk_accuracy(logits, labels, k):
  """Fraction of examples whose label is among the k highest logits (micro average)."""
  return float(np.mean(label_ranks(logits, labels) < k))


def per_class_accuracy(logits, labels, k, num_classes=None):
  """(support [C], top-k accuracy [C] with NaN where a class has no examples)."""
  logits, labels = check_inputs(logits, labels, num_classes)
  num_classes = logits.shape[1]
  support = np.bincount(labels, minlength=num_classes)
  hits = np.bincount(labels, weights=label_ranks(logits, labels) < k, minlength=num_classes)
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
  logits, labels = check_inputs(logits, labels)
  return float(-np.mean(log_softmax(logits)[np.arange(len(labels)), labels]))


def brier_score(logits, labels):
  """Multi-class Brier score: mean over examples of sum_c (p_c - onehot_c)^2."""
  logits, labels = check_inputs(logits, labels)
  probs = softmax(logits)
  probs[np.arange(len(labels)), labels] -= 1.0
  return float(np.mean(np.sum(probs**2, axis=1)))


def confidence_and_correct(logits, labels):
  """(max softmax probability [N], argmax == label [N]): what calibration is about."""
  logits, labels = check_inputs(logits, labels)
  probs = softmax(logits)
  return probs.max(axis=1), probs.argmax(axis=1) == labels


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


def calibration_errors(logits, labels, n_bins=15):
  """{"ece", "mce"} of the max-probability prediction over `n_bins` equal-width bins."""
  bins = reliability_bins(*confidence_and_correct(logits, labels), n_bins)
  filled = bins["count"] > 0
  gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
  weight = bins["count"][filled] / bins["count"].sum()
  return {"ece": float(np.sum(weight * gap)), "mce": float(gap.max())}


def confusion_matrix(logits, labels):
  """[C, C] counts, rows = true class, columns = predicted (argmax) class."""
  logits, labels = check_inputs(logits, labels)
  num_classes = logits.shape[1]
  flat = labels * num_classes + logits.argmax(axis=1)
  return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def top_confusions(logits, labels, k=10, class_names=None):
  """The k largest off-diagonal confusion counts, largest first (ties: lower true, then predicted, index)."""
  matrix = confusion_matrix(logits, labels)
  support = matrix.sum(axis=1)
  off_diagonal = matrix * (1 - np.eye(len(matrix), dtype=matrix.dtype))
  order = np.argsort(-off_diagonal.ravel(), kind="stable")[:k]
  names = class_names or [str(i) for i in range(len(matrix))]
  rows = []
  for flat in order:
    true, predicted = divmod(int(flat), len(matrix))
    if off_diagonal[true, predicted] == 0:
      break
    rows.append(
      {
        "true": true,
        "true_species": names[true],
        "predicted": predicted,
        "predicted_species": names[predicted],
        "count": int(matrix[true, predicted]),
        "fraction_of_true": float(matrix[true, predicted] / support[true]),
      }
    )
  return rows


def region_accuracy(logits, labels, regions, regions_config):
  """{name: {"n", "top1", "top5"}} for "global" and each configured region (None when n is 0)."""
  logits, labels = check_inputs(logits, labels)
  if len(regions) != len(labels):
    raise ValueError(
      f"regions has {len(regions)} entries but there are {len(labels)} labels; "
      "pass one list of country codes per example."
    )
  ranks = label_ranks(logits, labels)
  masks = {"global": np.ones(len(labels), bool)}
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


def teacher_agreement(student_logits, teacher_logits):
  """{"top1_agree", "top5_agree", "kl_teacher_student"}: how closely the student follows the teacher."""
  student, teacher = np.asarray(student_logits), np.asarray(teacher_logits)
  if student.shape != teacher.shape or teacher.ndim != 2:
    raise ValueError(
      f"student logits {student.shape} and teacher logits {teacher.shape} must both be "
      "[N, C] with the same shape; score both on the same split and classes."
    )
  teacher, _ = check_inputs(teacher, np.zeros(len(teacher), np.int64), what="teacher logits")
  student, teacher_top1 = check_inputs(student, teacher.argmax(axis=1), what="student logits")
  ranks = label_ranks(student, teacher_top1)
  teacher_log_probs = log_softmax(teacher)
  kl = np.sum(np.exp(teacher_log_probs) * (teacher_log_probs - log_softmax(student)), axis=1)
  return {
    "top1_agree": float(np.mean(ranks < 1)),
    "top5_agree": float(np.mean(ranks < 5)),
    "kl_teacher_student": float(np.mean(kl)),
  }


def summary(logits, labels, regions, regions_config, n_bins=15, num_classes=None, what="split"):
  """The headline metrics of one set of logits, as a JSON-ready dict.

  Per-class rows and confusions are separate calls: they do not change under
  temperature scaling, so a report needs them once, not before and after.
  """
  logits, labels = check_inputs(logits, labels, num_classes, what)
  return {
    "n": int(len(labels)),
    "num_classes": int(logits.shape[1]),
    "top1": topk_accuracy(logits, labels, 1),
    "top5": topk_accuracy(logits, labels, 5),
    "macro_top1": macro_topk_accuracy(logits, labels, 1),
    "macro_top5": macro_topk_accuracy(logits, labels, 5),
    "nll": nll(logits, labels),
    "brier": brier_score(logits, labels),
    **calibration_errors(logits, labels, n_bins),
    "regions": region_accuracy(logits, labels, regions, regions_config),
  }
