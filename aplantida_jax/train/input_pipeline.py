"""Grain input pipelines over the export stage's ArrayRecord shards.

Batches hold `image` (uint8 NHWC; `steps.normalize_images` applies the ImageNet
mean/std on device, so 4x fewer bytes cross process and PCIe boundaries),
`label` (int32), `index` (int32 record index in the split) and whatever a
task's `join_fn(index, record)` adds per record (e.g. soft labels). Eval
batches also hold `mask` (1 real, 0 padding).

Worker processes start with spawn, so everything handed to a DataLoader is a
top-level, picklable class. Randomness comes from Grain's per-record rng,
seeded from config.seed: batches depend on the seed and the record position
only, not on worker count or timing, and the iterator state is checkpointable.
"""
import hashlib
import io
import math

import grain
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from aplantida_jax.data import records
from aplantida_jax.data import shards

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLINGS = ("uniform", "class_balanced", "region_weighted")


class RecordSource(grain.sources.RandomAccessDataSource):
  """The split's records, optionally seen through `view` (record indices).

  A view selects (region filter) or resamples (weighted sampling) records
  without copying them; each element carries its record index so that joins
  and predictions line up with the shards.
  """

  def __init__(self, paths, view=None):
    self._source = grain.sources.ArrayRecordDataSource(list(paths))
    self._view = None if view is None else np.asarray(view, np.int64)

  def __len__(self):
    return len(self._source) if self._view is None else len(self._view)

  def __repr__(self):
    # Grain compares this with the checkpointed iterator's: a resumed run must
    # read the same shards through the same view.
    view = "all" if self._view is None else hashlib.sha256(self._view.tobytes()).hexdigest()[:16]
    return f"RecordSource({self._source!r}, view={view})"

  def __getitem__(self, key):
    index = int(key if self._view is None else self._view[key])
    return {"index": index, "data": self._source[index]}


def _open_jpeg(data: bytes, crop_box, size: int):
  """Decodes only as many pixels as the crop needs (JPEG draft mode)."""
  image = Image.open(io.BytesIO(data))
  width, height = image.size
  left, top, crop_w, crop_h = crop_box(width, height)
  image.draft("RGB", (math.ceil(width * size / crop_w),
                      math.ceil(height * size / crop_h)))
  scale_x, scale_y = image.size[0] / width, image.size[1] / height
  box = (left * scale_x, top * scale_y, (left + crop_w) * scale_x,
         (top + crop_h) * scale_y)
  return image.convert("RGB").resize((size, size), Image.BILINEAR, box=box)


def _fields(element, record, image, join_fn):
  out = {"image": np.asarray(image, np.uint8),
         "label": np.int32(record["label"]),
         "index": np.int32(element["index"])}
  if join_fn is not None:
    out.update(join_fn(element["index"], record))
  return out


class TrainTransform(grain.transforms.RandomMap):
  """Decode + random-resized crop + horizontal flip + mild colour jitter."""

  def __init__(self, image_size, crop_scale=(0.08, 1.0),
               crop_ratio=(3 / 4, 4 / 3), color_jitter=0.2, join_fn=None):
    self.image_size = image_size
    self.crop_scale = tuple(crop_scale)
    self.crop_ratio = tuple(crop_ratio)
    self.color_jitter = color_jitter
    self.join_fn = join_fn

  def _crop_box(self, rng):
    """Inception-style crop: area fraction and aspect ratio drawn in `rng`."""
    def box(width, height):
      area = width * height
      log_ratio = np.log(self.crop_ratio)
      for _ in range(10):
        target = area * rng.uniform(*self.crop_scale)
        ratio = np.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
          return (rng.integers(0, width - w + 1), rng.integers(0, height - h + 1), w, h)
      side = min(width, height)  # fallback: centre square
      return ((width - side) // 2, (height - side) // 2, side, side)
    return box

  def random_map(self, element, rng: np.random.Generator):
    record = shards.decode(element["data"])
    image = _open_jpeg(record["jpeg"], self._crop_box(rng), self.image_size)
    pixels = np.asarray(image, np.float32)
    if rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    if self.color_jitter:
      low, high = 1 - self.color_jitter, 1 + self.color_jitter
      brightness, contrast, saturation = rng.uniform(low, high, size=3)
      pixels = pixels * brightness
      pixels = (pixels - pixels.mean()) * contrast + pixels.mean()
      gray = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
      pixels = (pixels - gray[..., None]) * saturation + gray[..., None]
    pixels = np.clip(np.rint(pixels), 0, 255)
    return _fields(element, record, pixels, self.join_fn)


class EvalTransform(grain.transforms.Map):
  """Decode + centre crop of `crop_fraction` of the short side, resized."""

  def __init__(self, image_size, crop_fraction=0.875, join_fn=None):
    self.image_size = image_size
    self.crop_fraction = crop_fraction
    self.join_fn = join_fn

  def _crop_box(self, width, height):
    side = max(1, round(min(width, height) * self.crop_fraction))
    return ((width - side) // 2, (height - side) // 2, side, side)

  def map(self, element):
    record = shards.decode(element["data"])
    image = _open_jpeg(record["jpeg"], self._crop_box, self.image_size)
    return _fields(element, record, image, self.join_fn)


def read_metadata(dataset_dir: str, split: str) -> dict:
  """Per-record label, regions and sha256 of a split, in record order."""
  labels, regions, sha256 = [], [], []
  for path in shards.shard_paths(dataset_dir, split):
    for record in tqdm(shards.read_shard(path), desc=f"metadata {split}", leave=False,
                       disable=None):
      labels.append(record["label"])
      regions.append(list(record["regions"]))
      sha256.append(record["sha256"])
  return {"labels": np.asarray(labels, np.int32), "regions": regions, "sha256": sha256}


def sampling_weights(input_config, metadata) -> np.ndarray:
  """Per-record sampling weight; class_balanced flattens the long tail."""
  if input_config.sampling == "class_balanced":
    counts = np.bincount(metadata["labels"])
    return 1.0 / counts[metadata["labels"]] ** input_config.class_balance_power
  if input_config.sampling == "region_weighted":
    countries = tuple(input_config.region_countries)
    return np.array([input_config.region_weight if records.in_region(r, countries) else 1.0
                     for r in metadata["regions"]])
  raise ValueError(f"config.input.sampling={input_config.sampling!r} has no weights; "
                   f"choose one of {SAMPLINGS}.")


def train_view(input_config, dataset_dir, split, num_samples, seed):
  """Record indices the train loader draws from (None = every record once per epoch).

  `region_filter` keeps only the region's records; weighted samplings draw
  `num_samples` indices with replacement (seeded), enough for the whole run.
  """
  if input_config.sampling not in SAMPLINGS:
    raise ValueError(f"Unknown config.input.sampling={input_config.sampling!r}; "
                     f"choose one of {SAMPLINGS}.")
  region_filter = tuple(input_config.region_filter)
  if input_config.sampling == "uniform" and not region_filter:
    return None
  metadata = read_metadata(dataset_dir, split)
  candidates = np.arange(len(metadata["labels"]))
  if region_filter:
    candidates = np.array([i for i in candidates
                           if records.in_region(metadata["regions"][i], region_filter)], np.int64)
    if not len(candidates):
      raise ValueError(f"No {split} record is in config.input.region_filter={list(region_filter)}; "
                       "check the region codes against dataset/manifest.json.")
    logging.info("region filter %s keeps %d of %d %s records", list(region_filter),
                 len(candidates), len(metadata["labels"]), split)
  if input_config.sampling == "uniform":
    return candidates
  weights = sampling_weights(input_config, metadata)[candidates]
  rng = np.random.default_rng(seed)
  return candidates[rng.choice(len(candidates), size=num_samples, p=weights / weights.sum())]


def data_loader(source, sampler, operations, input_config) -> grain.DataLoader:
  """A Grain DataLoader with the config's worker processes, worker buffers and read threads."""
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations,
      worker_count=input_config.worker_count, worker_buffer_size=input_config.worker_buffer_size,
      read_options=grain.ReadOptions(num_threads=input_config.read_threads,
                                     prefetch_buffer_size=input_config.prefetch_buffer_size))


def train_loader(config, dataset_dir, process_batch_size, *, num_samples, join_fn=None):
  """Endless shuffled, augmented batches of this process's share of the split.

  `num_samples` (records the whole run consumes, all processes) sizes the
  weighted-sampling draw. ShardByJaxProcess gives each host a disjoint part.
  """
  inp = config.input
  view = train_view(inp, dataset_dir, config.train_split, num_samples, config.seed)
  source = RecordSource(shards.shard_paths(dataset_dir, config.train_split), view)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
      shuffle=True, num_epochs=None, seed=config.seed)
  transform = TrainTransform(inp.image_size, tuple(inp.crop_scale), tuple(inp.crop_ratio),
                             inp.color_jitter, join_fn)
  return data_loader(
      source, sampler, [transform, grain.transforms.Batch(process_batch_size, drop_remainder=True)],
      inp)


def eval_batches(input_config, dataset_dir, split, process_batch_size, *, join_fn=None,
                 shard_by_process=True):
  """One pass over the split; every record appears exactly once with mask 1.

  Short batches are padded (mask 0), and every process yields the same number
  of batches so that collective ops in the eval step never wait forever.
  """
  source = RecordSource(shards.shard_paths(dataset_dir, split))
  shard_options = (grain.sharding.ShardByJaxProcess(drop_remainder=False) if shard_by_process
                   else grain.sharding.NoSharding())
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options,
                                        shuffle=False, num_epochs=1)
  loader = data_loader(
      source, sampler,
      [EvalTransform(input_config.image_size, input_config.eval_crop_fraction, join_fn),
       grain.transforms.Batch(process_batch_size, drop_remainder=False)],
      input_config)
  share = math.ceil(len(source) / shard_options.shard_count)
  num_batches = math.ceil(share / process_batch_size)
  template = None
  for batch in loader:
    template = batch
    num_batches -= 1
    yield _pad(batch, process_batch_size)
  for _ in range(num_batches):  # this process ran out before the others
    yield _pad({k: v[:0] for k, v in template.items()}, process_batch_size)


def _pad(batch, size):
  real = len(batch["label"])
  padded = {k: np.concatenate([v, np.zeros((size - real,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}
  padded["mask"] = (np.arange(size) < real).astype(np.float32)
  return padded
