"""The one stage registry: what each stage runs, writes, reads and needs.

`KINDS` maps a config's `stage` field to how it runs: the function
(`run(config, workdir) -> dict`, imported lazily so `audit` does not pay for
TensorFlow), whether it imports TensorFlow (main.py hides GPUs from TF first),
whether it trains weights (the license check judges those), where its output
goes and which config fields name the folders it reads. `PIPELINE` is
./run.sh's stages with their config files. The runner (repro/pipeline.py)
derives every dependency from the resolved configs: a stage depends on the
stages whose output folder holds a folder it reads, and runs after them.

Each stage writes only its output (`output(config, workdir)`). The returned
summary dict holds at least {"metric": "..."}, printed by main.py and by the
runner's table.
"""

import dataclasses
import importlib
import os

from aplantida_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Training configs: the dataset, the upstream stage and the ImageNet import they start from.
TRAINING_READS = ("dataset_dir", "init_from_stage", "model.init_from")


@dataclasses.dataclass(frozen=True)
class Kind:
  run: str  # "module:function"
  output_field: str = ""  # config field holding the output folder (relative to the workdir)
  output_folder: str = ""  # ... or a fixed one (workdir.py's names)
  read_fields: tuple = ()  # config fields naming folders it reads ("a.*.b": every a entry)
  read_folders: tuple = ()  # fixed folders it reads
  reads_every_stage: bool = False  # reads every earlier stage's output (the license check)
  tensorflow: bool = False  # imports TensorFlow
  trains: bool = False  # writes trained weights (a stage folder with config.json)
  repo_relative: tuple = ("model.init_from", "out_dir")  # fields relative to the repository


KINDS = {
  "audit": Kind("aplantida_jax.data.audit:run", output_folder=workdir_lib.AUDIT),
  "export": Kind("aplantida_jax.data.export:run", output_folder=workdir_lib.DATASET),
  # ImageNet imports are shared by every workdir: out_dir is relative to the repository.
  "import_pretrained": Kind("aplantida_jax.models.import_stage:run", output_field="out_dir"),
  "train": Kind(
    "aplantida_jax.train.loop:run",
    output_field="output_dir",
    read_fields=TRAINING_READS,
    trains=True,
  ),
  "soft_labels": Kind(
    "aplantida_jax.distill.soft_labels:run",
    output_field="output_dir",
    read_fields=("dataset_dir", "teachers.*.dir"),
  ),
  "distill": Kind(
    "aplantida_jax.distill.loop:run",
    output_field="output_dir",
    read_fields=TRAINING_READS + ("distill.soft_labels_dir", "distill.teachers.*.dir"),
    trains=True,
  ),
  "finetune": Kind(
    "aplantida_jax.train.loop:run",
    output_field="output_dir",
    read_fields=TRAINING_READS,
    trains=True,
  ),
  "evaluate": Kind(
    "aplantida_jax.evaluation.stage:run",
    output_folder=workdir_lib.EVAL,
    read_fields=("eval.checkpoint_dir", "eval.fallback_checkpoint_dirs", "eval.teacher_dir"),
    read_folders=(workdir_lib.DATASET,),
  ),
  "export_tfjs": Kind(
    "aplantida_jax.export.stage:run",
    output_field="export.out_dir",
    read_fields=("export.checkpoint_dir", "export.fallback_checkpoint_dirs"),
    read_folders=(workdir_lib.DATASET, workdir_lib.EVAL),
    tensorflow=True,
  ),
  "license_check": Kind(
    "aplantida_jax.repro.license_check:run",
    output_folder=workdir_lib.LICENSE_REPORT,
    reads_every_stage=True,
  ),
}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One step of ./run.sh: its name (logs/<name>.log, manifest key) and config file."""

  name: str
  config: str  # file in the configs folder
  serves_demo: bool = False  # the demo CDN must be up while it runs


PIPELINE = (
  Stage("audit", "audit.py", serves_demo=True),
  Stage("export", "export.py", serves_demo=True),
  Stage("pretrained", "pretrained.py"),
  Stage("teacher_global", "teacher_global.py"),
  Stage("teacher_regional", "teacher_regional.py"),
  Stage("soft_labels", "soft_labels.py"),
  Stage("distill", "student_distill.py"),
  Stage("finetune", "student_finetune.py"),
  Stage("evaluate", "evaluate.py"),
  Stage("export_tfjs", "export_tfjs.py"),
  Stage("license_check", "license_check.py"),
)


def kind(config) -> Kind:
  """The registry entry of config.stage, or a ValueError naming the choices."""
  name = config.get("stage") if hasattr(config, "get") else None
  if name not in KINDS:
    raise ValueError(
      f"Unknown stage {name!r} in config.stage; known stages: {sorted(KINDS)}. "
      "Fix the `stage` field of the config file."
    )
  return KINDS[name]


def get_stage(name: str):
  """The run function of the stage kind `name`."""
  module_name, func_name = kind({"stage": name}).run.split(":")
  return getattr(importlib.import_module(module_name), func_name)


def _field(config, path):
  """Values at a dotted path of a (nested dict) config; "*" matches every key."""
  values = [config]
  for part in path.split("."):
    values = [
      v
      for value in values
      if isinstance(value, dict)
      for v in (value.values() if part == "*" else [value.get(part)])
    ]
  out = []
  for value in values:
    out += [
      v
      for v in (value if isinstance(value, (list, tuple)) else [value])
      if isinstance(v, str) and v
    ]
  return out


def _absolute(folder, workdir, repo_relative):
  return os.path.normpath(os.path.join(REPO if repo_relative else workdir, folder))


def _as_dict(config):
  return config.to_dict() if hasattr(config, "to_dict") else config


def output(config, workdir) -> str:
  """The absolute folder (or file) a stage writes."""
  entry, config = kind(config), _as_dict(config)
  if entry.output_folder:
    return _absolute(entry.output_folder, workdir, False)
  [folder] = _field(config, entry.output_field) or [""]
  if not folder:
    raise ValueError(
      f"config.{entry.output_field} is empty: the {config['stage']} stage needs an output folder."
    )
  return _absolute(folder, workdir, entry.output_field in entry.repo_relative)


def reads(config, workdir) -> list:
  """The absolute folders a stage reads, from its config fields and the registry."""
  entry, config = kind(config), _as_dict(config)
  found = [_absolute(f, workdir, False) for f in entry.read_folders]
  for path in entry.read_fields:
    found += [_absolute(f, workdir, path in entry.repo_relative) for f in _field(config, path)]
  return list(dict.fromkeys(found))


def _inside(path, folder):
  return path == folder or path.startswith(folder + os.sep)


def plan(stages, configs, workdir) -> list:
  """[(stage, deps)] in run order: each after the stages whose output it reads.

  `configs` = {stage name: resolved config}. Ties keep `stages`' order, so the
  default pipeline runs as listed; a cycle is a ValueError naming it.
  """
  outputs = {s.name: output(configs[s.name], workdir) for s in stages}
  deps = {}
  for position, stage in enumerate(stages):
    config = configs[stage.name]
    if kind(config).reads_every_stage:
      deps[stage.name] = tuple(s.name for s in stages[:position])
      continue
    wanted = reads(config, workdir)
    deps[stage.name] = tuple(
      other.name
      for other in stages
      if other.name != stage.name
      and any(_inside(r, outputs[other.name]) or _inside(outputs[other.name], r) for r in wanted)
    )
  order, left = [], list(stages)
  while left:
    ready = [s for s in left if all(d in {o.name for o, _ in order} for d in deps[s.name])]
    if not ready:
      raise ValueError(
        "stages read each other's outputs in a cycle: "
        + ", ".join(f"{s.name} reads {list(deps[s.name])}" for s in left)
      )
    order.append((ready[0], deps[ready[0].name]))
    left.remove(ready[0])
  return order


def trained_outputs(recorded, workdir) -> list:
  """Folders (relative to workdir) of the training stages in `recorded` ({name: config})."""
  return [
    os.path.relpath(output(c, workdir), workdir).replace(os.sep, "/")
    for c in recorded.values()
    if c.get("stage") in KINDS and kind(c).trains
  ]
