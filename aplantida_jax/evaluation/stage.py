"""Stage "evaluate": score one checkpoint, calibrate it on val, report on test.

Reads <workdir>/<checkpoint_dir>/ and <workdir>/dataset/; writes only
<workdir>/eval/: report.json, report.md, calibration.json (T and the "unsure"
threshold, which the TF.js export bakes in, and the genus / family thresholds),
region_prior.json (which the export ships) and the PNGs the report links.
Val is used only to fit T, the thresholds and the region prior's strength; test only to
report them.
"""

import json
import os

from absl import logging

from aplantida_jax import fileio
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import shards
from aplantida_jax.data.records import region_mask
from aplantida_jax.evaluation import calibration
from aplantida_jax.evaluation import metrics
from aplantida_jax.evaluation import plots
from aplantida_jax.evaluation import region_prior
from aplantida_jax.evaluation import report
from aplantida_jax.evaluation import rollup
from aplantida_jax.train import inference
from aplantida_jax.train import input_pipeline


def _checkpoint_dir(config, workdir):
  """(stage dir, note): the configured stage, else the first trained fallback, with a note saying so.

  A stage counts as trained when it holds the train loop's config.json.
  """
  wanted = config.eval.checkpoint_dir
  chain = [wanted, *config.eval.fallback_checkpoint_dirs]
  found = workdir_lib.first_trained(workdir, chain)
  if found is None:
    raise FileNotFoundError(
      f"No trained stage ({', '.join(f'{d}/' for d in chain)} with {workdir_lib.CONFIG_FILE}) "
      f"under {workdir}. Train it first, or point --config.eval.checkpoint_dir at a trained "
      "stage folder (e.g. teacher_global)."
    )
  name = os.path.relpath(found.path, workdir)
  if name == os.path.normpath(wanted):
    return wanted, ""
  note = f"{wanted}/ holds no trained stage in the workdir, so {name}/ was evaluated instead."
  logging.warning("evaluate: %s", note)
  return name, note


def _has_split(dataset_dir, split):
  try:
    return bool(shards.shard_paths(dataset_dir, split))
  except FileNotFoundError:
    return False


def _write_plots(eval_dir, config, split, test, temperature, threshold, before, after, confusions):
  """The report's PNGs; returns their file names."""
  n_bins = config.eval.n_bins
  raw = metrics.confidence_and_correct(test["scores"], test["labels"])
  confidence, correct = metrics.confidence_and_correct(test["scores"] / temperature, test["labels"])
  top1_targets = {
    "global": config.criteria.top1,
    "spain": config.criteria.spain_top1,
    "europe": config.criteria.europe_top1,
  }
  paths = [
    plots.reliability_diagram(
      metrics.reliability_bins(*raw, n_bins),
      metrics.reliability_bins(confidence, correct, n_bins),
      before["ece"],
      after["ece"],
      temperature,
      os.path.join(eval_dir, "reliability.png"),
      split,
    ),
    plots.region_accuracy_bars(
      before["regions"], top1_targets, os.path.join(eval_dir, "regions.png"), split
    ),
    plots.confidence_histogram(
      confidence, correct, threshold, os.path.join(eval_dir, "confidence.png"), split
    ),
    plots.top_confusions_chart(confusions, os.path.join(eval_dir, "confusions.png"), split),
  ]
  return [os.path.basename(path) for path in paths]


def prior_inputs(config, dataset_dir, num_classes):
  """The region prior's train-split log-ratios and its (region, strength) views, or None.

  None when config.eval.region_prior.enabled is off or no train image is in any region.
  """
  p = config.eval.region_prior
  if not p.enabled:
    return None
  train = input_pipeline.read_metadata(dataset_dir, "train")
  ratios = region_prior.log_ratios(
    train["labels"], train["regions"], config.regions.to_dict(), num_classes, p.smoothing
  )
  if not ratios:
    logging.warning("evaluate: no train image is in any of config.regions; no region prior")
    return None
  keys, offsets = region_prior.offsets(ratios, list(p.strengths))
  return {"ratios": ratios, "keys": keys, "offsets": offsets}


def _evaluate_prior(config, prior, val, test, temperature, level_groups, plain):
  """Fits the prior's strength, threshold and roll-up on val; per region on test: top-1/5, ECE,
  coverage, and the answers at each level, without and with the prior.

  `val` and `test` hold the views (ShiftedScores columns) at the plain T; `plain` is the
  plain model's {"threshold", "rollup" (rollup.shipped), "test" (test rollup.Ranked)}.
  """
  e, regions = config.eval, config.regions.to_dict()
  strengths = [float(s) for s in e.region_prior.strengths]
  val_masks = {r: region_mask(val["regions"], regions[r]) for r in prior["ratios"]}
  val_masks = {r: mask for r, mask in val_masks.items() if mask.any()}
  if not val_masks:
    return {"fitted": False, "note": "no val image is in a region with train images"}

  def views(data):
    return {
      key: region_prior.ShiftedScores.views(data["views"], i) for i, key in enumerate(prior["keys"])
    }

  val_views, test_views = views(val), views(test)
  fit = region_prior.fit(val_views, val_masks, strengths, temperature)
  best, no_prior = fit["strength_index"], strengths.index(0.0)
  confidence, correct = region_prior.pooled(val_views, val_masks, best).confidence_and_correct()
  threshold = calibration.smallest_threshold(
    confidence, correct, e.target_precision, e.min_accepted
  )

  def ranked(data, data_views, name, strength_index):
    """rollup.Ranked of every image of `data` under region `name`'s prior."""
    return region_prior.ranked(
      data["scores"],
      data_views[(name, strength_index)],
      prior["ratios"][name]["log_ratio"],
      strengths[strength_index],
      temperature,
    )

  test_masks = {r: region_mask(test["regions"], regions[r]) for r in prior["ratios"]}
  test_ranked = {
    name: ranked(test, test_views, name, best).take(m) for name, m in test_masks.items()
  }
  with_rollup = _rollup(
    config,
    level_groups,
    rollup.Ranked.concatenate(
      [ranked(val, val_views, name, best).take(mask) for name, mask in val_masks.items()]
    ),
    rollup.Ranked.concatenate(list(test_ranked.values())),
    threshold["threshold"],
  )
  per_region = {}
  for name, mask in test_masks.items():
    per_region[name] = {"n": int(mask.sum())}
    if mask.any():
      per_region[name]["without"] = region_prior.region_metrics(
        test_views[(name, no_prior)].take(mask), e.n_bins, plain["threshold"]
      )
      per_region[name]["with"] = region_prior.region_metrics(
        test_views[(name, best)].take(mask), e.n_bins, threshold["threshold"]
      )
      per_region[name]["levels_without"] = rollup.answer_levels(
        plain["test"].take(mask), plain["threshold"], level_groups, plain["rollup"]
      )
      per_region[name]["levels_with"] = rollup.answer_levels(
        test_ranked[name], threshold["threshold"], level_groups, with_rollup["shipped"]
      )
  return {
    "fitted": True,
    "smoothing": e.region_prior.smoothing,
    "train_images": {r: v["train_images"] for r, v in prior["ratios"].items()},
    "fit": fit,
    "threshold": threshold,
    "rollup": with_rollup,
    "report_regions": per_region,
  }


def _rollup(config, level_groups, val, test, species_threshold):
  """Genus and family thresholds fitted on `val`; `test` coverage and precision at every level.

  `val`, `test`: rollup.Ranked of one distribution (the plain model's, or the region prior's
  on the region images) whose species threshold is `species_threshold`.
  """
  e = config.eval
  thresholds = rollup.fit(
    val, species_threshold, level_groups, e.target_precision, e.rollup_min_accepted
  )
  shipped = rollup.shipped(thresholds, e.rollup_set_size)
  return {
    "thresholds": thresholds,
    "shipped": shipped,  # what the page uses
    "groups": {level: len(names) for level, (_, names) in level_groups.items()},
    "levels": rollup.answer_levels(test, species_threshold, level_groups, shipped),
  }


def write_evaluation(
  config, workdir, classes, fit, val, test, provenance, teacher=None, prior=None
):
  """Calibrates on `val`, scores `test` (and `teacher` on it), writes <workdir>/eval/; returns the report.

  `classes` are classes.json's rows in index order (species, family); `fit` is
  calibration.fit_temperature on val.
  `val`, `test`, `teacher` are predict_split dicts (scores, labels, regions,
  sha256; with `prior` (prior_inputs), val and test also hold its views);
  `provenance` = {"checkpoint": {...}, "splits": {...}} for the report.
  """
  e = config.eval
  names = [c["species"] for c in classes]
  eval_dir = workdir_lib.Workdir(workdir).eval
  os.makedirs(eval_dir, exist_ok=True)
  report_split = provenance["splits"]["report"]
  temperature = fit["temperature"]
  level_groups = rollup.groups(classes)
  val_ranked = rollup.Ranked.of(val["scores"], temperature)
  test_ranked = rollup.Ranked.of(test["scores"], temperature)
  threshold = calibration.abstain_threshold(
    val["scores"], val["labels"], e.target_precision, temperature, e.min_accepted
  )

  def summarise(logits, data, what):
    return metrics.summary(
      logits, data["labels"], data["regions"], config.regions.to_dict(), e.n_bins, len(names), what
    )

  test_before = summarise(test["scores"], test, report_split)
  test_after = summarise(test["scores"] / temperature, test, report_split)
  result = {
    **provenance,
    "calibration": {
      "temperature": temperature,
      "fit": fit,
      "threshold": threshold,
      "report_split": calibration.selective_metrics(
        test["scores"], test["labels"], threshold["threshold"], temperature
      ),
    },
    "val": {
      "uncalibrated": summarise(val["scores"], val, "val"),
      "calibrated": summarise(val["scores"] / temperature, val, "val"),
    },
    "test": {"uncalibrated": test_before, "calibrated": test_after},
    "per_class": metrics.per_class_table(test["scores"], test["labels"], names),
    "top_confusions": metrics.top_confusions(
      test["scores"], test["labels"], e.top_confusions, names
    ),
    "teacher_agreement": None,
    "region_prior": None,
    "rollup": _rollup(config, level_groups, val_ranked, test_ranked, threshold["threshold"]),
  }
  if prior is not None:
    plain = {
      "threshold": threshold["threshold"],
      "rollup": result["rollup"]["shipped"],
      "test": test_ranked,
    }
    result["region_prior"] = _evaluate_prior(
      config, prior, val, test, temperature, level_groups, plain
    )
  if teacher is not None:
    if list(teacher["sha256"]) != list(test["sha256"]):
      raise ValueError(
        f"The teacher {e.teacher_dir}/ and the evaluated checkpoint predicted different images "
        f"on {report_split}; both must read the same dataset/ shards."
      )
    result["teacher_agreement"] = {
      "teacher_dir": e.teacher_dir,
      "teacher_top1": metrics.topk_accuracy(teacher["scores"], test["labels"], 1),
      "teacher_top5": metrics.topk_accuracy(teacher["scores"], test["labels"], 5),
      **metrics.teacher_agreement(test["scores"], teacher["scores"]),
    }
  result["criteria"] = report.criteria_table(test_after, config.criteria)
  result["criteria_passed"] = all(
    r["passed"] for r in result["criteria"] if r["passed"] is not None
  )
  result["plots"] = _write_plots(
    eval_dir,
    config,
    report_split,
    test,
    temperature,
    threshold["threshold"],
    test_before,
    test_after,
    result["top_confusions"],
  )
  result["config"] = config.to_dict()
  report.write(result, eval_dir)
  prior_path = os.path.join(eval_dir, region_prior.FILE)
  fitted = result["region_prior"] and result["region_prior"]["fitted"]
  if fitted:
    fileio.write_json(
      prior_path, region_prior.browser_json(result["region_prior"], prior["ratios"], config.regions)
    )
  elif os.path.exists(prior_path):
    os.remove(prior_path)  # a stale prior would ship with the next export
  fileio.write_text(
    os.path.join(eval_dir, "calibration.json"),
    json.dumps(
      {
        "temperature": temperature,
        "threshold": threshold["threshold"],
        "target_precision": threshold["target_precision"],
        "threshold_reachable": threshold["reachable"],
        "coverage_val": threshold["coverage"],
        "checkpoint": result["checkpoint"],
        "num_classes": len(names),
        "region_prior": region_prior.FILE if fitted else None,
        "rollup": result["rollup"]["shipped"],
      },
      indent=2,
    ),
  )
  return result


def _prior_metric(prior):
  """ "; region prior: spain top1 0.846->1.000, ..." for the stage's one-line summary."""
  if not prior or not prior["fitted"]:
    return ""
  regions = [
    f"{name} top1 {m['without']['top1']:.3f}->{m['with']['top1']:.3f}"
    for name, m in prior["report_regions"].items()
    if m["n"]
  ]
  return "; region prior: " + ", ".join(regions) if regions else ""


def run(config, workdir):
  e = config.eval
  dataset_dir = workdir_lib.Workdir(workdir).dataset
  classes = sorted(workdir_lib.read_classes(dataset_dir), key=lambda c: c["index"])
  checkpoint, checkpoint_note = _checkpoint_dir(config, workdir)

  prior = prior_inputs(config, dataset_dir, len(classes))

  def predict(stage, split, offsets=None, beta=1.0):
    logging.info("evaluate: predicting %s/ on split %s", stage, split)
    return inference.predict_split(
      os.path.join(workdir, stage),
      dataset_dir,
      split,
      batch_size=e.batch_size,
      which=e.which,
      keep=e.kept_logits,
      offsets=offsets,
      beta=beta,
    )

  val = predict(checkpoint, "val")
  fit = calibration.fit_temperature(val["scores"], val["labels"], e.t_min, e.t_max)
  if prior is not None:
    # The prior's views are scored at the plain T, known once val is: a second pass over val.
    offsets, beta = prior["offsets"], 1.0 / fit["temperature"]
    val["views"] = predict(checkpoint, "val", offsets, beta)["views"]
  else:
    offsets, beta = None, 1.0
  report_split, split_note = "test", ""
  test = predict(checkpoint, "test", offsets, beta) if _has_split(dataset_dir, "test") else None
  if test is None or len(test["labels"]) == 0:
    report_split, test = "val", val
    split_note = (
      "The dataset has no test split, so val is both the calibration and the report split: "
      "the numbers after calibration are optimistic."
    )
    logging.warning("evaluate: %s", split_note)
  provenance = {
    "checkpoint": {"stage_dir": checkpoint, "which": e.which, "note": checkpoint_note},
    "splits": {"fit": "val", "report": report_split, "note": split_note},
  }
  teacher = predict(e.teacher_dir, report_split) if e.teacher_dir else None
  result = write_evaluation(config, workdir, classes, fit, val, test, provenance, teacher, prior)

  before, after = result["test"]["uncalibrated"], result["test"]["calibrated"]
  cal = result["calibration"]
  return {
    "metric": (
      f"{report_split} top1 {before['top1']:.3f} top5 {before['top5']:.3f} "
      f"ECE {before['ece']:.3f}->{after['ece']:.3f} T {cal['temperature']:.2f} "
      f"threshold {cal['threshold']['threshold']:.3f} "
      f"coverage {cal['report_split']['coverage']:.2f}"
      + (
        f"; teacher top1 {result['teacher_agreement']['teacher_top1']:.3f}"
        if result["teacher_agreement"]
        else ""
      )
      + _prior_metric(result["region_prior"])
    ),
    "report": workdir_lib.Workdir(workdir).eval_report,
    "criteria_passed": result["criteria_passed"],
  }
