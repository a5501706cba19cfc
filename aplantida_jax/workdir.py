"""What a stage folder under the workdir holds, read one way by every stage.

A trained stage folder (teacher_global/, student/distill/, ...) is the whole
interface between stages: `config.json`, written by the train loop, is the
config as trained (num_classes, model, input size, where the weights came
from), and orbax holds the variables. Downstream stages take upstream facts
from here, never by importing the upstream stage's config file.
"""

import functools
import os

import ml_collections

from aplantida_jax import fileio

# The run's folders and files; no other module spells these names.
AUDIT = "audit"  # audit: report.{json,md} and plots
DATASET = "dataset"  # export: shards, classes.json, manifest.json, attributions.csv
EVAL = "eval"  # evaluate: report.{json,md}, calibration.json, plots
TFJS = "tfjs"  # export_tfjs: the model the PWA ships
CONFIG_FILE = "config.json"  # in every trained stage folder
METRICS_FILE = "metrics.jsonl"
LICENSE_REPORT = "license_report.json"  # license_check
MANIFEST = "manifest.json"  # the runner's record of every stage (repro/manifest.py)


class Workdir:
  """The folders and files of one pipeline run under `root`."""

  def __init__(self, root: str):
    self.root = root

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  @property
  def audit(self) -> str:
    return self.path(AUDIT)

  @property
  def manifest(self) -> str:
    return self.path(MANIFEST)

  @property
  def dataset(self) -> str:
    return self.path(DATASET)

  @property
  def eval(self) -> str:
    return self.path(EVAL)

  @property
  def tfjs(self) -> str:
    return self.path(TFJS)

  @property
  def dataset_manifest(self) -> str:
    return self.path(DATASET, "manifest.json")

  @property
  def calibration(self) -> str:
    return self.path(EVAL, "calibration.json")

  @property
  def eval_report(self) -> str:
    return self.path(EVAL, "report.json")

  @property
  def export_report(self) -> str:
    return self.path(TFJS, "export_report.json")

  @property
  def license_report(self) -> str:
    return self.path(LICENSE_REPORT)


class TrainedStage:
  """A stage folder the train loop wrote; `config` is its resolved training config."""

  def __init__(self, path: str):
    self.path = path

  @property
  def trained(self) -> bool:
    return os.path.exists(os.path.join(self.path, CONFIG_FILE))

  @functools.cached_property
  def config(self) -> ml_collections.ConfigDict:
    if not self.trained:
      raise FileNotFoundError(
        f"{os.path.join(self.path, CONFIG_FILE)} is missing: {self.path} is not a trained "
        "stage folder (train it first; the folder is config.output_dir under the workdir)."
      )
    return ml_collections.ConfigDict(fileio.read_json(os.path.join(self.path, CONFIG_FILE)))


def read_classes(dataset_dir: str) -> list:
  """dataset/classes.json: [{"index", "species", "common_names", "regions", "family"}]."""
  path = os.path.join(dataset_dir, "classes.json")
  classes = fileio.read_json(path)
  if classes is None:
    raise FileNotFoundError(f"{path} is missing; run the export stage first (configs/export.py).")
  return classes


def first_trained(workdir: str, candidates) -> TrainedStage:
  """The first of `candidates` (stage folders relative to workdir) that is trained, or None."""
  for name in candidates:
    stage = TrainedStage(os.path.join(workdir, name))
    if stage.trained:
      return stage
  return None
