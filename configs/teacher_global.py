r"""Global teacher: EfficientNet-Lite2 on every class, from ImageNet weights when imported.

  python -m aplantida_jax.main --config=configs/teacher_global.py --workdir=runs/demo

Variants (`configs/teacher_global.py:demo,model=efficientnet_lite0`):
  demo   EfficientNet-Lite0 from ImageNet (configs/pretrained.py:demo), 96 px, lower blocks
         frozen, 100 steps for 2 CPU cores
  model  any aplantida_jax.models name (default efficientnet_lite2; demo: efficientnet_lite0)
Reads <workdir>/dataset/, writes <workdir>/teacher_global/ (orbax checkpoints,
metrics.jsonl, TensorBoard events, config.json). Rerun the same command to resume.
Without `model.init_from` pointing at an import of tools/import_pretrained.py,
training starts from scratch (with a warning).
"""

from configs import common
from configs import training


def get_config(arg=None):
  variants, overrides = common.parse_arg(arg, "configs/teacher_global.py", keys={"model": None})
  model = overrides.get("model", "efficientnet_lite2")
  config = training.training_config(output_dir="teacher_global", model_name=model, image_size=260)
  training.from_imagenet(config, model)
  config.model.kwargs.dropout_rate = 0.3
  config.optimizer.learning_rate = 0.1
  config.num_train_steps = 30_000
  if "demo" in variants:
    training.demo_imagenet_overrides(config, steps=training.DEMO_STEPS)
    if "model" in overrides:
      training.from_imagenet(config, overrides["model"])
  return config
