r"""Global teacher: EfficientNet-Lite2 on every class, from ImageNet weights when imported.

  python -m aplantida_jax.main --config=configs/teacher_global.py --workdir=runs/demo

Variants (`configs/teacher_global.py:demo,model=efficientnet_lite0`):
  demo   tiny resolution, narrow model and a few dozen steps for 2 CPU cores
  model  any aplantida_jax.models name (default efficientnet_lite2; demo: a slim efficientnet_lite0)
Reads <workdir>/dataset/, writes <workdir>/teacher_global/ (orbax checkpoints,
metrics.jsonl, TensorBoard events, config.json). Rerun the same command to resume.
Without `model.init_from` pointing at an import of tools/import_pretrained.py,
training starts from scratch (with a warning).
"""
from configs import common
from configs import training

PRETRAINED_DIR = "runs/pretrained/{model}"  # tools/import_pretrained.py --out


def get_config(arg=None):
  variants, overrides = common.parse_arg(arg)
  model = overrides.get("model", "efficientnet_lite2")
  config = training.training_config(output_dir="teacher_global", model_name=model, image_size=260)
  config.model.init_from = PRETRAINED_DIR.format(model=model)
  config.model.kwargs.dropout_rate = 0.3
  config.optimizer.learning_rate = 0.1
  config.num_train_steps = 30_000
  if "demo" in variants:
    training.demo_overrides(config, steps=40)
    config.model.name = overrides.get("model", "efficientnet_lite0")
    config.model.init_from = ""
    # Narrow and shallow (10 blocks): XLA compiles it in well under a minute on 2 cores.
    # bn_momentum 0.9: batch-norm statistics must settle within a few dozen steps.
    config.model.kwargs = {"width_coefficient": 0.5, "depth_coefficient": 0.34,
                           "dropout_rate": 0.1, "bn_momentum": 0.9}
  return config
