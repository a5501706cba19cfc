r"""Student fine-tune: the best distilled student on hard labels, low learning rate.

  python -m aplantida_jax.main --config=configs/student_finetune.py --workdir=runs/demo

Variants (`configs/student_finetune.py:demo`): the demo student, a few steps.
Reads <workdir>/dataset/ and <workdir>/student/distill/best/, writes
<workdir>/student/finetune/ (its own checkpoints; rerun to resume). The network
(model.name, model.kwargs) and input.image_size are the ones student/distill/config.json
recorded, so the distilled weights load one to one; `--config.input.image_size=N`
fine-tunes at another resolution.
"""

from configs import common
from configs import training


def get_config(arg=None):
  demo = common.demo_only(arg, "configs/student_finetune.py")
  config = training.training_config(output_dir="student/finetune", model_name="", image_size=0)
  config.stage = "finetune"
  config.init_from_stage = "student/distill"
  config.optimizer.learning_rate = 0.01  # a tenth of the distillation peak
  config.optimizer.warmup_steps = 100
  config.optimizer.label_smoothing = 0.1
  config.input.crop_scale = (0.25, 1.0)
  config.num_train_steps = 5_000
  if demo:
    training.demo_overrides(config, steps=20)
    config.input.image_size = 0
    config.optimizer.frozen = training.DEMO_FROZEN
    config.eval_every_steps = 10
    config.optimizer.learning_rate = 0.005
    config.optimizer.warmup_steps = 2
  return config
