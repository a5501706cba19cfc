"""Temperature scaling and the "unsure" (abstain) threshold, both fitted on val.

The app shows a species only when the model is confident enough; these two
numbers make "confident" mean something: T turns logits into honest
probabilities (Guo et al. 2017), and the threshold is the lowest max-probability
at which the shown answers are right at least `target_precision` of the time.
Both are deterministic functions of (logits, labels): no seeds, no scipy. Logits are
dense [N, C] or metrics.Scores (what the evaluate stage keeps).
"""

import numpy as np

from aplantida_jax.evaluation import metrics


def _nll_derivatives(scores, beta):
  """d/dbeta and d2/dbeta2 of mean NLL(softmax(beta * logits)); the second is a variance, >= 0."""
  _, slope, curvature = scores.partition(beta)
  return float(np.mean(slope - scores.label_logit)), float(np.mean(curvature))


def fit_temperature(logits, labels, t_min=0.05, t_max=20.0, tol=1e-10, max_iter=100):
  """T in [t_min, t_max] minimising the val NLL of softmax(logits / T).

  The NLL is convex in beta = 1/T (a log-sum-exp of lines in beta minus a line),
  so its derivative is monotone and a bracketed Newton iteration (Newton step,
  bisection when the step leaves the bracket) finds the unique minimum in a few
  passes over the data: cheaper than golden-section on log T on big val sets,
  and just as deterministic. `at_bound` says the optimum hit the search range
  (e.g. a val set the model separates perfectly wants T -> 0).
  """
  scores = metrics.as_scores(logits, labels, what="val")
  if not 0 < t_min < 1 <= t_max:
    raise ValueError(f"need 0 < t_min < 1 <= t_max, got t_min={t_min}, t_max={t_max}.")
  lo, hi = 1.0 / t_max, 1.0 / t_min
  if _nll_derivatives(scores, lo)[0] >= 0:
    beta, iterations = lo, 0
  elif _nll_derivatives(scores, hi)[0] <= 0:
    beta, iterations = hi, 0
  else:
    beta = 1.0
    for iterations in range(1, max_iter + 1):  # noqa: B007  (reported after the loop)
      grad, curvature = _nll_derivatives(scores, beta)
      if grad < 0:
        lo = beta
      else:
        hi = beta
      step = beta - grad / curvature if curvature > 0 else np.nan
      new_beta = step if lo < step < hi else 0.5 * (lo + hi)
      converged = abs(new_beta - beta) <= tol * beta
      beta = new_beta
      if converged:
        break
  temperature = 1.0 / beta
  return {
    "temperature": float(temperature),
    "nll_before": metrics.nll(scores, None),
    "nll_after": metrics.nll(scores / temperature, None),
    "iterations": iterations,
    "at_bound": bool(np.isclose(temperature, t_min) or np.isclose(temperature, t_max)),
  }


def abstain_threshold(logits, labels, target_precision=0.95, temperature=1.0, min_accepted=1):
  """Smallest max-probability threshold whose accepted predictions reach `target_precision`.

  A prediction is accepted when max softmax(logits / T) >= threshold (smallest_threshold
  on the max probability and whether the argmax is right).
  """
  confidence, correct = metrics.confidence_and_correct(
    metrics.as_scores(logits, labels) / temperature, None
  )
  return {
    **smallest_threshold(confidence, correct, target_precision, min_accepted),
    "temperature": float(temperature),
  }


def smallest_threshold(confidence, correct, target_precision=0.95, min_accepted=1):
  """Smallest `confidence` threshold whose accepted answers are right >= `target_precision`.

  An answer is accepted when its confidence >= threshold; precision is the share of accepted
  answers that are right, coverage the accepted fraction. Precision is not monotone in the
  threshold, so every distinct confidence is tried and the smallest one that reaches the
  target (largest coverage) wins. A threshold must accept at least `min_accepted` answers, so
  that "precision 1.0" on two lucky images does not count. When none qualifies (or there is
  nothing to answer), the result says so: threshold 1.0, coverage 0.0, reachable False.
  """
  if not 0 < target_precision <= 1:
    raise ValueError(
      f"target_precision must be in (0, 1], got {target_precision}; "
      "set config.eval.target_precision."
    )
  confidence, correct = np.asarray(confidence), np.asarray(correct)
  order = np.argsort(-confidence, kind="stable")
  sorted_confidence = confidence[order]
  accepted = np.arange(1, len(order) + 1)
  precision = np.cumsum(correct[order]) / accepted
  # A threshold accepts a whole group of equal confidences: only group ends are candidates.
  group_end = np.append(sorted_confidence[1:] < sorted_confidence[:-1], True)[: len(order)]
  candidates = np.flatnonzero(
    group_end & (precision >= target_precision) & (accepted >= min_accepted)
  )
  result = {"target_precision": float(target_precision), "min_accepted": int(min_accepted)}
  if candidates.size == 0:
    return {
      **result,
      "threshold": 1.0,
      "coverage": 0.0,
      "n_accepted": 0,
      "precision": None,
      "reachable": False,
    }
  best = candidates[-1]
  return {
    **result,
    "threshold": float(sorted_confidence[best]),
    "coverage": float(accepted[best] / len(order)),
    "n_accepted": int(accepted[best]),
    "precision": float(precision[best]),
    "reachable": True,
  }


def selective_metrics(logits, labels, threshold, temperature=1.0):
  """Coverage and precision when predictions below `threshold` answer "unsure"."""
  confidence, correct = metrics.confidence_and_correct(
    metrics.as_scores(logits, labels) / temperature, None
  )
  accepted = confidence >= threshold
  n_accepted = int(accepted.sum())
  return {
    "threshold": float(threshold),
    "n_accepted": n_accepted,
    "coverage": float(n_accepted / len(confidence)),
    "precision": float(correct[accepted].mean()) if n_accepted else None,
  }
