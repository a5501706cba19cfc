"""The stage registry: run order and dependencies come from what the configs read."""

import os

import pytest

from aplantida_jax import stages
from aplantida_jax.repro import pipeline
from tests.helpers import ROOT

WORKDIR = "/runs/w"


def _demo_configs():
  return {
    s.name: pipeline.load_config(os.path.join(ROOT, "configs", s.config), "demo")
    for s in stages.PIPELINE
  }


def test_the_demo_runs_in_registry_order_with_the_deps_its_configs_name():
  planned = stages.plan(stages.PIPELINE, _demo_configs(), WORKDIR)
  assert [s.name for s, _ in planned] == [s.name for s in stages.PIPELINE]
  deps = {s.name: d for s, d in planned}
  assert deps == {
    "audit": (),
    "export": (),
    "pretrained": (),
    "teacher_global": ("export", "pretrained"),
    "teacher_regional": ("export", "teacher_global"),
    "soft_labels": ("export", "teacher_global", "teacher_regional"),
    # The online teachers (distill.teachers) are read in online mode; listed in both.
    "distill": ("export", "pretrained", "teacher_global", "teacher_regional", "soft_labels"),
    "finetune": ("export", "distill"),
    # Its fallbacks (student/distill, teacher_global) and the demo's teacher comparison.
    "evaluate": ("export", "teacher_global", "distill", "finetune"),
    "export_tfjs": ("export", "teacher_global", "distill", "finetune", "evaluate"),
    "license_check": tuple(s.name for s in stages.PIPELINE[:-1]),
  }
  configs = _demo_configs()
  assert stages.output(configs["pretrained"], WORKDIR) == os.path.join(ROOT, "runs", "pretrained")
  assert stages.output(configs["distill"], WORKDIR) == "/runs/w/student/distill"
  assert stages.output(configs["export_tfjs"], WORKDIR) == "/runs/w/tfjs"


def test_a_config_that_reads_another_stage_gets_it_as_a_dep_and_runs_after_it():
  configs = _demo_configs()
  configs["evaluate"].eval.checkpoint_dir = "teacher_regional"
  configs["evaluate"].eval.fallback_checkpoint_dirs = []
  configs["evaluate"].eval.teacher_dir = ""
  deps = dict(stages.plan(stages.PIPELINE, configs, WORKDIR))
  assert deps[stages.PIPELINE[8]] == ("export", "teacher_regional")
  # Listed first, but it reads the teacher's folder: it runs second.
  listed = [stages.Stage("evaluate", "evaluate.py"), stages.Stage("teacher_regional", "x.py")]
  planned = stages.plan(listed, configs, WORKDIR)
  assert [s.name for s, _ in planned] == ["teacher_regional", "evaluate"]


def test_stages_that_read_each_other_are_a_cycle_error():
  configs = _demo_configs()
  configs["teacher_global"].init_from_stage = "student/finetune"
  with pytest.raises(
    ValueError, match="cycle: .*teacher_global reads \\['export', 'pretrained', 'finetune'\\]"
  ):
    stages.plan(stages.PIPELINE, configs, WORKDIR)


def test_the_registry_says_which_stages_import_tensorflow_and_which_train():
  assert [k for k, v in stages.KINDS.items() if v.tensorflow] == ["export_tfjs"]
  assert sorted(k for k, v in stages.KINDS.items() if v.trains) == ["distill", "finetune", "train"]
  with pytest.raises(ValueError, match="Unknown stage 'trian'.*known stages"):
    stages.kind({"stage": "trian"})
