"""Evaluation: metrics against hand-computed cases, calibration on planted models, plots, the stage."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.evaluation import calibration
from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import plots
from aplantida_jax.evaluation import report
from configs import evaluate

REGIONS = {"spain": ["ES"], "europe": ["ES", "FR", "PT"]}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def logits_of(probs):
  """Logits whose softmax is exactly `probs` (up to rounding)."""
  return np.log(np.asarray(probs, np.float64))


def sample_labels(probs, rng):
  """One label per row drawn from that row's distribution."""
  return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


# --- metrics on hand-computed cases ---------------------------------------------------------------


def test_topk_ties_go_to_lower_index_like_argmax():
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  labels = np.array([0, 2, 1, 0])
  # ranks: 0 (hit); 1 (class 1 above); 1 (tie with class 0, which wins); 1 (class 2 above; tie with 1 loses)
  np.testing.assert_array_equal(metrics.label_ranks(logits, labels), [0, 1, 1, 1])
  assert metrics.topk_accuracy(logits, labels, 1) == 0.25
  assert metrics.topk_accuracy(logits, labels, 2) == 1.0
  assert metrics.topk_accuracy(np.zeros((3, 4)), np.array([0, 1, 2]), 1) == pytest.approx(1 / 3)


def test_macro_accuracy_and_per_class_table():
  logits = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  labels = np.array([0, 2, 1, 0])
  # class 0: 1 of 2 right; class 1: 0 of 1; class 2: 0 of 1 → macro = (0.5 + 0 + 0) / 3
  assert metrics.macro_topk_accuracy(logits, labels, 1) == pytest.approx(1 / 6)
  table = metrics.per_class_table(logits, labels, ["a", "b", "c"])
  assert [(r["species"], r["support"], r["top1"]) for r in table] == [
    ("a", 2, 0.5),
    ("b", 1, 0.0),
    ("c", 1, 0.0),
  ]
  # A class with no examples has no accuracy (None), and does not count in the macro mean.
  table = metrics.per_class_table(np.hstack([logits, np.full((4, 1), -9.0)]), labels)
  assert table[3] == {"index": 3, "species": "3", "support": 0, "top1": None, "top5": None}
  assert metrics.macro_topk_accuracy(
    np.hstack([logits, np.full((4, 1), -9.0)]), labels, 1
  ) == pytest.approx(1 / 6)


def test_nll_brier_ece_mce_by_hand():
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
  labels = np.array([0, 2])
  logits = logits_of(probs)
  assert metrics.nll(logits, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
  # (0.3² + 0.2² + 0.1²) = 0.14 and (0.1² + 0.6² + 0.7²) = 0.86
  assert metrics.brier_score(logits, labels) == pytest.approx(0.5)
  # One right at confidence 0.7 (gap 0.3), one wrong at 0.6 (gap 0.6), different bins.
  errors = metrics.calibration_errors(logits, labels, n_bins=10)
  assert errors["ece"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.6)
  assert errors["mce"] == pytest.approx(0.6)
  # With one bin the gaps cancel: mean accuracy 0.5 vs mean confidence 0.65.
  assert metrics.calibration_errors(logits, labels, n_bins=1)["ece"] == pytest.approx(0.15)


def test_confusions_by_hand():
  labels = np.array([0, 0, 0, 1, 1, 2])
  predicted = np.array([1, 1, 0, 0, 1, 1])
  logits = np.eye(3)[predicted] * 5.0
  assert metrics.confusion_counts(logits, labels) == {
    (0, 0): 1,
    (0, 1): 2,
    (1, 0): 1,
    (1, 1): 1,
    (2, 1): 1,
  }
  rows = metrics.top_confusions(logits, labels, k=2, class_names=["a", "b", "c"])
  assert [(r["true_species"], r["predicted_species"], r["count"]) for r in rows] == [
    ("a", "b", 2),
    ("b", "a", 1),
  ]
  assert rows[0]["fraction_of_true"] == pytest.approx(2 / 3)
  assert len(metrics.top_confusions(logits, labels, k=10)) == 3  # only non-zero pairs
  assert metrics.top_confusions(np.eye(3) * 5.0, np.arange(3)) == []


def test_region_accuracy_by_hand():
  logits = np.eye(3)[[0, 1, 2, 0]] * 5.0
  labels = np.array([0, 0, 2, 1])  # right, wrong, right, wrong
  regions = [["ES"], ["FR"], ["US"], ["ES", "PT"]]
  result = metrics.region_accuracy(logits, labels, regions, REGIONS)
  assert result["global"] == {"n": 4, "top1": 0.5, "top5": 1.0}
  assert result["spain"] == {"n": 2, "top1": 0.5, "top5": 1.0}
  assert result["europe"] == {"n": 3, "top1": pytest.approx(1 / 3), "top5": 1.0}
  none = metrics.region_accuracy(logits, labels, [["US"]] * 4, REGIONS)["spain"]
  assert none == {"n": 0, "top1": None, "top5": None}


def test_teacher_agreement_by_hand():
  student = logits_of([[0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
  teacher = logits_of([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
  result = metrics.teacher_agreement(student, teacher)
  kl = (
    (0.2 * math.log(0.2 / 0.6) + 0.7 * math.log(0.7 / 0.3))
    + (0.1 * math.log(0.1 / 0.2) + 0.8 * math.log(0.8 / 0.7))
  ) / 2
  assert result["top1_agree"] == 0.5
  assert result["kl_teacher_student"] == pytest.approx(kl)
  assert metrics.teacher_agreement(teacher, teacher)["kl_teacher_student"] == pytest.approx(
    0.0, abs=1e-12
  )
  # Top-5 agree: the teacher's top-1 is among the student's 5 highest (here at rank 4, then rank 5).
  ranked = np.array([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 2)
  teacher_top = np.eye(7)[[4, 5]]
  assert metrics.teacher_agreement(ranked, teacher_top)["top5_agree"] == 0.5


# --- calibration on synthetic models with known answers --------------------------------------------


def test_ece_of_a_perfectly_calibrated_model_is_near_zero():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=2.0, size=(200_000, 10))
  labels = sample_labels(metrics.softmax(logits), rng)
  assert metrics.calibration_errors(logits, labels)["ece"] < 0.01


def test_ece_of_known_miscalibration_matches_analytic_value():
  # 1000 predictions at confidence 0.75 of which 600 are right (gap 0.15) and 1000 at 0.95 with 950 right.
  probs = np.array([[0.75, 0.25]] * 1000 + [[0.05, 0.95]] * 1000)
  labels = np.array([0] * 600 + [1] * 400 + [1] * 950 + [0] * 50)
  errors = metrics.calibration_errors(logits_of(probs), labels, n_bins=15)
  assert errors["ece"] == pytest.approx(0.5 * 0.15 + 0.5 * 0.0)
  assert errors["mce"] == pytest.approx(0.15)


def test_ece_of_an_overconfident_model_matches_its_expectation():
  # Labels come from softmax(z) but the model reports softmax(2z): the expected accuracy in each
  # bin is the true probability of the predicted class, so the ECE is known without sampling.
  rng = np.random.default_rng(1)
  z = rng.normal(scale=1.5, size=(100_000, 10))
  true_probs = metrics.softmax(z)
  labels = sample_labels(true_probs, rng)
  reported = 2 * z
  confidence, _ = metrics.confidence_and_correct(reported, labels)
  expected_correct = true_probs[np.arange(len(z)), reported.argmax(axis=1)]
  bins = metrics.reliability_bins(confidence, expected_correct, 15)
  filled = bins["count"] > 0
  analytic = np.sum(
    bins["count"][filled] / len(z) * np.abs(bins["accuracy"] - bins["confidence"])[filled]
  )
  assert analytic > 0.1  # really miscalibrated
  assert metrics.calibration_errors(reported, labels)["ece"] == pytest.approx(analytic, abs=0.01)


@pytest.mark.parametrize("planted", [0.5, 2.5])
def test_temperature_fit_recovers_planted_temperature(planted):
  rng = np.random.default_rng(2)
  logits = rng.normal(scale=3.0, size=(50_000, 10))
  labels = sample_labels(metrics.softmax(logits / planted), rng)
  fit = calibration.fit_temperature(logits, labels)
  assert fit["temperature"] == pytest.approx(planted, rel=0.05)
  assert fit["nll_after"] < fit["nll_before"] and not fit["at_bound"]
  assert calibration.fit_temperature(logits, labels) == fit  # deterministic
  ece_before = metrics.calibration_errors(logits, labels)["ece"]
  assert metrics.calibration_errors(logits / fit["temperature"], labels)["ece"] < ece_before / 2


def test_temperature_fit_reports_the_bound_on_a_separable_val_set():
  logits = np.eye(4)[[0, 1, 2, 3, 0]] * 3.0
  fit = calibration.fit_temperature(logits, np.array([0, 1, 2, 3, 0]), t_min=0.1)
  assert fit["temperature"] == pytest.approx(0.1) and fit["at_bound"]


def test_abstain_threshold_is_the_smallest_reaching_the_target_precision():
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=2.5, size=(2000, 8))
  labels = sample_labels(metrics.softmax(logits), rng)
  result = calibration.abstain_threshold(logits, labels, target_precision=0.9)
  confidence, correct = metrics.confidence_and_correct(logits, labels)
  accepted = confidence >= result["threshold"]
  assert result["reachable"] and correct[accepted].mean() >= 0.9
  assert result["coverage"] == pytest.approx(accepted.mean()) and 0 < result["coverage"] < 1
  assert result["precision"] == pytest.approx(correct[accepted].mean())
  for lower in np.unique(confidence[confidence < result["threshold"]]):
    assert correct[confidence >= lower].mean() < 0.9
  test_view = calibration.selective_metrics(logits, labels, result["threshold"])
  assert (
    test_view["coverage"] == result["coverage"] and test_view["precision"] == result["precision"]
  )


def test_abstain_threshold_says_when_the_target_is_unreachable():
  logits = np.eye(3)[[1, 2, 0, 1]] * 4.0
  result = calibration.abstain_threshold(logits, np.array([0, 0, 1, 2]), target_precision=0.95)
  assert result == {
    "target_precision": 0.95,
    "temperature": 1.0,
    "min_accepted": 1,
    "threshold": 1.0,
    "coverage": 0.0,
    "n_accepted": 0,
    "precision": None,
    "reachable": False,
  }
  # Two confident right answers reach precision 1.0, but not when a threshold must answer 3 images.
  logits, labels = np.eye(3)[[0, 1, 2, 0]] * [[4.0], [4.0], [1.0], [1.0]], np.array([0, 1, 0, 1])
  assert calibration.abstain_threshold(logits, labels, 0.95)["n_accepted"] == 2
  assert not calibration.abstain_threshold(logits, labels, 0.95, min_accepted=3)["reachable"]


# --- kept scores (what the stage keeps instead of [N, C] logits) -------------------------------


def _planted_logits(n, c, temperature, seed):
  """Logits of a wide, imperfect model and labels drawn from softmax(logits / temperature)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(scale=3.0, size=(n, c))
  logits[:, :3] = np.round(logits[:, :3])  # ties, broken to the lower class
  return logits, sample_labels(metrics.softmax(logits / temperature), rng)


def test_device_compression_keeps_what_the_dense_metrics_need():
  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax.train import inference  # pylint: disable=g-import-not-at-top

  logits, labels = _planted_logits(600, 300, 1.4, seed=0)
  device = jax.device_get(
    jax.jit(inference.compress, static_argnums=2)(
      logits.astype(np.float32), labels.astype(np.int32), 8
    )
  )
  assert device.pop("finite").all()
  kept = metrics.Scores(**device, labels=labels, num_classes=300)
  # Ties go to the lower class, on device as in numpy: both labels here rank second.
  tied = jax.device_get(
    jax.jit(inference.compress, static_argnums=2)(
      np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], np.float32), np.array([1, 2], np.int32), 2
    )
  )
  np.testing.assert_array_equal(tied["label_rank"], [1, 1])
  np.testing.assert_array_equal(tied["top_classes"], [[0, 1], [1, 2]])
  want = metrics.Scores.of(logits.astype(np.float32), labels, k=8)
  for field in ("top_classes", "label_rank"):
    np.testing.assert_array_equal(getattr(kept, field), getattr(want, field))
  for field in ("top_logits", "tail_logit", "label_logit", "log_z", "dlog_z"):
    np.testing.assert_allclose(getattr(kept, field), getattr(want, field), rtol=1e-5, atol=1e-4)

  # Counts are exact; probabilities match the dense logits at any temperature.
  for t in (1.0, 0.6, 2.5):
    dense = metrics.summary(logits / t, labels, [["ES"]] * 600, REGIONS)
    compact = metrics.summary(kept / t, labels, [["ES"]] * 600, REGIONS)
    for key in ("top1", "top5", "macro_top1", "macro_top5", "regions"):
      assert compact[key] == dense[key]
    for key in ("nll", "brier", "ece", "mce"):
      assert compact[key] == pytest.approx(dense[key], abs=5e-4), key
  assert metrics.per_class_table(kept, labels) == metrics.per_class_table(logits, labels)
  assert metrics.top_confusions(kept, labels) == metrics.top_confusions(logits, labels)
  dense_fit, kept_fit = (calibration.fit_temperature(x, labels) for x in (logits, kept))
  assert kept_fit["temperature"] == pytest.approx(dense_fit["temperature"], rel=2e-3)
  assert abs(dense_fit["temperature"] - 1.4) < 0.1  # the planted one
  dense_cut, kept_cut = (calibration.abstain_threshold(x, labels, 0.6, 1.4) for x in (logits, kept))
  assert kept_cut["threshold"] == pytest.approx(dense_cut["threshold"], rel=1e-4)
  assert kept_cut["coverage"] == pytest.approx(dense_cut["coverage"], abs=2 / 600)
  teacher_logits = logits + np.random.default_rng(1).normal(size=logits.shape)
  dense_agree = metrics.teacher_agreement(logits, teacher_logits)
  agree = metrics.teacher_agreement(kept, metrics.Scores.of(teacher_logits, labels, 8))
  assert 0.2 < dense_agree["top1_agree"] < 0.9  # neither vacuous nor trivial
  assert agree["top1_agree"] == dense_agree["top1_agree"]
  assert agree["top5_agree"] == dense_agree["top5_agree"]
  # The KL is exact when every class is kept (here it spreads each tail evenly).
  exact = metrics.teacher_agreement(
    metrics.Scores.of(logits, labels), metrics.Scores.of(teacher_logits, labels)
  )
  assert exact["kl_teacher_student"] == pytest.approx(dense_agree["kl_teacher_student"], rel=1e-9)


def test_report_memory_does_not_grow_with_images_times_classes():
  """Scoring and calibrating 3,000 classes allocates O(N·K), not the N×C a dense pass would."""
  import tracemalloc  # pylint: disable=g-import-not-at-top

  peaks = {}
  for n in (500, 2000):
    logits, labels = _planted_logits(n, 3000, 1.0, seed=n)
    kept = metrics.Scores.of(logits, labels, k=32)
    del logits
    tracemalloc.start()
    fit = calibration.fit_temperature(kept, labels)
    metrics.summary(kept / fit["temperature"], labels, [["ES"]] * n, REGIONS)
    calibration.abstain_threshold(kept, labels, 0.5, fit["temperature"])
    metrics.per_class_table(kept, labels)
    metrics.top_confusions(kept, labels)
    peaks[n] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  dense_growth = (2000 - 500) * 3000 * 8  # one float64 [N, C] array more
  assert peaks[2000] - peaks[500] < dense_growth / 10, peaks
  assert peaks[2000] < 2000 * 3000 * 8 / 4, peaks


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "logits, labels, message",
  [
    (np.zeros((0, 3)), np.zeros(0, int), "empty split"),
    (np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]]), np.array([0, 1]), "NaN/inf"),
    (np.array([[0.0, np.inf, 1.0]]), np.array([0]), "NaN/inf"),
    (np.zeros((2, 3)), np.array([0, 3]), "outside the class range"),
    (np.zeros((2, 3)), np.array([-1, 0]), "outside the class range"),
    (np.zeros((2, 3)), np.array([0, 1, 2]), "does not match"),
    (np.zeros(3), np.array([0]), r"\[N, C\]"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), "integers"),
  ],
)
def test_bad_input_is_a_clear_error(logits, labels, message):
  for compute in (
    lambda: metrics.summary(logits, labels, [["ES"]] * len(labels), REGIONS),
    lambda: calibration.fit_temperature(logits, labels),
    lambda: calibration.abstain_threshold(logits, labels),
  ):
    with pytest.raises(ValueError, match=message):
      compute()


def test_class_count_and_teacher_shape_mismatches_are_clear_errors():
  with pytest.raises(ValueError, match="classes.json lists 4"):
    metrics.summary(np.zeros((2, 3)), np.array([0, 1]), [[], []], REGIONS, num_classes=4)
  with pytest.raises(ValueError, match="same shape"):
    metrics.teacher_agreement(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="regions has 1 entries"):
    metrics.region_accuracy(np.zeros((2, 3)), np.array([0, 1]), [["ES"]], REGIONS)


# --- report --------------------------------------------------------------------------------------


def test_criteria_table_judges_what_evaluation_measures():
  criteria = evaluate.get_config().criteria
  measured = {
    "top1": 0.8,
    "top5": 0.89,
    "ece": 0.12,
    "num_classes": 10,
    "regions": {"spain": {"n": 5, "top1": 0.9}, "europe": {"n": 0, "top1": None}},
  }
  rows = {r["criterion"]: r for r in report.criteria_table(measured, criteria)}
  assert [
    rows[name]["passed"]
    for name in (
      "global top-1",
      "global top-5",
      "Spain top-1",
      "Europe top-1",
      "ECE (after temperature scaling)",
    )
  ] == [True, False, True, None, False]
  assert (
    rows["model size (MB)"]["passed"] is None and "export_tfjs" in rows["model size (MB)"]["note"]
  )
  assert rows["licence check passes"]["passed"] is None


# --- plots ----------------------------------------------------------------------------------------


def assert_png(path, min_bytes=5000):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes
  with Image.open(path) as image:
    image.load()
    assert image.width > 300 and image.height > 200


def test_plots_are_valid_png(tmp_path):
  rng = np.random.default_rng(4)
  logits = rng.normal(scale=2.0, size=(500, 6))
  labels = sample_labels(metrics.softmax(logits / 2), rng)
  confidence, correct = metrics.confidence_and_correct(logits, labels)
  calibrated = metrics.confidence_and_correct(logits / 2, labels)
  regions = metrics.region_accuracy(logits, labels, [["ES"]] * 200 + [["FR"]] * 300, REGIONS)
  names = ["Lavandula stoechas", "Rosmarinus officinalis", "Thymus vulgaris", "d", "e", "f"]
  paths = [
    plots.reliability_diagram(
      metrics.reliability_bins(confidence, correct),
      metrics.reliability_bins(*calibrated),
      0.2,
      0.02,
      2.0,
      str(tmp_path / "reliability.png"),
    ),
    plots.region_accuracy_bars(
      regions, {"global": 0.75, "spain": 0.88}, str(tmp_path / "regions.png")
    ),
    plots.confidence_histogram(*calibrated, 0.6, str(tmp_path / "confidence.png")),
    plots.top_confusions_chart(
      metrics.top_confusions(logits, labels, 5, names), str(tmp_path / "conf.png")
    ),
    plots.top_confusions_chart([], str(tmp_path / "no_confusions.png")),
  ]
  for path in paths:
    assert_png(path)
  assert sorted(os.listdir(tmp_path)) == sorted(
    os.path.basename(p) for p in paths
  )  # no temp files left


# --- the stage on tiny shards and a tiny trained checkpoint ---------------------------------------


class _Variables:
  """What StageCheckpoints.maybe_save_best reads from a train state."""

  def __init__(self, variables):
    self.variables = variables

  def eval_variables(self):
    return self.variables


def _he_init(path, shape_dtype, rng):
  """Random weights by leaf name: He-normal kernels, unit scales/variances, zero biases/means."""
  name = path[-1].key
  if name in ("scale", "var"):
    return np.ones(shape_dtype.shape, np.float32)
  if name in ("bias", "mean"):
    return np.zeros(shape_dtype.shape, np.float32)
  fan_in = max(1, int(np.prod(shape_dtype.shape[:-1])))
  return (rng.normal(size=shape_dtype.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir with dataset/ (train/val/test) and teacher_global/: a MobileNetV2-0.35 with random
  He-normal weights saved in the train loop's real layout (config.json + orbax best checkpoint).
  Evaluation needs a real checkpoint, not a good one; shapes come from jax.eval_shape because
  compiling model.init (or training) costs minutes on 2 busy cores.
  """
  pytest.importorskip("aplantida_jax.train.inference", reason="train/inference.py not written yet")
  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top
  from configs import teacher_global  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tests import tiny_dataset  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("evaluate")
  tiny_dataset.write_tiny_dataset(
    str(workdir / "dataset"), num_classes=3, size=32, per_class={"train": 2, "val": 8, "test": 8}
  )
  config = helpers.use_model(
    teacher_global.get_config("demo"),
    kwargs={
      "width_coefficient": 0.5,
      "depth_coefficient": 0.34,
      "dropout_rate": 0.1,
      "bn_momentum": 0.9,
    },
  )
  config.input.image_size = 32
  config = loop.resolve_config(config, 3)
  stage_dir = workdir / "teacher_global"
  stage_dir.mkdir()
  fileio.write_json(str(stage_dir / workdir_lib.CONFIG_FILE), config.to_dict())
  shapes = jax.eval_shape(
    lambda: models.from_config(config.model).init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 32, 32, 3)), train=False
    )
  )
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(lambda path, leaf: _he_init(path, leaf, rng), shapes)
  checkpoints = checkpointing.StageCheckpoints(str(stage_dir), config.checkpoint)
  checkpoints.maybe_save_best(1, _Variables(variables), {"val_top1": 0.5})
  checkpoints.close()
  return workdir


def test_stage_writes_report_calibration_and_plots(trained_workdir):
  from tests.helpers import run_main  # pylint: disable=g-import-not-at-top

  proc = run_main(
    "configs/evaluate.py:demo,teacher_dir=teacher_global",
    trained_workdir,
    JAX_COMPILATION_CACHE_DIR=str(trained_workdir / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (
    "student/finetune/ holds no trained stage" in proc.stderr
  )  # fell back to the teacher, and said so
  eval_dir = trained_workdir / "eval"
  result = json.loads((eval_dir / "report.json").read_text())
  calibration_file = json.loads((eval_dir / "calibration.json").read_text())
  assert (
    result["checkpoint"]["stage_dir"] == "teacher_global"
    and "instead" in result["checkpoint"]["note"]
  )
  assert result["splits"] == {"fit": "val", "report": "test", "note": ""}
  assert result["test"]["uncalibrated"]["n"] == 24 and result["val"]["uncalibrated"]["n"] == 24
  before, after = result["test"]["uncalibrated"], result["test"]["calibrated"]
  assert before["top1"] == after["top1"] and before["regions"] == after["regions"]
  assert after["nll"] != before["nll"] or result["calibration"]["temperature"] == pytest.approx(1.0)
  assert (
    set(before["regions"]) == {"global", "spain", "europe"} and before["regions"]["spain"]["n"] == 9
  )
  assert calibration_file["temperature"] == result["calibration"]["temperature"] > 0
  assert calibration_file["threshold"] == result["calibration"]["threshold"]["threshold"]
  assert calibration_file["checkpoint"]["stage_dir"] == "teacher_global"
  # The same checkpoint as its own teacher agrees with itself exactly.
  assert result["teacher_agreement"]["top1_agree"] == 1.0
  assert result["teacher_agreement"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
  criteria = {row["criterion"]: row for row in result["criteria"]}
  assert criteria["global top-1"]["value"] == before["top1"]
  assert criteria["global top-1"]["passed"] == (before["top1"] >= 0.75)
  assert "top-5 is always right" in criteria["global top-5"]["note"]  # 3 classes
  assert criteria["licence check passes"]["passed"] is None
  assert len(result["per_class"]) == 3 and sum(r["support"] for r in result["per_class"]) == 24
  markdown = (eval_dir / "report.md").read_text()
  for name in result["plots"]:
    assert f"]({name})" in markdown
    assert_png(str(eval_dir / name))
  assert sorted(result["plots"]) == [
    "confidence.png",
    "confusions.png",
    "regions.png",
    "reliability.png",
  ]
  assert not [name for name in os.listdir(eval_dir) if name.endswith(".tmp")]
  # The region prior: fitted on val, reported per region with and without, shipped as JSON.
  prior = result["region_prior"]
  assert prior["fitted"] and calibration_file["region_prior"] == "region_prior.json"
  assert prior["fit"]["strength"] in evaluate.get_config().eval.region_prior.strengths
  assert [g["strength"] for g in prior["fit"]["grid"]] == list(
    evaluate.get_config().eval.region_prior.strengths
  )
  for name in ("spain", "europe"):
    region = prior["report_regions"][name]
    assert region["n"] == before["regions"][name]["n"]
    assert region["without"]["top1"] == pytest.approx(before["regions"][name]["top1"])
    assert region["with"]["threshold"] == prior["threshold"]["threshold"]
    for which in ("without", "with"):  # every region image gets one level, with either prior
      levels = region[f"levels_{which}"]
      assert sum(m["n"] for m in levels.values()) == region["n"]
      assert levels["species"]["n"] == region[which]["n_accepted"]
  shipped = json.loads((eval_dir / "region_prior.json").read_text())
  temperature = result["calibration"]["temperature"]
  assert shipped["strength"] == pytest.approx(prior["fit"]["strength"] / temperature)
  assert set(shipped["regions"]) == {"spain", "europe"}
  assert len(shipped["regions"]["spain"]["log_ratio"]) == 3
  assert shipped["rollup"] == prior["rollup"]["shipped"] and set(shipped["rollup"]) == {
    "genus",
    "family",
    "set_size",
  }
  assert "## Region prior" in markdown and "When unsure, with the prior" in markdown
  # Below the species threshold: genus, family, "one of these"; every test image gets one level.
  levels = result["rollup"]["levels"]
  assert list(levels) == ["species", "genus", "family", "set"]
  assert sum(m["n"] for m in levels.values()) == 24
  assert levels["species"]["n"] == result["calibration"]["report_split"]["n_accepted"]
  for level in ("genus", "family"):
    fitted = result["rollup"]["thresholds"][level]
    assert calibration_file["rollup"][level] == (
      fitted["threshold"] if fitted["reachable"] else None
    )
  assert "## When unsure" in markdown


def test_stage_without_test_split_reports_on_val_and_says_so(trained_workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  from aplantida_jax.evaluation import stage  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "w"
  shutil.copytree(trained_workdir / "dataset", workdir / "dataset")
  shutil.copytree(trained_workdir / "teacher_global", workdir / "student" / "finetune")
  for path in (workdir / "dataset" / "splits").glob("test.*"):
    path.unlink()
  summary = stage.run(evaluate.get_config("demo,teacher_dir="), str(workdir))
  result = json.loads((workdir / "eval" / "report.json").read_text())
  assert result["checkpoint"] == {"stage_dir": "student/finetune", "which": "best", "note": ""}
  assert result["splits"]["report"] == "val" and "no test split" in result["splits"]["note"]
  assert "no test split" in (workdir / "eval" / "report.md").read_text()
  assert summary["metric"].startswith("val top1")


def test_stage_without_checkpoint_is_a_clear_error(tmp_path):
  pytest.importorskip("aplantida_jax.train.inference", reason="train/inference.py not written yet")
  from aplantida_jax.evaluation import stage  # pylint: disable=g-import-not-at-top
  from tests import tiny_dataset  # pylint: disable=g-import-not-at-top

  tiny_dataset.write_tiny_dataset(str(tmp_path / "dataset"), num_classes=2, per_class={"val": 2})
  with pytest.raises(FileNotFoundError, match="Train it first"):
    stage.run(evaluate.get_config("demo"), str(tmp_path))
