"""Config files: strict variants, variants that agree with overrides, upstream facts read
from what the upstream stage recorded."""

import glob
import importlib
import os

import pytest

from aplantida_jax import fileio
from aplantida_jax import workdir as workdir_lib
from configs import training
from tests import helpers


def _get_config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


CONFIG_FILES = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(helpers.ROOT, "configs", "*.py"))
  if os.path.basename(p) not in ("common.py", "training.py", "__init__.py")
)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_builds_with_and_without_demo_and_refuses_a_mistyped_variant(name):
  for arg in (None, "demo"):
    assert _get_config(name, arg).stage
  with pytest.raises(
    ValueError,
    match=rf"configs/{name}\.py: unknown variant 'demos'; it takes "
    r"':demo'",
  ):
    _get_config(name, "demos")


@pytest.mark.parametrize(
  "name,arg,known",
  [
    ("teacher_global", "demo,modle=efficientnet_lite3", "':demo', 'model='"),
    ("student_distill", "demo,teacher=x", "':demo', 'model=', 'mode='"),
    ("teacher_regional", "regoin=spain", "':demo', 'mode=', 'region='"),
    ("student_finetune", "demo,model=mobilenet_v2", "':demo'"),
  ],
)
def test_an_unknown_key_names_itself_and_the_known_ones(name, arg, known):
  key, value = arg.split(",")[-1].split("=")
  with pytest.raises(ValueError) as e:
    _get_config(name, arg)
  assert str(e.value) == (
    f"configs/{name}.py: unknown argument {key}={value!r}; it takes "
    f"{known}. Set other fields with --config.KEY=VALUE."
  )


@pytest.mark.parametrize(
  "name,arg",
  [
    ("student_distill", "mode=onlin"),
    ("student_distill", "model=mobilenet_v3"),
    ("teacher_regional", "demo,region=france"),
  ],
)
def test_a_value_outside_the_choices_is_an_error(name, arg):
  with pytest.raises(ValueError, match=rf"{arg.split(',')[-1].split('=')[0]}=.* is not one of"):
    _get_config(name, arg)


@pytest.mark.parametrize("demo", ["", "demo,"])
def test_the_mode_variant_equals_the_mode_override(demo):
  """`:mode=online` and `--config.distill.mode=online` train the same student."""
  by_variant = _get_config("student_distill", f"{demo}mode=online")
  by_override = _get_config("student_distill", demo.rstrip(",") or None)
  by_override.distill.mode = "online"
  assert by_variant.to_dict() == by_override.to_dict()


def _record_upstream(workdir, stage, **model):
  config = _get_config("teacher_global", "demo")
  config.output_dir = stage
  config.model.update(model)
  config.input.image_size = 77
  os.makedirs(os.path.join(workdir, stage))
  fileio.write_json(os.path.join(workdir, stage, workdir_lib.CONFIG_FILE), config.to_dict())
  return config


@pytest.mark.parametrize(
  "name,output,upstream",
  [
    ("student_finetune", "student/finetune", "student/distill"),
    ("teacher_regional", "teacher_regional", "teacher_global"),
  ],
)
def test_a_stage_start_trains_the_network_its_upstream_recorded(tmp_path, name, output, upstream):
  """Not the built-in upstream config file's network: whatever upstream's config.json says
  (so `./run.sh --configs DIR` and upstream overrides reach the downstream stage)."""
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top

  recorded = _record_upstream(
    str(tmp_path), upstream, name="mobilenet_v2", kwargs={"width": 0.35, "head_dim": 16}
  )
  config = _get_config(name, "demo")
  assert (config.model.name, config.input.image_size, dict(config.model.kwargs)) == ("", 0, {})
  inherited = loop.inherit_from_stage(config, str(tmp_path))
  assert inherited.model.name == "mobilenet_v2"
  assert inherited.model.kwargs.to_dict() == recorded.model.kwargs.to_dict()
  assert inherited.input.image_size == 77
  config.input.image_size = 64  # another resolution is a choice, not another network
  assert loop.inherit_from_stage(config, str(tmp_path)).input.image_size == 64
  config.model.kwargs = {"head_dim": 0}
  with pytest.raises(
    ValueError,
    match=rf"{output} starts from {upstream}/, which trained "
    r"another network: "
    r"model.kwargs.head_dim=0 \(recorded: 16\)",
  ):
    loop.inherit_from_stage(config, str(tmp_path))


def test_a_stage_start_without_its_upstream_says_what_to_train(tmp_path):
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top

  with pytest.raises(FileNotFoundError, match="student/distill/config.json is missing"):
    loop.inherit_from_stage(_get_config("student_finetune"), str(tmp_path))


def test_demo_stage_starts_keep_the_demo_recipe():
  """The demo's regional teacher and fine-tune freeze what its networks froze."""
  for name in ("teacher_regional", "student_finetune"):
    config = _get_config(name, "demo")
    assert config.optimizer.frozen == training.DEMO_FROZEN
    assert config.num_train_steps == 20 and config.batch_size == 16
