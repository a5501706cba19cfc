r"""Student fine-tune: the best distilled student on hard labels, low learning rate.

  python -m aplantida_jax.main --config=configs/student_finetune.py --workdir=runs/demo

Variants (`configs/student_finetune.py:demo`): the demo student, a few steps.
Reads <workdir>/dataset/ and <workdir>/student/distill/best/, writes
<workdir>/student/finetune/ (its own checkpoints; rerun to resume). Model
fields (architecture, width, head_dim, resolution) come from
configs/student_distill.py so the distilled weights load one to one.
"""
from configs import common
from configs import student_distill


def get_config(arg=None):
  variants, _ = common.parse_arg(arg)
  config = student_distill.get_config(arg)
  del config.distill
  config.stage = "finetune"
  config.output_dir = "student/finetune"
  config.init_from_stage = "student/distill"
  config.model.init_from = ""  # the distilled weights, not ImageNet
  config.optimizer.learning_rate = 0.01  # a tenth of the distillation peak
  config.optimizer.warmup_steps = 100
  config.optimizer.label_smoothing = 0.1
  config.input.crop_scale = (0.25, 1.0)
  config.num_train_steps = 5_000
  if "demo" in variants:
    config.num_train_steps = 20
    config.eval_every_steps = 10
    config.optimizer.learning_rate = 0.005
    config.optimizer.warmup_steps = 2
    config.input.crop_scale = (0.35, 1.0)
  return config
