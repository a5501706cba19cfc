"""Stage registry: `config.stage` → the function that runs it.

Each stage is `run(config: ml_collections.ConfigDict, workdir: str) -> dict` and
writes only `<workdir>/<its folder>/`. The returned dict is a short summary
(at least {"metric": "..."}) printed by main.py and used by run.sh's table.
Modules are imported lazily so that `audit` does not pay for TensorFlow.
"""
import importlib

STAGES = {
    "audit": "aplantida_jax.data.audit:run",
    "export": "aplantida_jax.data.export:run",
    "import_pretrained": "aplantida_jax.models.import_stage:run",
    "train": "aplantida_jax.train.loop:run",  # teachers (global, regional)
    "soft_labels": "aplantida_jax.distill.soft_labels:run",
    "distill": "aplantida_jax.distill.loop:run",
    "finetune": "aplantida_jax.train.loop:run",
    "evaluate": "aplantida_jax.evaluation.stage:run",
    "export_tfjs": "aplantida_jax.export.stage:run",
    "license_check": "aplantida_jax.repro.license_check:run",
}


def get_stage(name: str):
  """Returns the run function for `name`, or raises a ValueError naming the choices."""
  if name not in STAGES:
    raise ValueError(
        f"Unknown stage {name!r} in config.stage; known stages: {sorted(STAGES)}. "
        "Fix the `stage` field of the config file.")
  module_name, func_name = STAGES[name].split(":")
  return getattr(importlib.import_module(module_name), func_name)
