"""Stage "export_tfjs": the trained student → the folder a PWA ships.

<workdir>/tfjs/ is built in a sibling temp folder and swapped in at the end,
so a failed export (op check, size, parity) never leaves a half-written model
where the page or the license check would pick it up.
"""

import os
import shutil

from absl import logging

from aplantida_jax import fileio
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.export import bundle
from aplantida_jax.export import convert
from aplantida_jax.export import parity
from aplantida_jax.export import serving
from aplantida_jax.export import sizes
from aplantida_jax.train import inference


def _read_calibration(workdir: str):
  path = workdir_lib.Workdir(workdir).calibration
  return path, fileio.read_json(path)


def _checkpoint_dir(e, workdir: str, checkpoint: str = None) -> str:
  """What to export: --checkpoint, else the stage eval/ calibrated, else the configured chain."""
  if checkpoint:
    if not workdir_lib.TrainedStage(checkpoint).trained:
      raise FileNotFoundError(
        f"--checkpoint {checkpoint} holds no trained stage "
        f"({workdir_lib.CONFIG_FILE}); "
        "pass a stage folder such as <workdir>/student/finetune."
      )
    return checkpoint
  _, cal = _read_calibration(workdir)
  calibrated = ((cal or {}).get("checkpoint") or {}).get("stage_dir")
  if calibrated and workdir_lib.TrainedStage(os.path.join(workdir, calibrated)).trained:
    return os.path.join(workdir, calibrated)
  chain = [e.checkpoint_dir, *e.fallback_checkpoint_dirs]
  found = workdir_lib.first_trained(workdir, chain)
  if found is not None:
    if os.path.relpath(found.path, workdir) != os.path.normpath(e.checkpoint_dir):
      logging.warning(
        "export_tfjs: %s/ holds no trained stage; exporting %s instead",
        e.checkpoint_dir,
        found.path,
      )
    return found.path
  raise FileNotFoundError(
    f"No trained stage ({', '.join(f'{d}/' for d in chain)} with {workdir_lib.CONFIG_FILE}) "
    f"under {workdir}. "
    "Train the student first (configs/student_distill.py, configs/student_finetune.py) or pass "
    "--checkpoint."
  )


def _calibration(workdir: str, stage_dir: str, default_threshold: float) -> dict:
  """Temperature and "unsure" threshold from eval/calibration.json, when fitted for `stage_dir`.

  Without it, or when it was fitted for another checkpoint, the export is
  uncalibrated (T = 1) with export.default_threshold, and says so.
  """
  path, cal = _read_calibration(workdir)
  calibrated = ((cal or {}).get("checkpoint") or {}).get("stage_dir")
  if (
    cal is not None
    and calibrated
    and (os.path.abspath(os.path.join(workdir, calibrated)) != os.path.abspath(stage_dir))
  ):
    logging.warning(
      "export_tfjs: %s was fitted for %s, not %s; exporting uncalibrated.",
      path,
      calibrated,
      stage_dir,
    )
    cal = None
  if cal is None:
    logging.warning(
      "export_tfjs: no calibration for %s; exporting uncalibrated (T = 1, threshold "
      "%.2f). Run the evaluate stage on it first.",
      stage_dir,
      default_threshold,
    )
    return {
      "temperature": 1.0,
      "threshold": default_threshold,
      "source": None,
      "region_prior": None,
      "rollup": None,
    }
  threshold = cal["threshold"]
  if isinstance(threshold, dict):  # the full abstain_threshold() result
    threshold = threshold["threshold"]
  prior = cal.get("region_prior")
  return {
    "temperature": float(cal["temperature"]),
    "threshold": float(threshold),
    "source": path,
    "region_prior": os.path.join(os.path.dirname(path), prior) if prior else None,
    "rollup": cal.get("rollup"),
  }


def _classes(dataset_dir: str, num_classes: int) -> list:
  classes = workdir_lib.read_classes(dataset_dir)
  if len(classes) != num_classes:
    path = os.path.join(dataset_dir, "classes.json")
    raise ValueError(
      f"{path} lists {len(classes)} classes but the checkpoint predicts {num_classes}; "
      "the checkpoint was trained on another dataset/."
    )
  return classes


def _swap_in(tmp_dir: str, out_dir: str) -> None:
  old = out_dir + ".old"
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(out_dir):
    os.replace(out_dir, old)
  os.replace(tmp_dir, out_dir)
  shutil.rmtree(old, ignore_errors=True)


def export_workdir(config, workdir: str, checkpoint: str = None, out_dir: str = None) -> dict:
  """Everything the stage does; tools/export_tfjs.py calls it with its flags."""
  e = config.export
  stage_dir = _checkpoint_dir(e, workdir, checkpoint)
  out_dir = os.path.abspath(out_dir or os.path.join(workdir, e.out_dir))
  dataset_dir = workdir_lib.Workdir(workdir).dataset
  model, variables, train_config = inference.load_model(stage_dir, which=e.which)
  num_classes = model.num_classes
  classes = _classes(dataset_dir, num_classes)
  image_size = int(train_config.input.image_size)
  cal = _calibration(workdir, stage_dir, e.default_threshold)

  tmp_dir = out_dir + ".partial"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  logging.info("export_tfjs: %s (%s) → %s", stage_dir, train_config.model.name, out_dir)
  result = convert.export(
    model,
    variables,
    image_size=image_size,
    out_dir=tmp_dir,
    temperature=cal["temperature"],
    quantize=e.quantize,
    max_mb=e.max_mb,
  )

  model_kwargs = train_config.model.kwargs.to_dict()
  counts = sizes.variable_counts(variables)
  size = {
    "parameters": counts["params"],
    "batch_stats": counts["batch_stats"],
    "tfjs_mb": round(result["tfjs_mb"], 3),
    "estimate": {
      "num_classes": num_classes,
      **sizes.estimate(train_config.model.name, num_classes, e.quantize, **model_kwargs),
    },
    f"estimate_{e.estimate_classes}_classes": sizes.class_count_estimates(
      train_config.model.name, model_kwargs, e.estimate_classes, e.estimate_head_dim, e.quantize
    ),
  }
  logging.info(
    "export_tfjs: %s parameters (+%s batch-norm statistics), TF.js %s weights %.2f MB",
    f"{counts['params']:,}",
    f"{counts['batch_stats']:,}",
    e.quantize or "float32",
    result["tfjs_mb"],
  )

  parity_report = None
  if e.parity_images:
    images = parity.split_images(
      dataset_dir,
      e.parity_split,
      e.parity_images,
      image_size,
      float(train_config.input.eval_crop_fraction),
    )
    jax_probs = serving.jax_probabilities(
      serving.serving_fn(model, cal["temperature"]), variables, images
    )
    parity_report = parity.report(
      jax_probs,
      parity.tfjs_probabilities(tmp_dir, images, tuple(e.parity_backends)),
      parity.split_labels(dataset_dir, e.parity_split, e.parity_images),
    )
    parity_report["split"] = e.parity_split
    fileio.write_json(os.path.join(tmp_dir, "parity.json"), parity_report)
    logging.info("export_tfjs: parity %s", parity_report)
    if e.require_parity and not parity_report["passed"]:
      raise RuntimeError(
        f"TF.js parity below target {parity.TARGET}: {parity_report['backends']} "
        f"(kept in {tmp_dir}/parity.json). Set export.require_parity=False to "
        "export anyway."
      )

  if cal["region_prior"]:
    shutil.copyfile(
      cal["region_prior"], os.path.join(tmp_dir, os.path.basename(cal["region_prior"]))
    )
  manifest_path = os.path.join(dataset_dir, "manifest.json")
  meta = bundle.metadata(
    image_size=image_size,
    num_classes=num_classes,
    temperature=cal["temperature"],
    threshold=cal["threshold"],
    region_prior=os.path.basename(cal["region_prior"]) if cal["region_prior"] else None,
    rollup=cal["rollup"],
    tfjs_dir=tmp_dir,
    dataset_manifest_path=manifest_path,
    dataset_manifest=fileio.read_json(manifest_path),
    quantize=e.quantize,
    model_info={
      "name": train_config.model.name,
      "kwargs": model_kwargs,
      "parameters": counts["params"],
      "checkpoint": os.path.abspath(stage_dir),
      "which": e.which,
      "calibration": cal["source"],
      "eval_crop_fraction": float(train_config.input.eval_crop_fraction),
    },
  )
  bundle.write_bundle(
    tmp_dir,
    meta=meta,
    classes=classes,
    report=fileio.read_json(workdir_lib.Workdir(workdir).eval_report),
    size=size,
    attributions_path=os.path.join(dataset_dir, "attributions.csv"),
  )
  fileio.write_json(
    os.path.join(tmp_dir, "export_report.json"),
    {
      "size": size,
      "tfjs_ops": result["tfjs_ops"],
      "fixed_fused_biases": result["fixed_fused_biases"],
      "relu6_fused": result["relu6"],
      "parity": parity_report,
    },
  )
  _swap_in(tmp_dir, out_dir)

  estimates = size[f"estimate_{e.estimate_classes}_classes"]
  metric = f"{result['tfjs_mb']:.2f} MB {e.quantize or 'float32'}, {counts['params']:,} params"
  if parity_report:
    worst = min(parity_report["backends"].values(), key=lambda b: b["top1_agreement"])
    metric += (
      f", TF.js top-1 agreement {worst['top1_agreement']:.3f} on {worst['n_decided']}/"
      f"{worst['n']} decided images (raw {worst['top1_agreement_raw']:.3f}), max |Δp| "
      f"{max(b['max_abs_diff'] for b in parity_report['backends'].values()):.4f}, "
      f"TF.js {e.parity_split} top-1 {worst['top1_accuracy']:.3f}"
    )
  return {
    "metric": metric,
    "out_dir": out_dir,
    "size": size,
    "parity": parity_report,
    "estimates_mb": {k: v["mb"] for k, v in estimates.items()},
  }


def run(config, workdir: str) -> dict:
  return export_workdir(config, workdir)
