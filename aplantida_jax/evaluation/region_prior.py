"""The region prior: what the app knows about where the user is, as a reweighting of classes.

For a user in region r the app shows p(y | x, r) ∝ p(y | x)^a · (p(y | r) / p(y))^b,
renormalised (Mac Aodha et al. 2019's location prior, with a tempering exponent). p(y | r)
and p(y) are class frequencies of the train split with additive smoothing, so no species is
ever ruled out; an image is in r when its country, else its species' regions, is listed in
config.regions (records.region_mask). "Ignore location" is a = 1, b = 0: the plain model.

Fitted on val as logits + s · g_r at the plain model's temperature T (g_r = log p(y|r) −
log p(y)): the s of a grid with the lowest val NLL of the regions' images, each under its
region's prior, pooled over the regions. As the exported graph already outputs
p = softmax(logits / T), the browser applies a = 1 and b = s / T to log p:
softmax(log p + b · g_r) = softmax((logits + s · g_r) / T) exactly. T is not refitted with
the prior: on a small val set of region images that the model already separates, a new T
runs to its search bound (BUILD.md "Region prior"). The "unsure" threshold is refitted.
The evaluate stage computes every (region, s) view on device at T, beside the plain
logits (inference.predict_split's offsets): O(N) numbers per view (ShiftedScores).
"""

import dataclasses

import numpy as np

from aplantida_jax.data.records import region_mask
from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import rollup


def log_ratios(labels, regions, regions_config, num_classes, smoothing=1.0):
  """{region: {"train_images", "log_ratio" [C]}} for regions with train images; g_r per class.

  `labels` and `regions` are the train split's (read_metadata); `smoothing` is the additive
  count α in (n_yr + α) / (N_r + α·C).
  """
  if smoothing <= 0:
    raise ValueError(
      f"region prior smoothing must be > 0 (got {smoothing}), or a species unseen in a region "
      "could never be shown there; set config.eval.region_prior.smoothing."
    )
  labels = np.asarray(labels, np.int64)

  def log_frequency(subset):
    counts = np.bincount(subset, minlength=num_classes).astype(np.float64)
    return np.log(counts + smoothing) - np.log(len(subset) + smoothing * num_classes)

  overall = log_frequency(labels)
  out = {}
  for name, countries in regions_config.items():
    mask = region_mask(regions, list(countries))
    if mask.any():
      out[name] = {
        "train_images": int(mask.sum()),
        "log_ratio": log_frequency(labels[mask]) - overall,
      }
  return out


def apply(log_probs, log_ratio, scale=1.0, strength=1.0):
  """log p(y | x, r) [N, C] from log p(y | x) [N, C]: what web/app.js computes, in NumPy."""
  return metrics.log_softmax(
    scale * np.asarray(log_probs, np.float64) + strength * np.asarray(log_ratio)
  )


def offsets(ratios, strengths):
  """(views [(region, strength index)], offsets [R·S, C] float32) for predict_split.

  `strengths` must hold 0 (the plain model: every region's "without" numbers come from it).
  """
  if 0.0 not in [float(s) for s in strengths]:
    raise ValueError(
      f"config.eval.region_prior.strengths={list(strengths)} must include 0.0, the plain model "
      "that the report compares the prior with."
    )
  views = [(name, i) for name in ratios for i in range(len(strengths))]
  rows = [strengths[i] * ratios[name]["log_ratio"] for name, i in views]
  return views, np.asarray(rows, np.float32)


FILE = "region_prior.json"  # eval/ writes it, the export ships it beside model.json


@dataclasses.dataclass(frozen=True)
class ShiftedScores(metrics.Columns):
  """softmax(logits / T + b · g) of each example, at the one temperature it was made for.

  log_z, top, label [N]: log Σ exp, max and label entry of the scaled, shifted logits; rank [N]
  the label's rank (0 = top-1, ties to the lower class). inference.shifted_summary makes them
  on device: O(N) per view instead of metrics.Scores' O(N·(K + |BETAS|)), as the fit and the
  report need the distribution only at the plain model's T.
  """

  log_z: np.ndarray
  top: np.ndarray
  label: np.ndarray
  rank: np.ndarray

  @classmethod
  def views(cls, columns, index):
    """The view `index` of predict_split's "views" columns."""
    return cls(**{name: column[index] for name, column in columns.items()})

  def nll(self):
    return float(np.mean(self.log_z - self.label))

  def confidence_and_correct(self):
    return np.exp(self.top - self.log_z), self.rank == 0


def pooled(views, masks, strength_index):
  """One ShiftedScores of each region's masked images under its region's view at `strength_index`."""
  return ShiftedScores.concatenate(
    [views[(name, strength_index)].take(mask) for name, mask in masks.items()]
  )


def ranked(scores, view, log_ratio, strength, temperature):
  """rollup.Ranked under the prior: the plain top K of `scores` reweighted by the region's
  `log_ratio` at `strength`, normalised by `view`'s exact log Z (its ShiftedScores at
  `temperature`), re-sorted. A species the prior lifts into the top K from outside the
  plain one is not counted, as rollup counts no mass outside the top K.
  """
  logits = (scores.top_logits + strength * np.asarray(log_ratio)[scores.top_classes]) / temperature
  order = np.argsort(-logits, axis=1, kind="stable")
  return rollup.Ranked(
    np.exp(np.take_along_axis(logits, order, axis=1) - view.log_z[:, None]),
    np.take_along_axis(scores.top_classes, order, axis=1),
    scores.labels,
    np.exp(view.top - view.log_z),
    view.rank,
  )


def fit(views, masks, strengths, temperature):
  """The strength of the lowest pooled val NLL at the plain `temperature`; b for the browser.

  `views` {(region, strength index): val ShiftedScores at `temperature`}; `masks` {region:
  bool [N]} of the val images in each region (at least one overall). Ties go to the weaker prior.
  """
  grid = [
    {"strength": float(s), "nll": pooled(views, masks, i).nll()} for i, s in enumerate(strengths)
  ]
  best = min(range(len(grid)), key=lambda i: (grid[i]["nll"], grid[i]["strength"]))
  return {
    "strength_index": best,
    "strength": grid[best]["strength"],
    "temperature": float(temperature),
    "scale": 1.0,
    "browser_strength": grid[best]["strength"] / temperature,
    "val_images": int(sum(m.sum() for m in masks.values())),
    "grid": grid,
  }


def region_metrics(scores, n_bins, threshold):
  """Top-1/top-5/ECE and the answers at the "unsure" `threshold` of region images' ShiftedScores."""
  confidence, correct = scores.confidence_and_correct()
  accepted = confidence >= threshold
  return {
    "top1": float(np.mean(scores.rank == 0)),
    "top5": float(np.mean(scores.rank < 5)),
    "ece": metrics.ece_of(confidence, correct, n_bins),
    "threshold": float(threshold),
    "n_accepted": int(accepted.sum()),
    "coverage": float(accepted.mean()),
    "precision": float(correct[accepted].mean()) if accepted.any() else None,
  }


def browser_json(evaluation, ratios, regions_config, digits=4):
  """What app.js reads: per region its countries and g_r; a, b, the threshold and the roll-up
  thresholds (rollup.shipped) with the prior."""
  fit = evaluation["fit"]
  return {
    "formula": "p(y|x,r) = softmax(scale * log p(y|x) + strength * log_ratio[r])",
    "scale": fit["scale"],
    "strength": fit["browser_strength"],
    "threshold": evaluation["threshold"]["threshold"],
    "rollup": evaluation["rollup"]["shipped"],
    "smoothing": evaluation["smoothing"],
    "regions": {
      name: {
        "countries": sorted(regions_config[name]),
        "train_images": ratio["train_images"],
        "log_ratio": [round(float(g), digits) for g in ratio["log_ratio"]],
      }
      for name, ratio in ratios.items()
    },
  }
