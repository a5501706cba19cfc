r"""Regional teacher: the global teacher's best checkpoint specialised on one region.

  python -m aplantida_jax.main --config=configs/teacher_regional.py --workdir=runs/demo

Variants (`configs/teacher_regional.py:demo,mode=region_weighted,region=europe`):
  demo    tiny run for 2 CPU cores (same model as teacher_global:demo)
  mode    "region_only" (default): train on the region's images only;
          "region_weighted": all images, the region's drawn input.region_weight times more often
  region  "spain" (default, ES) or "europe" (configs.common.regions_config().europe)
Reads <workdir>/dataset/ and <workdir>/teacher_global/best/, writes <workdir>/teacher_regional/.
The network (model.name, model.kwargs) and input.image_size are the ones
teacher_global/config.json recorded, so its weights load one to one. best/ keeps
the checkpoint with the highest val top-1 on the region's images (checkpoint.best_metric).
"""

from configs import common
from configs import training

MODES = ("region_only", "region_weighted")


def get_config(arg=None):
  variants, overrides = common.parse_arg(
    arg,
    "configs/teacher_regional.py",
    variants=("demo",),
    keys={"mode": MODES, "region": ("spain", "europe")},
  )
  mode = overrides.get("mode", "region_only")
  region = overrides.get("region", "spain")
  config = training.training_config(output_dir="teacher_regional", model_name="", image_size=0)
  config.init_from_stage = "teacher_global"
  config.checkpoint.best_metric = f"val_{region}_top1"  # chosen for its region, not the world
  countries = list(config.regions[region])
  if mode == "region_only":
    config.input.region_filter = countries
  else:
    config.input.sampling = "region_weighted"
    config.input.region_countries = countries
  # Fine-tuning a trained teacher: gentler schedule, milder crops.
  config.optimizer.learning_rate = 0.02
  config.optimizer.warmup_steps = 200
  config.input.crop_scale = (0.25, 1.0)
  config.num_train_steps = 10_000
  if "demo" in variants:
    training.demo_overrides(config, steps=20)
    config.input.image_size = 0
    config.optimizer.frozen = training.DEMO_FROZEN
    config.eval_every_steps = 10
    config.optimizer.learning_rate = 0.02
    config.optimizer.warmup_steps = 2
    config.input.crop_scale = (0.35, 1.0)
  return config
