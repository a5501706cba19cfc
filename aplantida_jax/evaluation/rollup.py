"""Useful uncertainty: below the species threshold, the genus or the family, else "one of these".

An answer at a level names the group (genus = the binomial's first word; family from
classes.json) with the largest summed calibrated probability of its species, when that sum
reaches the level's own threshold. Each threshold is the smallest that keeps the level's
answers right at least the target precision of the time on the val images that the levels
above leave unanswered (calibration.smallest_threshold), as iNaturalist rolls up to the
deepest taxon with enough probability. What no level answers becomes the top `set_size`
species ("one of these", as Pl@ntNet's set-valued answers). Sums run over each image's
top K species (`Ranked`; exact when K = C): mass outside them is not counted, which only
makes a level answer less often. The same fit serves the plain model and the region prior
(region_prior.ranked): each gets its own thresholds.
"""

import dataclasses

import numpy as np

from aplantida_jax.evaluation import calibration
from aplantida_jax.evaluation import metrics

LEVELS = ("genus", "family")
NO_GROUP = -1  # a species without a binomial or a family is never answered at that level


def genus_of(species: str) -> str:
  """'Rosa canina' → 'Rosa'; a name that is not a binomial ('bluebell') has no genus."""
  words = species.split()
  return words[0] if len(words) > 1 else ""


def groups(classes: list) -> dict:
  """{level: (group id per class [C] int, group names)} from classes.json rows (index order)."""
  out = {}
  for level in LEVELS:
    keys = [genus_of(c["species"]) if level == "genus" else c.get("family") or "" for c in classes]
    names = sorted({k for k in keys if k})
    index = {name: i for i, name in enumerate(names)}
    out[level] = (np.array([index.get(k, NO_GROUP) for k in keys], np.int64), names)
  return out


@dataclasses.dataclass(frozen=True)
class Ranked(metrics.Columns):
  """Each image's K most probable species under one calibrated distribution.

  probs [N, K] descending and their classes [N, K]; labels [N];
  confidence [N] the top-1 probability and label_rank [N] the label's rank (0 = right), both
  over all C classes.
  """

  probs: np.ndarray
  classes: np.ndarray
  labels: np.ndarray
  confidence: np.ndarray
  label_rank: np.ndarray

  @classmethod
  def of(cls, scores, temperature):
    """The plain model's: metrics.Scores at `temperature`."""
    calibrated = scores / temperature
    probs = np.exp(calibrated.scaled(calibrated.top_logits) - calibrated.log_partition()[:, None])
    return cls(probs, calibrated.top_classes, calibrated.labels, probs[:, 0], calibrated.label_rank)


def level_answers(ranked, group_of):
  """(mass [N], group [N], correct [N]) of each image's most probable group at this level.

  Ties go to the group of the more probable species.
  """
  group = group_of[ranked.classes]
  same = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] != NO_GROUP)
  mass = np.einsum("nk,njk->nj", ranked.probs, same)
  best = np.argmax(mass, axis=1)
  rows = np.arange(len(best))
  chosen = group[rows, best]
  return mass[rows, best], chosen, (chosen != NO_GROUP) & (chosen == group_of[ranked.labels])


def fit(ranked, species_threshold, level_groups, target_precision, min_accepted):
  """{level: smallest_threshold result}, each fitted on the val images left unanswered above."""
  open_images = ranked.confidence < species_threshold
  out = {}
  for level in LEVELS:
    mass, group, correct = level_answers(ranked, level_groups[level][0])
    candidates = open_images & (group != NO_GROUP)
    out[level] = calibration.smallest_threshold(
      mass[candidates], correct[candidates], target_precision, min_accepted
    )
    if out[level]["reachable"]:
      open_images &= ~(candidates & (mass >= out[level]["threshold"]))
  return out


def shipped(thresholds, set_size):
  """What the page reads ({genus, family: threshold or None (never), set_size}) of a fit."""
  usable = {level: t["threshold"] if t["reachable"] else None for level, t in thresholds.items()}
  return {**usable, "set_size": set_size}


def answer_levels(ranked, species_threshold, level_groups, thresholds):
  """Per level (species, genus, family, set): coverage and precision of the answers given there.

  `thresholds`: `shipped`'s {level: float or None (never answered), "set_size"}; "set"
  precision: the label is among the top set_size species. No images: coverage None.
  """
  answered = ranked.confidence >= species_threshold
  levels = {"species": (answered, ranked.label_rank == 0)}
  for level in LEVELS:
    mass, group, level_correct = level_answers(ranked, level_groups[level][0])
    threshold = thresholds[level]
    here = ~answered & (group != NO_GROUP) & (mass >= threshold if threshold is not None else False)
    levels[level] = (here, level_correct)
    answered = answered | here
  levels["set"] = (~answered, ranked.label_rank < thresholds["set_size"])
  n = len(answered)
  return {
    level: {
      "n": int(here.sum()),
      "coverage": float(here.sum() / n) if n else None,
      "precision": float(right[here].mean()) if here.any() else None,
    }
    for level, (here, right) in levels.items()
  }
