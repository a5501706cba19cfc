r"""Soft labels: the teacher ensemble's top-k probabilities at temperature T.

  python -m aplantida_jax.main --config=configs/soft_labels.py --workdir=runs/demo

Variants (`configs/soft_labels.py:demo`):
  demo   small batches and chunks, no worker processes (2 CPU cores), 5 replayed epochs and
         the :demo student's crops
Reads <workdir>/dataset/ and each teacher's best checkpoint, writes
<workdir>/soft_labels/ (meta.json, <split>/{probs,classes,rest,sha256}.npy).
Rerun the same command to resume (finished chunks are kept) or, when nothing
changed, to reuse the set. Knobs: --config.temperature, --config.top_k,
--config.replay_epochs (E: train targets for the student's crops of E epochs; 0 = eval crop),
--config.replay.{crop_scale,crop_ratio,color_jitter,region_filter} (= the student's
config.input.*; the crops are drawn with config.seed, the student's seed; distillation
refuses a student whose seed or crops differ),
--config.num_views (K, with replay_epochs=0: eval crop + K−1 augmented views),
--config.teachers.<main|regional|third>.{dir,weight,region,region_weight}.
"""

import ml_collections

from configs import common
from configs import training


def teacher_config(directory, weight=1.0, region="", region_weight=1.0):
  c = ml_collections.ConfigDict()
  c.dir = directory  # teacher stage folder under the workdir; "" = not used
  c.weight = weight  # base weight in the per-image weighted mean of probabilities
  c.region = region  # a key of config.regions ("" = everywhere)
  c.region_weight = region_weight  # weight × this on images of that region (country, else species)
  return c


def teachers_config() -> ml_collections.ConfigDict:
  """The ensemble, shared with online distillation (configs/student_distill.py)."""
  c = ml_collections.ConfigDict()
  # Keys are Python identifiers so `--config.teachers.main.weight=2` parses ("global" would not).
  c.main = teacher_config("teacher_global", weight=1.0)
  # Trained on Spain only: trusted more there (2.0 vs 1.0), less elsewhere (0.5 vs 1.0).
  c.regional = teacher_config("teacher_regional", weight=0.5, region="spain", region_weight=4.0)
  c.third = teacher_config("")  # optional, e.g. a bigger model: set dir to its stage folder
  return c


def replay_config(demo=False) -> ml_collections.ConfigDict:
  """The student crops the train targets describe: configs/training.py's defaults (:demo's).

  configs/student_distill.py takes its precomputed-mode seed and crops from
  here, so the defaults agree; distillation refuses a student whose seed,
  crops or view differ from those recorded in soft_labels/meta.json.
  """
  student = training.training_config(output_dir="", model_name="", image_size=224)
  if demo:
    training.demo_overrides(student)
  c = ml_collections.ConfigDict()
  c.split = student.train_split  # the student's config.train_split
  c.crop_scale = student.input.crop_scale  # the student's config.input.crop_scale, ...
  c.crop_ratio = student.input.crop_ratio
  c.color_jitter = student.input.color_jitter
  c.sampling = "uniform"  # only uniform replays (weighted draws are up front)
  c.region_filter = list(student.input.region_filter)
  return c


def get_config(arg=None):
  variants, _ = common.parse_arg(arg, "configs/soft_labels.py")
  config = ml_collections.ConfigDict()
  config.stage = "soft_labels"
  config.seed = 0  # = the student's config.seed: draws the replayed crops (and num_views)
  config.output_dir = "soft_labels"
  config.dataset_dir = "dataset"
  config.splits = ("train", "val")  # val for monitoring (student–teacher agreement)
  config.temperature = 3.0  # probabilities = softmax(logits / T)
  config.top_k = 10  # kept per image (+ the remaining mass)
  # E: the train rows describe the student's own crops of epochs 0..E−1 (E × N rows; a student
  # running longer reuses the crops of epoch e % E). 16 ≈ the epochs of a 60k-step student at
  # batch 256 over 900k images (TinyViT stores all); ≈ 0.95 GB there at top_k 10. 0 = eval crop.
  config.replay_epochs = 16
  config.replay = replay_config("demo" in variants)
  config.num_views = 1  # K (replay_epochs=0 only): > 1 averages K−1 augmented views too
  config.batch_size = 256  # teacher inference batch (all local devices)
  config.chunk_size = 8192  # rows per resumable chunk file
  config.regions = common.regions_config()
  config.teachers = teachers_config()

  a = config.augment = ml_collections.ConfigDict()  # the num_views > 1 views (not the replay)
  a.crop_scale = (0.35, 1.0)
  a.crop_ratio = (3 / 4, 4 / 3)
  a.color_jitter = 0.1

  i = config.input = ml_collections.ConfigDict()  # Grain decoding (as configs/training.py)
  i.worker_count = 2
  i.worker_buffer_size = 2
  i.read_threads = 8
  i.prefetch_buffer_size = 64

  if "demo" in variants:
    config.batch_size = 32
    config.chunk_size = 64
    config.replay_epochs = 4  # the :demo student: 100 steps of 16 over 440 train images = 3.6
    config.input.worker_count = 0
    config.input.read_threads = 2
    config.input.prefetch_buffer_size = 16
  return config
