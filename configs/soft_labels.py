r"""Soft labels: the teacher ensemble's top-k probabilities at temperature T.

  python -m aplantida_jax.main --config=configs/soft_labels.py --workdir=runs/demo

Variants (`configs/soft_labels.py:demo`):
  demo   small batches and chunks, no worker processes (2 CPU cores)
Reads <workdir>/dataset/ and each teacher's best checkpoint, writes
<workdir>/soft_labels/ (meta.json, <split>/{probs,classes,rest,sha256}.npy).
Rerun the same command to resume (finished chunks are kept) or, when nothing
changed, to reuse the set. Knobs: --config.temperature, --config.top_k,
--config.num_views (K: eval crop + K−1 augmented views),
--config.teachers.<main|regional|third>.{dir,weight,region,region_weight}.
"""
import ml_collections

from configs import common


def teacher_config(directory, weight=1.0, region="", region_weight=1.0):
  c = ml_collections.ConfigDict()
  c.dir = directory               # teacher stage folder under the workdir; "" = not used
  c.weight = weight               # base weight in the per-image weighted mean of probabilities
  c.region = region               # a key of config.regions ("" = everywhere)
  c.region_weight = region_weight  # weight × this on images of that region (country, else species)
  return c


def teachers_config() -> ml_collections.ConfigDict:
  """The ensemble, shared with online distillation (configs/student_distill.py)."""
  c = ml_collections.ConfigDict()
  # Keys are Python identifiers so `--config.teachers.main.weight=2` parses ("global" would not).
  c.main = teacher_config("teacher_global", weight=1.0)
  # Trained on Spain only: trusted more there (2.0 vs 1.0), less elsewhere (0.5 vs 1.0).
  c.regional = teacher_config("teacher_regional", weight=0.5, region="spain", region_weight=4.0)
  c.third = teacher_config("")    # optional, e.g. a bigger model: set dir to its stage folder
  return c


def get_config(arg=None):
  variants, _ = common.parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.stage = "soft_labels"
  config.seed = 0                 # drives the augmented views
  config.output_dir = "soft_labels"
  config.dataset_dir = "dataset"
  config.splits = ("train", "val")  # val for monitoring (student–teacher agreement)
  config.temperature = 3.0        # probabilities = softmax(logits / T)
  config.top_k = 10               # kept per image (+ the remaining mass)
  config.num_views = 1            # K: 1 = eval crop only; K > 1 averages K−1 augmented views too
  config.batch_size = 256         # teacher inference batch (all local devices)
  config.chunk_size = 8192        # records per resumable chunk file
  config.regions = common.regions_config()
  config.teachers = teachers_config()

  a = config.augment = ml_collections.ConfigDict()  # the augmented views (num_views > 1)
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
    config.input.worker_count = 0
    config.input.read_threads = 2
    config.input.prefetch_buffer_size = 16
  return config
