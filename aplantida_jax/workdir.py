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

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


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
          "stage folder (train it first; the folder is config.output_dir under the workdir).")
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
