r"""Export the student to TF.js: jax2tf → SavedModel → graph model with FP16 weights.

  python -m aplantida_jax.main --config=configs/export_tfjs.py --workdir=runs/demo

(same as `python tools/export_tfjs.py --workdir runs/demo`). Variants
(`configs/export_tfjs.py:demo,checkpoint_dir=teacher_global`):
  demo            fewer parity images for 2 CPU cores
  checkpoint_dir  stage folder to export when eval/ calibrated none (default
                  student/finetune; falls back to student/distill, teacher_global)
Exports the checkpoint eval/calibration.json was fitted for (its temperature
and "unsure" threshold go into the model; T = 1 without it), and reads
dataset/{classes.json, manifest.json, attributions.csv}.
Writes <workdir>/tfjs/: model.json + group*.bin (the browser model), labels.json,
metadata.json, MODEL_CARD.md, attributions.csv, parity.json, export_report.json
and saved_model/ (the same model for TF Serving / TFLite).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  variants, overrides = common.parse_arg(
    arg, "configs/export_tfjs.py", keys={"checkpoint_dir": None}
  )
  config = ml_collections.ConfigDict()
  config.stage = "export_tfjs"
  config.seed = 0  # the export is deterministic; kept so every stage records one

  e = config.export = ml_collections.ConfigDict()
  e.checkpoint_dir = overrides.get(
    "checkpoint_dir", "student/finetune"
  )  # stage folder, relative to workdir
  # Tried in order, with a log line, when checkpoint_dir holds no trained stage (no config.json).
  e.fallback_checkpoint_dirs = ["student/distill", "teacher_global"]
  e.which = "best"  # "best" | "latest" checkpoint of that stage
  e.out_dir = "tfjs"  # relative to workdir (or absolute)
  e.quantize = "float16"  # weight storage: "float16" | "uint8" | "uint16" | "" (float32)
  e.max_mb = 150.0  # model.json + shards; the export fails above this
  e.default_threshold = 0.5  # "unsure" threshold when eval/calibration.json is absent
  e.parity_images = 64  # val images run through JAX and TF.js in Node (0 = skip)
  e.parity_split = "val"
  e.parity_backends = ("cpu", "wasm")
  e.require_parity = True  # fail when parity misses its target (top-1 ≥ 99%, |Δp| ≤ 0.02)
  e.estimate_classes = 9000  # also report the FP16 size at this class count ...
  e.estimate_head_dim = 256  # ... with a dense and with a factorised head of this width

  if "demo" in variants:
    e.parity_images = 16
  return config
