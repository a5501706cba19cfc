"""The region prior's maths against NumPy written out by hand; the fit on planted scores."""

import numpy as np
import pytest

from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import region_prior

REGIONS = {"spain": ["ES"], "europe": ["ES", "FR"]}


def test_log_ratios_are_smoothed_train_frequencies_by_hand():
  labels = [0, 0, 1, 2, 2, 2]
  regions = [["ES"], ["ES"], ["FR"], ["US"], ["US"], None]
  ratios = region_prior.log_ratios(labels, regions, {**REGIONS, "asia": ["JP"]}, 4, smoothing=1.0)
  assert set(ratios) == {"spain", "europe"}  # no train image in asia
  overall = np.log([3 / 10, 2 / 10, 4 / 10, 1 / 10])  # (n_y + 1) / (6 + 4)
  spain = np.log([3 / 6, 1 / 6, 1 / 6, 1 / 6])  # two ES images, both class 0
  europe = np.log([3 / 7, 2 / 7, 1 / 7, 1 / 7])
  assert ratios["spain"]["train_images"] == 2 and ratios["europe"]["train_images"] == 3
  np.testing.assert_allclose(ratios["spain"]["log_ratio"], spain - overall)
  np.testing.assert_allclose(ratios["europe"]["log_ratio"], europe - overall)
  assert np.all(np.isfinite(ratios["spain"]["log_ratio"]))  # class 3 never seen: not ruled out
  with pytest.raises(ValueError, match="smoothing must be > 0"):
    region_prior.log_ratios(labels, regions, REGIONS, 4, smoothing=0)


def test_apply_is_the_renormalised_product_and_strength_zero_is_the_plain_model():
  rng = np.random.default_rng(0)
  probs = metrics.softmax(rng.normal(size=(5, 7)))
  prior_y_r, prior_y = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7))
  g = np.log(prior_y_r) - np.log(prior_y)
  product = probs**0.8 * (prior_y_r / prior_y) ** 1.7
  expected = product / product.sum(1, keepdims=True)
  np.testing.assert_allclose(np.exp(region_prior.apply(np.log(probs), g, 0.8, 1.7)), expected)
  np.testing.assert_allclose(np.exp(region_prior.apply(np.log(probs), g, 1.0, 0.0)), probs)


def shifted(logits, labels, beta=1.0):
  """NumPy reference of inference.shifted_summary for dense logits (offset already added)."""
  z = beta * np.asarray(logits, np.float64)
  label = z[np.arange(len(z)), labels]
  lower = np.arange(z.shape[1])[None, :] < np.asarray(labels)[:, None]
  rank = ((z > label[:, None]) | ((z == label[:, None]) & lower)).sum(1)
  log_z = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  return region_prior.ShiftedScores(log_z, z.max(1), label, rank)


def test_fit_finds_the_strength_that_the_labels_were_drawn_with():
  """Labels drawn from softmax(logits + 1.5·g): the val NLL is lowest at s = 1.5."""
  rng = np.random.default_rng(0)
  n, c = 4000, 10
  logits = rng.normal(0, 1.5, (n, c))
  g = np.log(rng.dirichlet(np.ones(c) * 0.5)) + np.log(c)
  truth = metrics.softmax(logits + 1.5 * g)
  labels = (truth.cumsum(1) > rng.random((n, 1))).argmax(1)
  strengths = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
  everything = {"spain": np.ones(n, bool)}
  views = {("spain", i): shifted(logits + s * g, labels) for i, s in enumerate(strengths)}
  fit = region_prior.fit(views, everything, strengths, temperature=1.0)
  assert fit["strength"] == 1.5 and fit["browser_strength"] == 1.5 and fit["scale"] == 1.0
  assert fit["grid"][0]["nll"] > fit["grid"][3]["nll"] < fit["grid"][5]["nll"]
  assert fit["grid"][3]["nll"] == pytest.approx(
    metrics.nll(logits + 1.5 * g, labels), rel=1e-9
  )  # the views' NLL is the dense one
  # At T = 2 the browser applies b = s / T to log softmax(logits / T): the same distribution.
  at_two = {k: shifted(logits + s * g, labels, 0.5) for k, s in zip(views, strengths)}
  fit_two = region_prior.fit(at_two, everything, strengths, temperature=2.0)
  adjusted = region_prior.apply(
    np.log(metrics.softmax(logits / 2.0)), g, fit_two["scale"], fit_two["browser_strength"]
  )
  s = fit_two["strength"]
  np.testing.assert_allclose(adjusted, metrics.log_softmax((logits + s * g) / 2.0), atol=1e-9)


def test_region_metrics_count_what_the_dense_probabilities_say():
  rng = np.random.default_rng(2)
  logits, labels = rng.normal(0, 2, (300, 8)), rng.integers(0, 8, 300)
  m = region_prior.region_metrics(shifted(logits, labels), 10, threshold=0.5)
  probs = metrics.softmax(logits)
  answered = probs.max(1) >= 0.5
  assert m["top1"] == pytest.approx(metrics.topk_accuracy(logits, labels, 1))
  assert m["top5"] == pytest.approx(metrics.topk_accuracy(logits, labels, 5))
  assert m["ece"] == pytest.approx(metrics.calibration_errors(logits, labels, 10)["ece"])
  assert m["n_accepted"] == answered.sum()
  assert m["precision"] == pytest.approx(np.mean(probs.argmax(1)[answered] == labels[answered]))


def test_the_grid_must_hold_the_plain_model():
  ratios = {"spain": {"train_images": 1, "log_ratio": np.zeros(3)}}
  keys, offsets = region_prior.offsets(ratios, [0.0, 2.0])
  assert keys == [("spain", 0), ("spain", 1)] and offsets.shape == (2, 3)
  with pytest.raises(ValueError, match="must include 0.0"):
    region_prior.offsets(ratios, [1.0, 2.0])


@pytest.mark.parametrize("keep", [None, 3], ids=["all_classes", "top_3_of_8"])
def test_ranked_under_the_prior_is_the_dense_shifted_distribution(keep):
  """What the roll-up sums with the prior: softmax((logits + s·g) / T) over the kept classes."""
  rng = np.random.default_rng(3)
  logits, labels = rng.normal(0, 2, (50, 8)), rng.integers(0, 8, 50)
  g, s, t = rng.normal(0, 1, 8), 1.5, 0.7
  scores = metrics.Scores.of(logits, labels, keep)
  got = region_prior.ranked(scores, shifted(logits + s * g, labels, 1 / t), g, s, t)
  dense = metrics.softmax((logits + s * g) / t)
  kept = scores.top_classes  # the plain model's top K, now ordered by the shifted probability
  np.testing.assert_allclose(got.probs, np.take_along_axis(dense, got.classes, 1), rtol=1e-9)
  assert np.all(np.diff(got.probs, axis=1) <= 0)
  assert (np.sort(got.classes, 1) == np.sort(kept, 1)).all()
  np.testing.assert_allclose(got.confidence, dense.max(1), rtol=1e-9)
  np.testing.assert_array_equal(got.label_rank == 0, dense.argmax(1) == labels)
