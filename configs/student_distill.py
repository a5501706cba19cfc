r"""Distilled student: MobileNetV2 learns the teacher ensemble's soft labels.

  python -m aplantida_jax.main --config=configs/student_distill.py --workdir=runs/demo

Variants (`configs/student_distill.py:demo,mode=online`):
  demo   narrow student, 64 px, a few dozen steps for 2 CPU cores
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


def get_config(arg=None):
  variants, overrides = common.parse_arg(arg)
  config = training.training_config(output_dir="student/distill", model_name="mobilenet_v2",
                                    image_size=224)
  config.stage = "distill"
  # width: MobileNetV2 α; head_dim > 0 factorises the head for large class counts.
  config.model.kwargs = ml_collections.ConfigDict(
      {"width": 1.0, "head_dim": 0, "dropout_rate": 0.2})
  config.optimizer.label_smoothing = 0.0  # the soft targets already smooth
  config.num_train_steps = 60_000         # distillation likes long schedules (Beyer et al.)

  d = config.distill = ml_collections.ConfigDict()
  d.mode = overrides.get("mode", "precomputed")  # "precomputed" | "online"
  d.alpha = 0.7                   # weight of the KD term (1 − alpha on the hard-label CE)
  d.temperature = 3.0             # must equal soft_labels' T in precomputed mode
  d.soft_labels_dir = "soft_labels"  # precomputed: folder under the workdir
  d.top_k = 10                    # online: classes kept from the teachers (+ remaining mass)
  d.regions = common.regions_config()  # online: the ensemble, as configs/soft_labels.py
  d.teachers = soft_labels.teachers_config()

  if "demo" in variants:
    training.demo_overrides(config, steps=40)
    config.model.kwargs.width = 0.35
    config.model.kwargs.dropout_rate = 0.1
  if d.mode == "precomputed":
    # Precomputed targets describe the teacher's centre view of the whole image; crops that
    # keep most of it keep those targets true ("consistent teaching", Beyer et al. 2022). On
    # flowers12 (README "A real run") 25-100 % crops lost to hard labels, 60-100 % beat them.
    # Online mode shows the teachers the student's own crop, so it keeps the wide default.
    config.input.crop_scale = (0.6, 1.0)
  return config
