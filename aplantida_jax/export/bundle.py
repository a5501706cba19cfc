"""The files that travel with the TF.js model: labels, metadata, model card, attributions.

A PWA needs only this folder: `labels.json` maps output index → species,
`metadata.json` tells the page how to feed the model and when to say "not
sure", `MODEL_CARD.md` tells people what the model is and is not, and
`attributions.csv` carries the image credits the licenses require.
"""

import hashlib
import json
import os
import shutil

from aplantida_jax import fileio
from aplantida_jax.export import serving
from aplantida_jax.models import preprocess

MODEL_FILES = ("model.json",)  # plus the *.bin shards listed in model.json


def model_files(tfjs_dir: str) -> list:
  """model.json and its weight shards, in the order model.json lists them."""
  manifest = fileio.read_json(os.path.join(tfjs_dir, "model.json"))["weightsManifest"]
  return list(MODEL_FILES) + [p for group in manifest for p in group["paths"]]


def model_sha256(tfjs_dir: str) -> str:
  """One hash over model.json and the shards: identifies the exact browser model."""
  digest = hashlib.sha256()
  for name in model_files(tfjs_dir):
    digest.update(name.encode() + b"\0" + fileio.sha256_file(os.path.join(tfjs_dir, name)).encode())
  return digest.hexdigest()


def labels(classes: list) -> list:
  """dataset/classes.json → [{"index", "species", "common_names"}], index = model output."""
  for position, entry in enumerate(classes):
    if entry["index"] != position:
      raise ValueError(
        f"dataset/classes.json entry {position} has index {entry['index']}; "
        "the list must be in label order. Re-run the export (dataset) stage."
      )
  return [
    {
      "index": c["index"],
      "species": c["species"],
      "common_names": c.get("common_names", {}),
      "family": c.get("family", ""),
    }
    for c in classes
  ]


def license_summary(manifest: dict) -> dict:
  """What the training images were licensed under (dataset/manifest.json)."""
  if not manifest:
    return {
      "policy": None,
      "shippable": None,
      "images_by_license": {},
      "note": "no dataset/manifest.json: the training data's licenses are unknown",
    }
  licenses = manifest.get("licenses", {})
  return {
    "policy": manifest.get("license_policy"),
    "shippable": manifest.get("shippable"),
    "images_by_license": licenses.get("kept_by_license", {}),
    "attributions": "attributions.csv",
  }


def metadata(
  *,
  image_size,
  num_classes,
  temperature,
  threshold,
  region_prior,
  rollup,
  model_info,
  tfjs_dir,
  dataset_manifest_path,
  dataset_manifest,
  quantize,
) -> dict:
  """How to feed the model and read its output; hashes tie it to its inputs."""
  return {
    "format": "tfjs-graph-model",
    "files": model_files(tfjs_dir),
    "input": {
      "name": serving.INPUT_NAME,
      "shape": [1, image_size, image_size, 3],
      "dtype": "float32",
      "channels": "RGB",
      "range": [0, 255],
      "preprocess": (
        "centre square crop, antialiased bilinear resize to input size; no normalisation"
      ),
      "eval_crop_fraction": model_info.get("eval_crop_fraction"),
    },
    "normalisation": {
      "in_graph": True,
      "mean": list(preprocess.IMAGENET_MEAN),
      "std": list(preprocess.IMAGENET_STD),
      "formula": "(x / 255 - mean) / std",
    },
    "output": {
      "name": serving.OUTPUT_NAME,
      "shape": [1, num_classes],
      "kind": "softmax(logits / temperature)",
    },
    "temperature": temperature,
    "threshold": threshold,
    # Per-region class reweighting, its strength and "unsure" threshold (evaluate stage).
    "region_prior": region_prior,
    # Below `threshold`: genus, then family thresholds on summed probability (null: never),
    # else the top set_size species as "one of these" (evaluation/rollup.py).
    "rollup": rollup,
    "num_classes": num_classes,
    "weights_dtype": quantize or "float32",
    "model": {**model_info, "sha256": model_sha256(tfjs_dir)},
    "dataset": {
      "manifest_sha256": (
        fileio.sha256_file(dataset_manifest_path) if os.path.exists(dataset_manifest_path) else None
      ),
      "licenses": license_summary(dataset_manifest),
    },
  }


def _metrics_section(report: dict) -> list:
  if not report:
    return [
      "No evaluation report (eval/report.json) was found when this model was exported: "
      "its accuracy is unmeasured. Run the evaluate stage, then export again.",
      "",
    ]
  split = report.get("splits", {}).get("report", "test")
  calibrated = report.get("test", {}).get("calibrated", {})
  rows = [
    (label, calibrated.get(key))
    for key, label in (
      ("top1", "top-1 accuracy"),
      ("top5", "top-5 accuracy"),
      ("macro_top1", "macro top-1"),
      ("ece", "ECE (after temperature scaling)"),
      ("nll", "NLL"),
    )
  ]
  lines = [
    f"Measured by the evaluate stage on the `{split}` split "
    f"(eval/report.json; {calibrated.get('n', '?')} images):",
    "",
    "| metric | value |",
    "|---|---|",
  ]
  lines += [
    f"| {label} | {value:.4f} |" for label, value in rows if isinstance(value, (int, float))
  ]
  for region, values in sorted(calibrated.get("regions", {}).items()):
    if isinstance(values.get("top1"), (int, float)):
      lines.append(f"| {region} top-1 | {values['top1']:.4f} |")
  lines.append("")
  criteria = report.get("criteria", [])
  if criteria:
    lines += [
      "Success criteria (the product's acceptance table):",
      "",
      "| criterion | target | value | passed |",
      "|---|---|---|---|",
    ]
    for row in criteria:
      value = row.get("value")
      value = f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else value)
      passed = {True: "yes", False: "**no**", None: "not measured there"}[row.get("passed")]
      lines.append(f"| {row['criterion']} | {row['target']} | {value} | {passed} |")
    lines.append("")
  return lines


def model_card(meta: dict, report: dict, size: dict, has_attributions: bool) -> str:
  """MODEL_CARD.md: what the model is, how good it measured, what it must not be used for."""
  licenses = meta["dataset"]["licenses"]
  model = meta["model"]
  lines = [
    "# Plant identifier — TF.js model card",
    "",
    "## What it is",
    "",
    f"A `{model['name']}` image classifier over {meta['num_classes']} plant species, trained with "
    "aplantida_jax (JAX/Flax), converted with jax2tf and tensorflowjs to a TF.js graph model "
    f"with {meta['weights_dtype']} weights ({size['tfjs_mb']:.2f} MB, "
    f"{model['parameters']:,} parameters). It runs entirely in the browser; no photo leaves the device.",
    "",
    f"- Input: one RGB photo as float32 `[1, {meta['input']['shape'][1]}, "
    f"{meta['input']['shape'][2]}, 3]` in 0–255 (centre-cropped, resized); normalisation is inside the graph.",
    f"- Output: calibrated probabilities `softmax(logits / T)`, T = {meta['temperature']:.4f}.",
    f"- Show \"not sure\" when the top probability is below {meta['threshold']:.4f} "
    "(metadata.json `threshold`).",
    "- Index → species: `labels.json`. Everything a page needs: `metadata.json`.",
    "",
    "## Metrics",
    "",
    *_metrics_section(report),
    "## Limits",
    "",
    "- It only knows the species in `labels.json`; any other plant (or a non-plant) still gets "
    "a confident-looking answer among those. The threshold reduces, not removes, such errors.",
    "- Accuracy was measured on images from the same catalog; phone photos in different light, "
    "season, organ (bark, seedling) or region will score lower.",
    "- Not for deciding whether a plant is edible, medicinal or safe to touch.",
    "- FP16 weights change probabilities by up to ~0.02 from the JAX model (see parity.json).",
    "",
    "## Data and licenses",
    "",
    (
      f"Training images were admitted under the `{licenses['policy']}` license policy "
      f"(shippable: {licenses.get('shippable')}). Images per license: "
      f"{json.dumps(licenses.get('images_by_license', {}))}."
      if licenses.get("policy")
      else "**The dataset manifest records no license policy**: the training images' licenses are "
      "unknown, so this model is not cleared for shipping."
    ),
    (
      "Photo credits, licenses and sources for every training image are in "
      "[`attributions.csv`](attributions.csv) in this folder; keep it with the model."
      if has_attributions
      else "**No attributions.csv**: dataset/attributions.csv was missing at export time; do not "
      "ship this model until it is exported again with it."
    ),
    "",
    "## Provenance",
    "",
    f"- Model files sha256: `{model['sha256']}`",
    f"- Dataset manifest sha256: `{meta['dataset']['manifest_sha256']}`",
    f"- Checkpoint: `{model.get('checkpoint')}`",
    "",
  ]
  return "\n".join(lines)


def write_bundle(
  tfjs_dir: str, *, meta: dict, classes: list, report: dict, size: dict, attributions_path: str
) -> None:
  """labels.json, metadata.json, MODEL_CARD.md and attributions.csv into `tfjs_dir`."""
  has_attributions = os.path.exists(attributions_path)
  if has_attributions:
    shutil.copyfile(attributions_path, os.path.join(tfjs_dir, "attributions.csv"))
  fileio.write_json(os.path.join(tfjs_dir, "labels.json"), labels(classes))
  fileio.write_json(os.path.join(tfjs_dir, "metadata.json"), meta)
  with open(os.path.join(tfjs_dir, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
    f.write(model_card(meta, report, size, has_attributions))
