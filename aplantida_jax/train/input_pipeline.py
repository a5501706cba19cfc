"""Grain input pipelines over the export stage's ArrayRecord shards.

Batches hold `image` (uint8 NHWC; `models.preprocess.normalize` applies the ImageNet
mean/std on device, so 4x fewer bytes cross process and PCIe boundaries),
`label` (int32), `index` (int32 record index in the split) and whatever a
task's `join_fn(index, epoch, position, record)` adds per record (e.g. soft
labels). Train batches also hold `epoch`, `crop_epoch` and `position` (the record's
position in the train view); eval batches hold `mask` (1 real, 0 padding).
`DevicePrefetch` keeps the next batches on device while a step runs.

Train randomness is a pure function of (config.seed, epoch, view position):
`EpochIndexSampler` puts the epoch into the record key, `RecordSource` splits
it back, the workers crop with `augment.Augment` of (seed, epoch, position) and
the train step flips and jitters on device from the same triple (train batches
carry `crop_epoch`, the epoch whose view was drawn). Batches therefore depend on the seed and the
sampler position only (not on worker count or timing), the iterator state is
checkpointable, and the soft-label stage can replay the very crops the student
will see (distill/soft_labels.py). A join_fn with a `crop_epochs` attribute
E > 0 holds targets for the crops of epochs 0..E−1 only: the train loader then
draws epoch e's crops as those of epoch e % E and hands the join that epoch.
Eval elements are epoch 0 at position = record index.

Worker processes start with spawn, so everything handed to a DataLoader is a
top-level, picklable class. A worker exits when its stage's process is gone,
however that ended (`exit_with_parent`): a SIGKILLed run leaves no workers behind.
"""

import collections
import dataclasses
import hashlib
import io
import math
import multiprocessing
import os
import sys
import threading
import time

import grain
import numpy as np
from absl import logging
from PIL import Image

from aplantida_jax.data import records
from aplantida_jax.data import shards
from aplantida_jax.train import augment as augment_lib

SAMPLINGS = ("uniform", "class_balanced", "region_weighted")
PARENT_POLL_S = 1.0
_watching_parent = False


def exit_with_parent():
  """In a Grain worker (a spawned child): exit as soon as the stage's process is gone.

  A SIGKILLed parent runs no cleanup, so without this its workers would live on,
  reparented, holding memory. Called on every record read; starts one daemon thread
  per worker that polls the parent pid. A no-op in the stage's own process.
  """
  global _watching_parent
  if _watching_parent:
    return
  parent = multiprocessing.parent_process()
  if parent is None:
    return
  _watching_parent = True

  def watch(pid=parent.pid):
    while os.getppid() == pid:
      time.sleep(PARENT_POLL_S)
    os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class RecordSource(grain.sources.RandomAccessDataSource):
  """The split's records seen through `view` (record indices), keyed by epoch and position.

  Key k reads position j = k mod len(view) of epoch k // len(view): record
  view[j] (record j without a view). A view selects (region filter) or
  resamples (weighted sampling) records without copying them. Elements carry
  `index` (the record index in the split, so that joins and predictions line up
  with the shards), `epoch`, `position` and the record bytes; keys below
  `num_positions` are epoch 0.

  Grain reads `data_source[key % len(data_source)]`, which would fold every
  epoch back into epoch 0: `epoch_keys=True` (for EpochIndexSampler) makes
  len() unbounded; otherwise len() is the number of positions.
  """

  def __init__(self, paths, view=None, *, epoch_keys=False):
    self._paths = list(paths)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self._paths)
    except RuntimeError:
      shards.check_readable(self._paths)  # names the file
      raise
    self._view = None if view is None else np.asarray(view, np.int64)
    self._epoch_keys = epoch_keys

  @property
  def num_positions(self):
    return len(self._source) if self._view is None else len(self._view)

  def __len__(self):
    return sys.maxsize if self._epoch_keys else self.num_positions

  def __repr__(self):
    # Grain compares this with the checkpointed iterator's: a resumed run must
    # read the same shards through the same view.
    view = "all" if self._view is None else hashlib.sha256(self._view.tobytes()).hexdigest()[:16]
    keys = ", epoch_keys" if self._epoch_keys else ""
    return f"RecordSource({self._source!r}, view={view}{keys})"

  def record_index(self, position):
    """Record index (or indices, for an array) in the split at view position(s)."""
    return position if self._view is None else self._view[position]

  def __getitem__(self, key):
    exit_with_parent()
    epoch, position = divmod(int(key), self.num_positions)
    index = int(self.record_index(position))
    try:
      data = self._source[index]
    except RuntimeError as e:
      path, within = shards.locate(self._paths, index)
      raise shards.corrupt(path, e, f" at record {within}") from None
    return {"index": index, "epoch": epoch, "position": position, "data": data}


class EpochIndexSampler(grain.samplers.IndexSampler):
  """Grain's IndexSampler (shuffle, sharding, state) whose keys carry the epoch.

  record_key = epoch * num_records + record, where epoch is that of the
  position in this process's shard (IndexSampler repeats the shard, reshuffled
  each epoch; `_record_keys` holds one shard-epoch). Pair it with
  RecordSource(epoch_keys=True). There is no per-record rng: randomness comes
  from (seed, epoch, position) in the transforms.
  """

  def __getitem__(self, index):
    metadata = super().__getitem__(index)
    epoch = index // self._shard_options.shard_count // len(self._record_keys)
    return dataclasses.replace(
      metadata, record_key=epoch * self._num_records + metadata.record_key, rng=None
    )

  def __repr__(self):
    return "Epoch" + super().__repr__()  # EpochIndexSampler(num_records=..., seed=...)


# JPEG draft decoding keeps at least this many times the output's resolution: at 1× the DCT's
# 8×8 block average, not the antialiased bilinear resize, would set the filter (BUILD.md).
DRAFT_OVERSAMPLE = 3


def resized_crop(image: Image.Image, box, size: int, *, draft: bool = True) -> Image.Image:
  """`box` (source pixels) resized to size×size with antialiasing, decoding only what it needs.

  With `draft`, JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still
  leaves DRAFT_OVERSAMPLE× the output's pixels across the box; the box is scaled
  into the drafted image, so it covers the same part of the photo whatever the
  output size. A 320 px shard is never drafted at sizes of 47 px and more.
  `draft=False` decodes every pixel: what the browser computes (web/app.js), bit
  for bit, since a page cannot decode a JPEG at a DCT scale.
  """
  width, height = image.size
  left, top, crop_w, crop_h = box
  if draft:
    scale = DRAFT_OVERSAMPLE * size
    image.draft("RGB", (math.ceil(width * scale / crop_w), math.ceil(height * scale / crop_h)))
  scale_x, scale_y = image.size[0] / width, image.size[1] / height
  scaled = (left * scale_x, top * scale_y, (left + crop_w) * scale_x, (top + crop_h) * scale_y)
  return image.convert("RGB").resize((size, size), Image.BILINEAR, box=scaled)


def centre_crop(jpeg: bytes, size: int, crop_fraction: float, *, draft: bool = True) -> np.ndarray:
  """Centre square of `crop_fraction` of the short side, resized: uint8 [size, size, 3]."""
  image = Image.open(io.BytesIO(jpeg))
  width, height = image.size
  side = max(1, round(min(width, height) * crop_fraction))
  box = ((width - side) // 2, (height - side) // 2, side, side)
  return np.asarray(resized_crop(image, box, size, draft=draft), np.uint8)


def _fields(element, record, image, join_fn, epoch):
  out = {
    "image": np.asarray(image, np.uint8),
    "label": np.int32(record["label"]),
    "index": np.int32(element["index"]),
  }
  if join_fn is not None:
    out.update(join_fn(element["index"], epoch, element["position"], record))
  return out


class TrainTransform(grain.transforms.Map):
  """Decode + the host half of Augment (the crop) at the element's (epoch, position), the join.

  crop_epochs = E > 0: epoch e draws the views of epoch e % E (`crop_epoch`), and the
  join sees that epoch (the views a replayed soft-label set has targets for). The train
  step applies the device half (flip, jitter) keyed by (crop_epoch, position).
  """

  def __init__(self, image_size, augment: augment_lib.Augment, join_fn=None, *, crop_epochs=0):
    self.image_size = image_size
    self.augment = augment
    self.crop_epochs = crop_epochs
    self.join_fn = join_fn

  def map(self, element):
    record = shards.decode(element["data"])
    epoch = element["epoch"] % self.crop_epochs if self.crop_epochs else element["epoch"]
    image = self.augment.crop(record["jpeg"], epoch, element["position"], self.image_size)
    return {
      **_fields(element, record, image, self.join_fn, epoch),
      "epoch": np.int32(element["epoch"]),
      "crop_epoch": np.int32(epoch),
      "position": np.int32(element["position"]),
    }


class EvalTransform(grain.transforms.Map):
  """Decode + centre crop of `crop_fraction` of the short side, resized."""

  def __init__(self, image_size, crop_fraction=0.875, join_fn=None):
    self.image_size = image_size
    self.crop_fraction = crop_fraction
    self.join_fn = join_fn

  def map(self, element):
    record = shards.decode(element["data"])
    image = centre_crop(record["jpeg"], self.image_size, self.crop_fraction)
    return _fields(element, record, image, self.join_fn, element["epoch"])


class DevicePrefetch:
  """An iterator of `put(batch)` (device arrays) kept `depth` batches ahead of the consumer.

  jax.device_put is asynchronous, so the next batches' host-to-device copies overlap the
  running step (the Grain workers already overlap decoding). Checkpointable like the Grain
  iterator it wraps: get_state() is the state after the last batch *handed out*, not after
  the ones waiting on device, so a resumed run sees exactly the batches a straight run
  would; set_state() drops what was prefetched.
  """

  def __init__(self, iterator, put, depth=2):
    self._iterator = iterator
    self._put = put
    self._depth = depth
    self._ahead = collections.deque()  # (device batch, iterator state after it)
    self._state = iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    while len(self._ahead) < max(self._depth, 1):
      batch = next(self._iterator)
      self._ahead.append((self._put(batch), self._iterator.get_state()))
    batch, self._state = self._ahead.popleft()
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state):
    self._ahead.clear()
    self._iterator.set_state(state)
    self._state = state

  def start_prefetch(self):
    """Grain's checkpoint handler calls this after set_state: start the workers early."""
    self._iterator.start_prefetch()


def read_metadata(dataset_dir: str, split: str) -> dict:
  """Per-record label, regions and sha256 of a split, in record order."""
  labels, regions, sha256 = [], [], []
  for _, record in shards.split_records(dataset_dir, split):
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
    return np.array(
      [
        input_config.region_weight if records.in_region(r, countries) else 1.0
        for r in metadata["regions"]
      ]
    )
  raise ValueError(
    f"config.input.sampling={input_config.sampling!r} has no weights; choose one of {SAMPLINGS}."
  )


def train_view(input_config, dataset_dir, split, num_samples, seed):
  """Record indices the train loader draws from (None = every record once per epoch).

  `region_filter` keeps only the region's records; weighted samplings draw
  `num_samples` indices with replacement (seeded), enough for the whole run.
  """
  if input_config.sampling not in SAMPLINGS:
    raise ValueError(
      f"Unknown config.input.sampling={input_config.sampling!r}; choose one of {SAMPLINGS}."
    )
  region_filter = tuple(input_config.region_filter)
  if input_config.sampling == "uniform" and not region_filter:
    return None
  metadata = read_metadata(dataset_dir, split)
  candidates = np.arange(len(metadata["labels"]))
  if region_filter:
    candidates = np.array(
      [i for i in candidates if records.in_region(metadata["regions"][i], region_filter)], np.int64
    )
    if not len(candidates):
      raise ValueError(
        f"No {split} record is in config.input.region_filter={list(region_filter)}; "
        "check the region codes against dataset/manifest.json."
      )
    logging.info(
      "region filter %s keeps %d of %d %s records",
      list(region_filter),
      len(candidates),
      len(metadata["labels"]),
      split,
    )
  if input_config.sampling == "uniform":
    return candidates
  weights = sampling_weights(input_config, metadata)[candidates]
  rng = np.random.default_rng(seed)
  return candidates[rng.choice(len(candidates), size=num_samples, p=weights / weights.sum())]


def data_loader(source, sampler, operations, input_config) -> grain.DataLoader:
  """A Grain DataLoader with the config's worker processes, worker buffers and read threads."""
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=operations,
    worker_count=input_config.worker_count,
    worker_buffer_size=input_config.worker_buffer_size,
    read_options=grain.ReadOptions(
      num_threads=input_config.read_threads, prefetch_buffer_size=input_config.prefetch_buffer_size
    ),
  )


def train_loader(config, dataset_dir, process_batch_size, *, num_samples, join_fn=None):
  """Endless shuffled, augmented batches of this process's share of the split.

  `num_samples` (records the whole run consumes, all processes) sizes the
  weighted-sampling draw. ShardByJaxProcess gives each host a disjoint part.
  Crops are drawn from (config.seed, epoch, view position); see the module doc
  for a join_fn's `crop_epochs`.
  """
  inp = config.input
  view = train_view(inp, dataset_dir, config.train_split, num_samples, config.seed)
  source = RecordSource(shards.shard_paths(dataset_dir, config.train_split), view, epoch_keys=True)
  sampler = EpochIndexSampler(
    num_records=source.num_positions,
    shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
    shuffle=True,
    num_epochs=None,
    seed=config.seed,
  )
  crop_epochs = getattr(join_fn, "crop_epochs", 0)
  epochs = num_samples / source.num_positions
  if crop_epochs and epochs > crop_epochs:
    logging.warning(
      "this run draws %.1f epochs but its targets cover the crops of %d: epoch e "
      "reuses the crops (and targets) of epoch e %% %d. Re-run soft_labels with "
      "--config.replay_epochs=%d for fresh crops every epoch.",
      epochs,
      crop_epochs,
      crop_epochs,
      math.ceil(epochs),
    )
  transform = TrainTransform(
    inp.image_size,
    augment_lib.Augment.of(inp, config.seed),
    join_fn,
    crop_epochs=crop_epochs,
  )
  return data_loader(
    source,
    sampler,
    [transform, grain.transforms.Batch(process_batch_size, drop_remainder=True)],
    inp,
  )


def eval_batches(
  input_config, dataset_dir, split, process_batch_size, *, join_fn=None, shard_by_process=True
):
  """One pass over the split; every record appears exactly once with mask 1.

  Short batches are padded (mask 0), and every process yields the same number
  of batches so that collective ops in the eval step never wait forever.
  """
  source = RecordSource(shards.shard_paths(dataset_dir, split))
  shard_options = (
    grain.sharding.ShardByJaxProcess(drop_remainder=False)
    if shard_by_process
    else grain.sharding.NoSharding()
  )
  sampler = grain.samplers.IndexSampler(
    num_records=len(source), shard_options=shard_options, shuffle=False, num_epochs=1
  )
  loader = data_loader(
    source,
    sampler,
    [
      EvalTransform(input_config.image_size, input_config.eval_crop_fraction, join_fn),
      grain.transforms.Batch(process_batch_size, drop_remainder=False),
    ],
    input_config,
  )
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
  padded = {
    k: np.concatenate([v, np.zeros((size - real,) + v.shape[1:], v.dtype)])
    for k, v in batch.items()
  }
  padded["mask"] = (np.arange(size) < real).astype(np.float32)
  return padded
