"""Genus / family roll-up and "one of these" on planted probabilities."""

import numpy as np
import pytest

from aplantida_jax.evaluation import calibration
from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import rollup

CLASSES = [
  {"species": "Rosa canina", "family": "Rosaceae"},
  {"species": "Rosa gallica", "family": "Rosaceae"},
  {"species": "Prunus avium", "family": "Rosaceae"},
  {"species": "Cistus albidus", "family": "Cistaceae"},
  {"species": "bluebell", "family": ""},  # no binomial, no family: never rolled up
]


def _ranked(probabilities, labels):
  scores = metrics.Scores.of(np.log(np.asarray(probabilities, float)), np.asarray(labels))
  return rollup.Ranked.of(scores, 1.0)


def test_groups_come_from_the_binomial_and_the_family():
  groups = rollup.groups(CLASSES)
  genus, genera = groups["genus"]
  family, families = groups["family"]
  assert genera == ["Cistus", "Prunus", "Rosa"] and families == ["Cistaceae", "Rosaceae"]
  assert genus.tolist() == [2, 2, 1, 0, rollup.NO_GROUP]
  assert family.tolist() == [1, 1, 1, 0, rollup.NO_GROUP]


def test_level_answers_sum_the_species_of_each_group():
  ranked = _ranked(
    [
      [0.40, 0.35, 0.05, 0.15, 0.05],  # Rosa 0.75 beats any species; Rosaceae 0.80
      [0.10, 0.05, 0.30, 0.25, 0.30],  # Prunus 0.30 (bluebell's 0.30 belongs to no genus)
    ],
    [1, 3],
  )
  genus = rollup.groups(CLASSES)["genus"][0]
  mass, group, correct = rollup.level_answers(ranked, genus)
  np.testing.assert_allclose(mass, [0.75, 0.30])
  assert group.tolist() == [2, 1] and correct.tolist() == [True, False]
  family = rollup.groups(CLASSES)["family"][0]
  mass, group, correct = rollup.level_answers(ranked, family)
  np.testing.assert_allclose(mass, [0.80, 0.45])
  assert group.tolist() == [1, 1] and correct.tolist() == [True, False]


def test_thresholds_are_fitted_on_what_the_level_above_left_and_every_image_gets_one_level():
  rng = np.random.default_rng(0)
  rows, labels = [], []
  for _ in range(200):  # confident species
    c = int(rng.integers(4))
    p = np.full(5, 0.01)
    p[c] = 0.96
    rows.append(p)
    labels.append(c)
  for _ in range(100):  # a Rosa, the model unsure which one: the genus is right
    p = np.array([0.45, 0.45, 0.04, 0.03, 0.03])
    rows.append(p)
    labels.append(int(rng.integers(2)))
  for _ in range(50):  # Rosaceae, genus split between Rosa and Prunus
    p = np.array([0.2, 0.2, 0.45, 0.1, 0.05])
    rows.append(p)
    labels.append(int(rng.integers(3)))
  for _ in range(50):  # hopeless: Cistaceae holds most (0.35) but the label is anywhere
    rows.append(np.array([0.1, 0.1, 0.1, 0.35, 0.35]) + rng.normal(0, 0.001, 5) ** 2)
    labels.append(int(rng.integers(5)))
  rows = np.asarray(rows) / np.sum(rows, 1, keepdims=True)
  scores = metrics.Scores.of(np.log(rows), np.asarray(labels))
  ranked = rollup.Ranked.of(scores, 1.0)
  species = calibration.abstain_threshold(scores, None, 0.95, 1.0, 10)
  assert species["threshold"] == pytest.approx(0.96, abs=1e-3)
  groups = rollup.groups(CLASSES)
  fitted = rollup.fit(ranked, species["threshold"], groups, 0.95, 3)
  assert fitted["genus"]["reachable"] and fitted["genus"]["threshold"] == pytest.approx(
    0.9, abs=1e-3
  )
  assert fitted["genus"]["n_accepted"] == 100 and fitted["genus"]["precision"] == 1.0
  # The family threshold admits the 50 Rosaceae images and, as any smallest threshold at a
  # precision target, the few hopeless ones that keep the precision at or above it.
  family = fitted["family"]
  assert family["reachable"] and family["threshold"] <= 0.85 and family["precision"] >= 0.95
  assert 50 <= family["n_accepted"] < 60
  usable = rollup.shipped(fitted, set_size=3)
  assert usable == {
    "genus": fitted["genus"]["threshold"],
    "family": family["threshold"],
    "set_size": 3,
  }
  levels = rollup.answer_levels(ranked, species["threshold"], groups, usable)
  assert [levels[k]["n"] for k in ("species", "genus")] == [200, 100]
  assert (
    levels["family"]["n"] == family["n_accepted"]
    and levels["set"]["n"] == 400 - 300 - family["n_accepted"]
  )
  assert (
    levels["genus"]["precision"] == 1.0 and levels["family"]["precision"] == family["precision"]
  )
  assert sum(m["coverage"] for m in levels.values()) == pytest.approx(1.0)
  # A level that is never answered passes its images on.
  never = rollup.answer_levels(ranked, species["threshold"], groups, {**usable, "genus": None})
  assert never["genus"]["n"] == 0 and never["family"]["n"] >= 150


def test_smallest_threshold_of_nothing_is_unreachable():
  result = calibration.smallest_threshold(np.zeros(0), np.zeros(0, bool), 0.9, 1)
  assert result["reachable"] is False and result["threshold"] == 1.0
