"""Useful uncertainty: below the species threshold, the genus or the family, else "one of these".

An answer at a level names the group (genus = the binomial's first word; family from
classes.json) with the largest summed calibrated probability of its species, when that sum
reaches the level's own threshold. Each threshold is the smallest that keeps the level's
answers right at least the target precision of the time on the val images that the levels
above leave unanswered (calibration.smallest_threshold), as iNaturalist rolls up to the
deepest taxon with enough probability. What no level answers becomes the top `set_size`
species ("one of these", as Pl@ntNet's set-valued answers). Sums run over each image's
top K species (metrics.Scores; exact when K = C): mass outside them is not counted, which
only makes a level answer less often.
"""

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


def level_answers(scores, group_of):
  """(mass [N], group [N], correct [N]) of each image's most probable group at this level.

  `scores` at the temperature to use; ties go to the group of the more probable species.
  """
  probs = np.exp(scores.scaled(scores.top_logits) - scores.log_partition()[:, None])
  group = group_of[scores.top_classes]
  same = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] != NO_GROUP)
  mass = np.einsum("nk,njk->nj", probs, same)
  best = np.argmax(mass, axis=1)
  rows = np.arange(len(best))
  chosen = group[rows, best]
  return mass[rows, best], chosen, (chosen != NO_GROUP) & (chosen == group_of[scores.labels])


def fit(scores, temperature, species_threshold, level_groups, target_precision, min_accepted):
  """{level: smallest_threshold result}, each fitted on the val images left unanswered above."""
  calibrated = scores / temperature
  confidence, _ = metrics.confidence_and_correct(calibrated, None)
  open_images = confidence < species_threshold
  out = {}
  for level in LEVELS:
    mass, group, correct = level_answers(calibrated, level_groups[level][0])
    candidates = open_images & (group != NO_GROUP)
    out[level] = calibration.smallest_threshold(
      mass[candidates], correct[candidates], target_precision, min_accepted
    )
    if out[level]["reachable"]:
      open_images &= ~(candidates & (mass >= out[level]["threshold"]))
  return out


def answer_levels(scores, temperature, species_threshold, level_groups, thresholds, set_size=3):
  """Per level (species, genus, family, set): coverage and precision of the answers given there.

  `thresholds` {level: float or None (never answered)}; "set" precision: the label is among the
  top `set_size` species.
  """
  calibrated = scores / temperature
  confidence, correct = metrics.confidence_and_correct(calibrated, None)
  answered = confidence >= species_threshold
  levels = {"species": (answered, correct)}
  for level in LEVELS:
    mass, group, level_correct = level_answers(calibrated, level_groups[level][0])
    threshold = thresholds[level]
    here = ~answered & (group != NO_GROUP) & (mass >= threshold if threshold is not None else False)
    levels[level] = (here, level_correct)
    answered = answered | here
  levels["set"] = (~answered, calibrated.label_rank < set_size)
  n = len(confidence)
  return {
    level: {
      "n": int(here.sum()),
      "coverage": float(here.sum() / n),
      "precision": float(right[here].mean()) if here.any() else None,
    }
    for level, (here, right) in levels.items()
  }
