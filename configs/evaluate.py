r"""Evaluate a checkpoint, fit temperature + "unsure" threshold on val, report on test.

  python -m aplantida_jax.main --config=configs/evaluate.py --workdir=runs/demo

Variants (`configs/evaluate.py:demo,checkpoint_dir=teacher_global,teacher_dir=teacher_global`):
  demo            small batches for 2 CPU cores; compares with teacher_global
  checkpoint_dir  stage folder to evaluate (default student/finetune; falls back to
                  student/distill, then teacher_global)
  teacher_dir     stage folder of a teacher to compare against (student-teacher agreement)
Writes <workdir>/eval/{report.json, report.md, calibration.json, *.png}.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  variants, overrides = common.parse_arg(
    arg, "configs/evaluate.py", keys={"checkpoint_dir": None, "teacher_dir": None}
  )
  config = ml_collections.ConfigDict()
  config.stage = "evaluate"
  config.seed = 0  # evaluation is deterministic; kept so every stage records one

  e = config.eval = ml_collections.ConfigDict()
  e.checkpoint_dir = overrides.get(
    "checkpoint_dir", "student/finetune"
  )  # stage folder, relative to workdir
  # Tried in order, with a log line, when checkpoint_dir holds no trained stage (no config.json).
  e.fallback_checkpoint_dirs = ["student/distill", "teacher_global"]
  e.which = "best"  # "best" | "latest" checkpoint of that stage
  e.teacher_dir = overrides.get("teacher_dir", "")  # "" = no student-teacher comparison
  e.n_bins = 15  # equal-width confidence bins for ECE/MCE and the reliability plot
  e.target_precision = 0.95  # precision of shown answers the "unsure" threshold must reach on val
  e.min_accepted = 10  # ... and must answer at least this many val images (else "unreachable")
  # Below the species threshold: the genus, else the family, each when its summed probability
  # reaches a threshold fitted at target_precision on the val images still unanswered
  # (evaluation/rollup.py), answering at least rollup_min_accepted of them; else the top
  # rollup_set_size species as "one of these".
  e.rollup_min_accepted = 3
  e.rollup_set_size = 3
  e.top_confusions = 10  # most confused pairs listed and plotted
  e.batch_size = 64
  e.kept_logits = 32  # K: top logits kept per image (+ the tail's log-mean-exp); exact if C <= K
  e.t_min, e.t_max = 0.05, 20.0  # temperature search range
  # Region prior (evaluation/region_prior.py): logits + s·log(p(y|r)/p(y)) per config.regions,
  # s picked from `strengths` on val at the plain T, with its own threshold; the export ships it.
  p = e.region_prior = ml_collections.ConfigDict()
  p.enabled = True
  p.smoothing = 1.0  # additive count per class in p(y | region) and p(y) (train split)
  p.strengths = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]

  config.regions = common.regions_config()

  # The user's success criteria (DESIGN.md); reported, not expected to pass on demo data.
  c = config.criteria = ml_collections.ConfigDict()
  c.top1 = 0.75
  c.top5 = 0.90
  c.spain_top1 = 0.88
  c.europe_top1 = 0.68
  c.ece = 0.10
  c.size_mb = 150.0
  c.latency_gpu_s = 2.0
  c.latency_cpu_s = 5.0

  if "demo" in variants:
    e.batch_size = 16
    e.teacher_dir = overrides.get("teacher_dir", "teacher_global")  # the demo pipeline trains it
  return config
