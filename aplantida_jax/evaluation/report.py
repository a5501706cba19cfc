"""eval/report.json (for machines) and eval/report.md (for people).

The report carries the user's success criteria (DESIGN.md) as a pass/fail
table. Accuracy and calibration are measured here; size, latency, licence and
reproducibility belong to later stages, so their rows are filled from those
stages' outputs when the workdir already holds them, and otherwise say which
stage measures them (passed = null), never a guess.
"""

import json
import os

from aplantida_jax import fileio

METRIC_LABELS = {
  "top1": "top-1 accuracy",
  "top5": "top-5 accuracy",
  "macro_top1": "macro top-1 (mean over species)",
  "macro_top5": "macro top-5 (mean over species)",
  "nll": "NLL (nats)",
  "brier": "Brier score (0 best, 2 worst)",
  "ece": "ECE",
  "mce": "MCE",
}


def _row(criterion, target, value, passed, note=""):
  return {"criterion": criterion, "target": target, "value": value, "passed": passed, "note": note}


def _at_least(criterion, target, value, note=""):
  return _row(
    criterion,
    f">= {target}",
    value,
    None if value is None else bool(value >= target),
    note or ("" if value is not None else "no images of this region in the report split"),
  )


def criteria_table(report_metrics, criteria):
  """Rows {criterion, target, value, passed, note}; passed is None when not measurable here."""
  regions = report_metrics["regions"]
  rows = [
    _at_least("global top-1", criteria.top1, report_metrics["top1"]),
    _at_least(
      "global top-5",
      criteria.top5,
      report_metrics["top5"],
      f"only {report_metrics['num_classes']} classes: top-5 is always right"
      if report_metrics["num_classes"] <= 5
      else "",
    ),
    _at_least("Spain top-1", criteria.spain_top1, regions.get("spain", {}).get("top1")),
    _at_least("Europe top-1", criteria.europe_top1, regions.get("europe", {}).get("top1")),
    _row(
      "ECE (after temperature scaling)",
      f"< {criteria.ece}",
      report_metrics["ece"],
      bool(report_metrics["ece"] < criteria.ece),
    ),
  ]
  # Measured by later stages (data flows one way): the run manifest fills these in.
  rows.append(
    _row(
      "model size (MB)",
      f"<= {criteria.size_mb}",
      None,
      None,
      "measured by the export_tfjs stage; see manifest.json success_criteria",
    )
  )
  rows.append(
    _row(
      "inference time GPU / CPU (s)",
      f"< {criteria.latency_gpu_s} / < {criteria.latency_cpu_s}",
      None,
      None,
      "measured by tools/bench.py infer and bench.py browser",
    )
  )
  rows.append(
    _row(
      "licence check passes",
      "true",
      None,
      None,
      "measured by the license_check stage; see manifest.json success_criteria",
    )
  )
  rows.append(
    _row(
      "fixed seeds give identical results; manifest complete",
      "true",
      None,
      None,
      "checked by the pipeline manifest (manifest.json) and tests/test_pipeline.py",
    )
  )
  return rows


def _fmt(value, digits=3):
  if value is None:
    return "–"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return str(value)


def _status(passed):
  return {True: "PASS", False: "FAIL", None: "not measured here"}[passed]


def _table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _rollup_section(report):
  """Genus / family / "one of these" below the species threshold: thresholds and what they do."""
  roll = report.get("rollup")
  if not roll:
    return []
  thresholds = roll["thresholds"]

  def fitted(level):
    t = thresholds[level]
    if not t["reachable"]:
      return "not reachable on val (never answered)"
    return f"{t['threshold']:.4f} (val: {t['n_accepted']} answered, precision {t['precision']:.3f})"

  return [
    "## When unsure: genus, family, \"one of these\"",
    "",
    "Below the species threshold the app answers the genus, else the family, whose summed "
    "probability reaches its own threshold (fitted on the val images left unanswered, at the "
    "same target precision), else the top species as \"one of these\" (right = the label is "
    f"among them). Groups: {roll['groups']['genus']} genera, {roll['groups']['family']} families.",
    "",
    f"- genus threshold: {fitted('genus')}",
    f"- family threshold: {fitted('family')}",
    "",
    _table(
      ["level", "images", "coverage", "precision"],
      [(level, m["n"], m["coverage"], m["precision"]) for level, m in roll["levels"].items()],
    ),
    "",
  ]


LEVEL_NAMES = ("species", "genus", "family", "set")


def _level_cell(level):
  return f"{level['coverage']:.3f} ({_fmt(level['precision'])})"


def _prior_section(report):
  """The region prior: its fit on val and each region's test numbers without and with it."""
  prior = report.get("region_prior")
  if not prior:
    return []
  if not prior["fitted"]:
    return ["## Region prior", "", f"Not fitted: {prior['note']}.", ""]
  fit, threshold = prior["fit"], prior["threshold"]
  rows = []
  for name, m in prior["report_regions"].items():
    for which in ("without", "with"):
      if which in m:
        r = m[which]
        rows.append(
          (
            name,
            m["n"],
            which,
            r["top1"],
            r["top5"],
            r["ece"],
            r["threshold"],
            r["coverage"],
            r["precision"],
          )
        )
  level_rows = [
    (name, which, *(_level_cell(m[f"levels_{which}"][level]) for level in LEVEL_NAMES))
    for name, m in prior["report_regions"].items()
    if m["n"]
    for which in ("without", "with")
  ]
  return [
    "## Region prior",
    "",
    "p(y | x, r) ∝ p(y | x)^a · (p(y | r) / p(y))^b, from the train split's class frequencies "
    f"(+{prior['smoothing']:g} per class); a user who ignores location gets the plain model.",
    f"Fitted on {fit['val_images']} val images of the regions: logits + s·log(p(y|r)/p(y)) at "
    f"the plain T = {fit['temperature']:.3f}, s = {fit['strength']:g} (a = {fit['scale']:g}, "
    f"b = {fit['browser_strength']:.3f}); the \"unsure\" threshold with the prior is "
    f"{threshold['threshold']:.4f}"
    + ("" if threshold["reachable"] else " (target not reachable on val)")
    + ".",
    "",
    _table(["s", "val NLL"], [(g["strength"], g["nll"]) for g in fit["grid"]]),
    "",
    f"On {report['splits']['report']}, each region's images under that region's prior:",
    "",
    _table(
      ["region", "images", "prior", "top-1", "top-5", "ECE", "threshold", "coverage", "precision"],
      rows,
    ),
    "",
    "When unsure, with the prior: its own genus/family thresholds, fitted as the plain model's "
    f"on the val region images (genus {_fmt(prior['rollup']['shipped']['genus'], 4)}, family "
    f"{_fmt(prior['rollup']['shipped']['family'], 4)}; – = never answered). Coverage (precision) "
    "per level:",
    "",
    _table(["region", "prior", *LEVEL_NAMES], level_rows),
    "",
  ]


def to_markdown(report, max_class_rows=25):
  """report.md: the same numbers as report.json, laid out for people, with the PNGs inline."""
  before, after = report["test"]["uncalibrated"], report["test"]["calibrated"]
  cal = report["calibration"]
  threshold = cal["threshold"]
  out = [
    "# Evaluation report",
    "",
    f"Checkpoint: `{report['checkpoint']['stage_dir']}` ({report['checkpoint']['which']}). "
    + report["checkpoint"].get("note", ""),
    f"Calibration fitted on **{report['splits']['fit']}** ({report['val']['uncalibrated']['n']} images); "
    f"metrics reported on **{report['splits']['report']}** ({before['n']} images, {before['num_classes']} classes). "
    + report["splits"].get("note", ""),
    "",
    "## Success criteria",
    "",
    "On demo or tiny data these targets are reported, not expected to pass.",
    "",
    _table(
      ["criterion", "target", "value", "result", "note"],
      [
        (r["criterion"], r["target"], r["value"], _status(r["passed"]), r["note"])
        for r in report["criteria"]
      ],
    ),
    "",
    "## Metrics on the report split",
    "",
    "Accuracy does not change with temperature scaling (the argmax is the same); probabilities do.",
    "",
    _table(
      ["metric", "before calibration", f"after (T = {cal['temperature']:.3f})"],
      [(label, before[name], after[name]) for name, label in METRIC_LABELS.items()],
    ),
    "",
    "![Reliability diagram](reliability.png)",
    "",
    "## Calibration and the \"unsure\" threshold",
    "",
    f"- Temperature T = {cal['temperature']:.4f} (val NLL {cal['fit']['nll_before']:.4f} → "
    f"{cal['fit']['nll_after']:.4f}{'; T hit the search bound' if cal['fit']['at_bound'] else ''}).",
    f"- The app shows a species when its calibrated probability is ≥ {threshold['threshold']:.4f}, "
    f"the smallest threshold whose answers on val are right ≥ {threshold['target_precision']:.0%} of the time "
    f"(answering at least {threshold['min_accepted']} val images)"
    + (
      "."
      if threshold["reachable"]
      else " — **not reachable on val**: no threshold gives that precision, so the app would always say \"unsure\"."
    ),
    "",
    _table(
      ["split", "coverage (answered)", "precision of answers", "answered images"],
      [
        (split, m["coverage"], m["precision"], m["n_accepted"])
        for split, m in (("val", threshold), (report["splits"]["report"], cal["report_split"]))
      ],
    ),
    "",
    "![Confidence histogram](confidence.png)",
    "",
    "## Accuracy per region",
    "",
    "An image belongs to a region when its photo country (else any country of its species) is listed.",
    "",
    _table(
      ["region", "images", "top-1", "top-5"],
      [(name, m["n"], m["top1"], m["top5"]) for name, m in before["regions"].items()],
    ),
    "",
    "![Accuracy per region](regions.png)",
    "",
  ]
  out += _rollup_section(report)
  out += _prior_section(report)
  if report.get("teacher_agreement"):
    agreement = report["teacher_agreement"]
    out += [
      "## Student vs teacher",
      "",
      f"Teacher: `{agreement['teacher_dir']}`. Top-5 agree = the teacher's top-1 is in the student's top 5 "
      "(as big_vision's distillation evaluator); KL(teacher ‖ student) in nats.",
      "",
      _table(
        ["teacher top-1", "student top-1", "top-1 agree", "top-5 agree", "KL(teacher ‖ student)"],
        [
          (
            agreement["teacher_top1"],
            before["top1"],
            agreement["top1_agree"],
            agreement["top5_agree"],
            agreement["kl_teacher_student"],
          )
        ],
      ),
      "",
    ]
  out += [
    "## Most confused species",
    "",
    _table(
      ["true species", "predicted as", "images", "share of true species"],
      [
        (c["true_species"], c["predicted_species"], c["count"], c["fraction_of_true"])
        for c in report["top_confusions"]
      ],
    )
    if report["top_confusions"]
    else "No mistakes.",
    "",
    "![Top confusions](confusions.png)",
    "",
  ]
  measured = sorted(
    (r for r in report["per_class"] if r["support"]), key=lambda r: (r["top1"], r["index"])
  )
  out += [
    f"## Per species (worst {min(max_class_rows, len(measured))} by top-1; all in report.json)",
    "",
    _table(
      ["species", "images", "top-1", "top-5"],
      [(r["species"], r["support"], r["top1"], r["top5"]) for r in measured[:max_class_rows]],
    ),
    "",
  ]
  return "\n".join(out)


def write(report, eval_dir):
  """Writes report.json and report.md into `eval_dir`; returns their paths."""
  json_path, md_path = os.path.join(eval_dir, "report.json"), os.path.join(eval_dir, "report.md")
  fileio.write_text(json_path, json.dumps(report, indent=2, sort_keys=False, allow_nan=False))
  fileio.write_text(md_path, to_markdown(report))
  return json_path, md_path
