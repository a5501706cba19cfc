"""Stage "soft_labels": the teacher ensemble's tempered predictions, stored sparse.

What the teachers see:
  replayed split (config.replay.split, "train"; config.replay_epochs = E > 0):
      the student's own crops ("consistent teaching", Beyer et al. 2022, with
      targets precomputed as TinyViT stores its teachers' logits). Row
      e * N + j (e < E) is view position j of epoch e: record view[j] of the
      student's train view (input_pipeline.train_view of config.replay's
      sampling and region_filter; N = len(view)), cropped, flipped and jittered
      by augment.Augment(config.replay's crops, seed) at (e, j), exactly
      as the student's train loader draws it. The box is in source pixels, so
      every teacher sees the same view at its own resolution.
  other splits (val, for monitoring), and train when E = 0: the eval crop
      (plus K−1 augmented views when config.num_views = K; view v of record i
      is Augment(config.augment, config.seed) at (v, i)). Row i = record i.
Each teacher's probabilities at temperature T are averaged over views, then
over teachers with per-image weights (a regional teacher counts
`region_weight` times more on images of its region: image country, else the
species' regions, as stored in the shards). Only the top-k probabilities
(float16), their classes (int16 below 32,768 classes, else int32) and the
remaining mass are kept per row (k × 4 + 4 bytes with int16), plus the record
sha256 once per view position (32 bytes: every epoch's row e * N + j shows
record view[j]). Dense storage is N × C × 2 bytes (900k images × 9,000
classes ≈ 16 GB a row per image) against the user's 3.3 GB budget; replaying
E = 16 epochs sparse is ≈ 0.66 GB at k = 10 (14.4M rows × 44 bytes + 900k
positions × 32 bytes).

  <workdir>/soft_labels/meta.json                 T, k, teachers, dataset hash, rows per split
                                                  ("counts"), and "replay": what the crops
                                                  depend on (split, epochs, num_positions,
                                                  view_sha256, seed, crop_scale, crop_ratio,
                                                  color_jitter, sampling, region_filter);
                                                  null for centre views only
  <workdir>/soft_labels/<split>/probs.npy         [rows, k] float16 (teacher probabilities at T)
                               classes.npy        [rows, k] int16 (int32 from 32,768 classes)
                               rest.npy           [rows] float32 (1 − Σ probs)
                               sha256.npy         [N, 32] uint8: position j's record sha256
                                                  (view[j]; for centre views N rows = N
                                                  records), for alignment
  <workdir>/soft_labels/chunks/                   resumable work (atomic .npz per chunk of rows)

`open_split` refuses a set made for another dataset or of another size (rows
or positions), `SoftLabelJoin` checks the sha256 of each row's position
against the record it is joined to, and distill/loop.py refuses a student
whose seed, crops or view differ from meta.json "replay", so a misaligned set
fails instead of training on the wrong targets.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from aplantida_jax import errors
from aplantida_jax import fileio
from aplantida_jax import hashing
from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import records
from aplantida_jax.data import shards
from aplantida_jax.distill import losses
from aplantida_jax.train import augment as augment_lib
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import sharding
from aplantida_jax.train import steps

META_FILE = "meta.json"
ARRAYS = ("probs", "classes", "rest", "sha256")
REFERENCE = dict(images=900_000, classes=9_000, budget_bytes=3.3e9)  # the user's plan


def class_dtype(num_classes: int):
  """The stored class-index type: int16 while every index fits, else int32."""
  return np.int16 if num_classes <= np.iinfo(np.int16).max + 1 else np.int32


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One loaded teacher and how much it counts."""

  name: str
  dir: str  # stage folder under the workdir
  model: Any
  variables: Any
  image_size: int
  eval_crop_fraction: float
  weight: float
  countries: tuple  # its region (empty = everywhere)
  region_weight: float  # weight multiplier on images of its region
  checkpoint_sha256: str


def active_teachers(config):
  """(name, teacher config) of the teachers with a folder set, in config order."""
  return [(name, t) for name, t in config.teachers.items() if t.dir]


def teacher_countries(config, teacher_config):
  if not teacher_config.region:
    return ()
  if teacher_config.region not in config.regions:
    raise ValueError(
      f"teacher region {teacher_config.region!r} is not in config.regions "
      f"({sorted(config.regions)}); fix config.teachers.*.region."
    )
  return tuple(config.regions[teacher_config.region])


def load_teachers(config, workdir, num_classes):
  """Every active teacher's model, best variables and checkpoint hash."""
  teachers = []
  for name, t in active_teachers(config):
    stage_dir = os.path.join(workdir, t.dir)
    stage = workdir_lib.TrainedStage(stage_dir)
    if not stage.trained:
      raise FileNotFoundError(
        f"Teacher {name!r}: {stage_dir}/{workdir_lib.CONFIG_FILE} is "
        f"missing; train it first or clear config.teachers.{name}.dir."
      )
    if t.weight <= 0 or t.region_weight <= 0:
      raise ValueError(
        f"config.teachers.{name}: weight={t.weight} and region_weight="
        f"{t.region_weight} must be > 0 (clear .dir to leave the teacher out)."
      )
    teacher_config = stage.config
    if teacher_config.model.num_classes != num_classes:
      raise ValueError(
        f"Teacher {name!r} ({stage_dir}) has {teacher_config.model.num_classes} "
        f"classes, the dataset {num_classes}: retrain it on this dataset."
      )
    teachers.append(
      Teacher(
        name=name,
        dir=t.dir,
        model=models.from_config(teacher_config.model),
        variables=checkpointing.load_variables(stage_dir, "best"),
        image_size=teacher_config.input.image_size,
        eval_crop_fraction=teacher_config.input.eval_crop_fraction,
        weight=float(t.weight),
        countries=teacher_countries(config, t),
        region_weight=float(t.region_weight),
        checkpoint_sha256=hashing.folder_hash(os.path.join(stage_dir, "best")),
      )
    )
  if not teachers:
    raise ValueError("No teacher: set config.teachers.<name>.dir to a trained teacher folder.")
  return teachers


class TeacherWeights:
  """Per-record teacher weights [T]: base weight, × region_weight in the teacher's region.

  A picklable join_fn (also used by online distillation).
  """

  def __init__(self, weights, countries, region_weights):
    self.weights = tuple(weights)
    self.countries = tuple(tuple(c) for c in countries)
    self.region_weights = tuple(region_weights)

  @classmethod
  def of(cls, teachers):
    return cls(
      [t.weight for t in teachers],
      [t.countries for t in teachers],
      [t.region_weight for t in teachers],
    )

  def __call__(self, index, epoch, position, record):
    del index, epoch, position
    w = [
      w * (rw if c and records.in_region(record["regions"], c) else 1.0)
      for w, c, rw in zip(self.weights, self.countries, self.region_weights)
    ]
    return {"teacher_weights": np.asarray(w, np.float32)}


class TeacherViews(grain.transforms.Map):
  """A row's element → the images its teachers see, per distinct teacher input (size, crop).

  replay (an augment.Augment): the student's view of the element's (epoch, position),
  one view. Otherwise the eval crop plus num_views − 1 views of `augment` at (view,
  record index). Either way the same view for every teacher, independent of chunking,
  batch size and workers. The host makes the crops; `view_augments` says which views
  ensemble_topk flips and jitters on device, keyed by the batch's `view_epoch_<v>` and
  `view_position_<v>`.
  """

  def __init__(self, crops, weights, *, num_views=1, augment=None, replay=None):
    self.crops = tuple(crops)  # (image_size, eval_crop_fraction) per distinct teacher input
    self.weights = weights
    self.num_views = num_views
    self.augment = augment
    self.replay = replay

  def views(self, epoch, position, index):
    """Per view: (the Augment whose crop and device half it gets, its (epoch, position)
    key), or (None, None) for the eval crop."""
    if self.replay is not None:
      return [(self.replay, (epoch, position))]
    return [(None, None)] + [(self.augment, (v, index)) for v in range(1, self.num_views)]

  @property
  def view_augments(self) -> tuple:
    """Per view: the Augment whose device half it gets, or None (the eval crop)."""
    return tuple(augment for augment, _ in self.views(0, 0, 0))

  def map(self, element):
    record = shards.decode(element["data"])
    epoch, position, index = element["epoch"], element["position"], element["index"]
    out = {
      "index": np.int32(index),
      "epoch": np.int32(epoch),
      "position": np.int32(position),
      "label": np.int32(record["label"]),
      "sha256": np.frombuffer(bytes.fromhex(record["sha256"]), np.uint8),
      **self.weights(index, epoch, position, record),
    }
    views = self.views(epoch, position, index)
    for v, (_, key) in enumerate(views):
      if key is not None:
        out[f"view_epoch_{v}"], out[f"view_position_{v}"] = np.int32(key[0]), np.int32(key[1])
    jpeg = record["jpeg"]
    for size, fraction in self.crops:
      for v, (augment, key) in enumerate(views):
        out[view_key(size, fraction, v)] = (
          input_pipeline.centre_crop(jpeg, size, fraction)
          if augment is None
          else augment.crop(jpeg, *key, size)
        )
    return out


_HOST_FIELDS = ("index", "epoch", "position", "label", "sha256")  # TeacherViews' non-device fields


def view_key(image_size, crop_fraction, view):
  return f"image_{image_size}_{crop_fraction}_{view}"


def teacher_input(batch, key, view, augment):
  """The device batch's images of `key` (one view of one teacher input), with the view's
  device half of `augment` (flip, jitter) applied when it has one."""
  images = batch[key]
  if augment is None:
    return images
  return augment.flip_jitter(images, batch[f"view_epoch_{view}"], batch[f"view_position_{view}"])


def teacher_probs(teacher, variables, images, temperature):
  """softmax(logits / T) of one teacher in eval mode, float32 [B, C]."""
  logits, _ = steps.forward(teacher.model.apply, variables, images, None, train=False)
  return jax.nn.softmax(logits / temperature, axis=-1)


def mix(probs, weights):
  """Per-image weighted mean of per-teacher probabilities: list of [B, C], weights [B, T]."""
  mixed = sum(weights[:, t : t + 1] * p for t, p in enumerate(probs))
  return mixed / jnp.sum(weights, axis=-1, keepdims=True)


def ensemble_topk(variables, batch, *, teachers, view_augments, temperature, k):
  """Teachers' view-averaged tempered probabilities, mixed per image → sparse top-k.

  view_augments: TeacherViews.view_augments of the batch's transform (static).
  """
  probs = [
    sum(
      teacher_probs(
        t,
        v,
        teacher_input(batch, view_key(t.image_size, t.eval_crop_fraction, view), view, augment),
        temperature,
      )
      for view, augment in enumerate(view_augments)
    )
    / len(view_augments)
    for t, v in zip(teachers, variables)
  ]
  return losses.sparse_target(mix(probs, batch["teacher_weights"]), k)


def _pad(batch, size):
  return {
    k: np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)])
    for k, v in batch.items()
  }


def _atomic_save(path, **arrays):
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def replay_spec(config, dataset_dir):
  """(meta["replay"], view) of the replayed split; (None, None) when replay_epochs = 0.

  The view is the student's train view (input_pipeline.train_view), so row
  e * N + j is the crop the student draws at position j in epoch e.
  """
  epochs = config.replay_epochs
  if not epochs:
    return None, None
  r = config.replay
  if r.sampling != "uniform":
    raise ValueError(
      f"config.replay.sampling={r.sampling!r}: only 'uniform' (with or without "
      "replay.region_filter) can be replayed; weighted samplings draw the whole run's records "
      "up front, not epoch by epoch. Distill with config.input.sampling='uniform', or set "
      "--config.replay_epochs=0 for centre-view targets."
    )
  if config.num_views != 1:
    raise ValueError(
      f"config.num_views={config.num_views} with replay_epochs={epochs}: a replayed row is "
      "the teachers' view of one exact student crop, so extra random views would describe "
      "other crops. Set --config.num_views=1 (or --config.replay_epochs=0)."
    )
  if r.split not in config.splits:
    raise ValueError(
      f"config.replay.split={r.split!r} is not in config.splits={list(config.splits)}."
    )
  view = input_pipeline.train_view(r, dataset_dir, r.split, num_samples=0, seed=config.seed)
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, r.split), view)
  positions = np.asarray(source.record_index(np.arange(source.num_positions)), np.int64)
  spec = {
    "split": r.split,
    "epochs": int(epochs),
    "num_positions": source.num_positions,
    "view_sha256": hashlib.sha256(positions.tobytes()).hexdigest(),
    "seed": int(config.seed),
    "crop_scale": [float(x) for x in r.crop_scale],
    "crop_ratio": [float(x) for x in r.crop_ratio],
    "color_jitter": float(r.color_jitter),
    "sampling": r.sampling,
    "region_filter": list(r.region_filter),
    "recipe": augment_lib.VERSION,
  }
  return spec, view


def fingerprint(config, teachers, manifest_sha256, num_classes, replay=None):
  """What the soft labels depend on; chunks of another fingerprint are stale."""
  fields = {
    "temperature": config.temperature,
    "top_k": config.top_k,
    "num_views": config.num_views,
    "seed": config.seed,
    "augment": config.augment.to_dict(),
    "augment_recipe": augment_lib.VERSION,
    "manifest": manifest_sha256,
    "num_classes": num_classes,
    "teachers": [
      (
        t.dir,
        t.checkpoint_sha256,
        t.weight,
        t.countries,
        t.region_weight,
        t.image_size,
        t.eval_crop_fraction,
      )
      for t in teachers
    ],
  }
  if replay:  # absent for centre views, so sets made before replaying keep their fingerprint
    fields["replay"] = replay
  return hashing.sha256_json(fields)


def manifest_sha256(dataset_dir):
  path = os.path.join(dataset_dir, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; run the export stage first (configs/export.py).")
  return fileio.sha256_file(path)


def split_count(dataset_dir, split):
  return len(grain.sources.ArrayRecordDataSource(shards.shard_paths(dataset_dir, split)))


class _Rows(grain.sources.RandomAccessDataSource):
  """Rows start..stop−1 of a RecordSource (row = epoch * N + position): one chunk's work.

  Forwards keys itself: Grain would take them modulo the RecordSource's length.
  """

  def __init__(self, source, start, stop):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, key):
    return self.source[self.start + int(key)]

  def __repr__(self):
    return f"_Rows({self.source!r}, {self.start}, {self.stop})"


def _chunk_loader(config, source, start, stop, transform, batch_size):
  rows = _Rows(source, start, stop)
  sampler = grain.samplers.IndexSampler(
    num_records=len(rows),
    shard_options=grain.sharding.NoSharding(),
    shuffle=False,
    num_epochs=1,
    seed=config.seed,
  )
  return input_pipeline.data_loader(
    rows,
    sampler,
    [transform, grain.transforms.Batch(batch_size, drop_remainder=False)],
    config.input,
  )


def label_split(config, chunk_dir, split, source, epochs, compute, transform, mesh, num_classes):
  """Writes the chunk files of a split's epochs × source.num_positions rows (skipping
  finished ones) → their paths, in row order."""
  num_positions = source.num_positions
  count = epochs * num_positions
  chunk = config.chunk_size
  paths = []
  done = sum(
    os.path.exists(os.path.join(chunk_dir, f"{split}-{start:010d}.npz"))
    for start in range(0, count, chunk)
  )
  if done:
    logging.info("soft labels %s: resuming, %d of %d chunks done", split, done, -(-count // chunk))
  with tqdm(total=count, desc=f"soft labels {split}", unit="img", disable=None) as bar:
    for start in range(0, count, chunk):
      stop = min(start + chunk, count)
      path = os.path.join(chunk_dir, f"{split}-{start:010d}.npz")
      paths.append(path)
      if os.path.exists(path):
        bar.update(stop - start)
        continue
      out = {name: [] for name in ("row",) + ARRAYS}
      for batch in _chunk_loader(config, source, start, stop, transform, config.batch_size):
        real = len(batch["index"])
        device_batch = sharding.global_batch(
          mesh, _pad({k: v for k, v in batch.items() if k not in _HOST_FIELDS}, config.batch_size)
        )
        probs, classes, rest = jax.device_get(compute(device_batch))
        if not (np.isfinite(probs[:real]).all() and np.isfinite(rest[:real]).all()):
          raise errors.StageError(
            f"soft labels {split}: the teachers give NaN/inf probabilities for rows "
            f"[{start}, {stop}); a teacher checkpoint diverged. Re-train it (lower "
            "--config.optimizer.learning_rate) or point --config.teachers.*.dir elsewhere."
          )
        out["probs"].append(probs[:real].astype(np.float16))
        out["classes"].append(classes[:real].astype(class_dtype(num_classes)))
        out["rest"].append(rest[:real].astype(np.float32))
        out["sha256"].append(batch["sha256"])
        out["row"].append(batch["epoch"].astype(np.int64) * num_positions + batch["position"])
        bar.update(real)
      arrays = {name: np.concatenate(v) for name, v in out.items()}
      if not np.array_equal(arrays.pop("row"), np.arange(start, stop)):
        raise RuntimeError(
          f"soft labels {split} rows [{start}, {stop}): records came back out "
          "of order; this is a bug, please report it."
        )
      _atomic_save(path, **arrays)
  return paths


def _write_split(out_dir, split, chunk_paths, rows, num_positions):
  """<split>/<array>.npy from the chunks, one array at a time (memory: one chunk).

  The chunks hold each row's record sha256; sha256.npy keeps it once per view
  position (row e * N + j → entry j, set by epoch 0's rows), after checking
  that every later epoch's row of a position read the same record.
  """
  split_dir = os.path.join(out_dir, split)
  os.makedirs(split_dir, exist_ok=True)
  for name in ARRAYS:
    with fileio.atomic_path(os.path.join(split_dir, f"{name}.npy")) as tmp:
      merged, at = None, 0
      if name == "sha256":
        merged = np.lib.format.open_memmap(
          tmp, mode="w+", dtype=np.uint8, shape=(num_positions, 32)
        )
      for path in chunk_paths:
        with np.load(path) as saved:
          part = saved[name]
        if name == "sha256":
          _merge_positions(merged, part, at, split)
        else:
          if merged is None:
            merged = np.lib.format.open_memmap(
              tmp, mode="w+", dtype=part.dtype, shape=(rows,) + part.shape[1:]
            )
          merged[at : at + len(part)] = part
        at += len(part)
      merged.flush()
      del merged


def _merge_positions(positions, part, start, split):
  """Rows start.. of a chunk (sha256 [n, 32]) into positions [N, 32]: epoch 0 sets, others check.

  Chunks come in row order, so every position is set before a later epoch reads it.
  """
  num_positions = len(positions)
  rows = start + np.arange(len(part))
  first = rows < num_positions
  positions[rows[first]] = part[first]
  if not np.array_equal(positions[rows[~first] % num_positions], part[~first]):
    raise RuntimeError(
      f"soft labels {split} rows [{start}, {start + len(part)}): a view position "
      "read another record than in epoch 0; this is a bug, please report it."
    )


def _folder_bytes(folder):
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files
  )


def storage_report(out_dir, splits, counts, num_classes, k, replay):
  """Disk size of the sparse set vs dense fp16 storage, here and at the user's scale."""
  sparse = sum(_folder_bytes(os.path.join(out_dir, s)) for s in splits)
  dense = sum(counts.values()) * num_classes * 2
  # fp16 probs + int16/int32 classes, float32 rest (at the plan's class count)
  row_bytes = k * (2 + np.dtype(class_dtype(REFERENCE["classes"])).itemsize) + 4
  position_bytes = 32  # the record sha256, once per view position (not per row)
  rows_per_image = replay["epochs"] if replay else 1
  reference = REFERENCE["images"] * (rows_per_image * row_bytes + position_bytes)
  reference_dense = REFERENCE["images"] * rows_per_image * REFERENCE["classes"] * 2
  what = (
    f"{replay['split']}: {replay['epochs']} epochs × {replay['num_positions']} student crops"
    if replay
    else "one centre view per image"
  )
  logging.info(
    "soft labels on disk: %.3f MB sparse (%s; %d bytes a row: k=%d × (fp16 + int32) "
    "+ rest, and %d bytes a position: sha256); dense N×C×fp16 would be %.3f MB. At "
    "the plan's scale (%d images × %d classes, %d rows an image) sparse is %.2f GB "
    "against the %.1f GB budget, dense fp16 %.1f GB.",
    sparse / 1e6,
    what,
    row_bytes,
    k,
    position_bytes,
    dense / 1e6,
    REFERENCE["images"],
    REFERENCE["classes"],
    rows_per_image,
    reference / 1e9,
    REFERENCE["budget_bytes"] / 1e9,
    reference_dense / 1e9,
  )
  return {
    "sparse_bytes": sparse,
    "dense_fp16_bytes": dense,
    "reference_sparse_bytes": reference,
    "reference_dense_fp16_bytes": reference_dense,
    "reference_budget_bytes": REFERENCE["budget_bytes"],
  }


def read_meta(out_dir):
  path = os.path.join(out_dir, META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run(config, workdir) -> dict:
  """Computes (or resumes, or reuses) the soft labels; returns a summary."""
  if jax.process_count() > 1:
    raise ValueError(
      "soft_labels runs as one process (it uses all local devices); start it "
      "without config.mesh.coordinator_address."
    )
  dataset_dir = os.path.join(workdir, config.dataset_dir)
  out_dir = os.path.join(workdir, config.output_dir)
  num_classes = len(workdir_lib.read_classes(dataset_dir))
  k = min(config.top_k, num_classes)
  dataset_hash = manifest_sha256(dataset_dir)
  replay, view = replay_spec(config, dataset_dir)
  teachers = load_teachers(config, workdir, num_classes)
  run_fingerprint = fingerprint(config, teachers, dataset_hash, num_classes, replay)
  meta = read_meta(out_dir)
  if (
    meta
    and meta.get("fingerprint") == run_fingerprint
    and all(
      os.path.exists(os.path.join(out_dir, s, f"{a}.npy")) for s in meta["splits"] for a in ARRAYS
    )
    and all(
      stored_lengths(os.path.join(out_dir, s))
      == expected_lengths(meta["counts"][s], split_positions(meta, s))
      for s in meta["splits"]
    )
  ):
    logging.info("soft labels in %s are up to date", out_dir)
    return {"metric": meta["metric"], **meta["storage"]}

  chunk_dir = os.path.join(out_dir, "chunks")
  stamp = os.path.join(chunk_dir, "fingerprint")
  if os.path.isdir(chunk_dir) and (
    not os.path.exists(stamp) or open(stamp).read() != run_fingerprint
  ):
    logging.warning(
      "dropping stale soft-label chunks in %s (teachers, dataset or config changed)", chunk_dir
    )
    shutil.rmtree(chunk_dir)
  if not os.path.isdir(chunk_dir):
    os.makedirs(chunk_dir)
    with open(stamp, "w") as f:
      f.write(run_fingerprint)

  mesh = sharding.create_mesh()
  sharding.process_batch_size(config.batch_size, mesh)  # checks divisibility
  replicated = sharding.replicated(mesh)
  variables = jax.device_put([t.variables for t in teachers], replicated)
  ensemble = jax.jit(
    functools.partial(ensemble_topk, teachers=teachers, temperature=config.temperature, k=k),
    static_argnames="view_augments",
    out_shardings=replicated,
  )
  crops = sorted({(t.image_size, t.eval_crop_fraction) for t in teachers})
  weights = TeacherWeights.of(teachers)
  centre = TeacherViews(
    crops,
    weights,
    num_views=config.num_views,
    augment=augment_lib.Augment.of(config.augment, config.seed),
  )

  counts, ensemble_top1 = {}, {}
  for split in config.splits:
    replayed = replay is not None and split == replay["split"]
    source = input_pipeline.RecordSource(
      shards.shard_paths(dataset_dir, split), view if replayed else None
    )
    epochs = replay["epochs"] if replayed else 1
    transform = (
      TeacherViews(crops, weights, replay=augment_lib.Augment.of(config.replay, config.seed))
      if replayed
      else centre
    )
    compute = functools.partial(ensemble, variables, view_augments=transform.view_augments)
    paths = label_split(
      config, chunk_dir, split, source, epochs, compute, transform, mesh, num_classes
    )
    rows = epochs * source.num_positions
    _write_split(out_dir, split, paths, rows, source.num_positions)
    labels = input_pipeline.read_metadata(dataset_dir, split)["labels"]
    row_labels = labels[source.record_index(np.arange(rows) % source.num_positions)]
    top1 = np.load(os.path.join(out_dir, split, "classes.npy"), mmap_mode="r")[:, 0]
    counts[split] = rows
    ensemble_top1[split] = float(np.mean(top1 == row_labels)) if rows else 0.0

  storage = storage_report(out_dir, config.splits, counts, num_classes, k, replay)
  metric = ", ".join(f"{s} ensemble top-1 {v:.3f}" for s, v in ensemble_top1.items())
  metric += (
    f"; {storage['sparse_bytes'] / 1e3:.1f} kB on disk "
    f"(dense fp16 {storage['dense_fp16_bytes'] / 1e3:.1f} kB)"
  )
  meta = {
    "temperature": config.temperature,
    "top_k": k,
    "num_views": config.num_views,
    "num_classes": num_classes,
    "dataset_manifest_sha256": dataset_hash,
    "counts": counts,
    "splits": list(config.splits),
    "ensemble_top1": ensemble_top1,
    "storage": storage,
    "replay": replay,
    "teachers": [
      {
        "dir": t.dir,
        "name": t.name,
        "checkpoint_sha256": t.checkpoint_sha256,
        "weight": t.weight,
        "countries": list(t.countries),
        "region_weight": t.region_weight,
        "image_size": t.image_size,
      }
      for t in teachers
    ],
    "fingerprint": run_fingerprint,
    "metric": metric,
  }
  fileio.write_json(os.path.join(out_dir, META_FILE), meta)
  shutil.rmtree(chunk_dir)
  return {"metric": metric, **storage}


class SoftLabelJoin:
  """join_fn(index, epoch, position, record) → that crop's soft labels, sha256-checked.

  Centre views (crop_epochs = 0): row = record index, and sha256.npy entry
  `index` is that record's. Replayed crops (crop_epochs = E): row = epoch *
  num_positions + position, the targets of the crop the train loader draws at
  (epoch, position), and sha256.npy entry `position` is record view[position]'s
  (one entry per position, shared by its E rows); `crop_epochs` also makes the
  loader draw epoch e ≥ E as e % E (input_pipeline.train_loader). Picklable
  (Grain workers); the arrays are memory-mapped on first use.
  """

  def __init__(self, split_dir, crop_epochs=0, num_positions=0):
    self.split_dir = split_dir
    self.crop_epochs = crop_epochs
    self.num_positions = num_positions
    self._arrays = None

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def arrays(self):
    if self._arrays is None:
      self._arrays = {
        name: np.load(os.path.join(self.split_dir, f"{name}.npy"), mmap_mode="r") for name in ARRAYS
      }
    return self._arrays

  def __call__(self, index, epoch, position, record):
    a = self.arrays()
    if not self.crop_epochs:
      row, entry, what = index, index, f"record {index}"
    elif 0 <= epoch < self.crop_epochs and 0 <= position < self.num_positions:
      row, entry = epoch * self.num_positions + position, position
      what = f"epoch {epoch}, position {position}"
    else:
      raise ValueError(
        f"Soft labels in {self.split_dir} replay {self.crop_epochs} epochs × "
        f"{self.num_positions} positions; the loader asked for epoch {epoch}, "
        f"position {position}: use input_pipeline.train_loader, which wraps epochs."
      )
    made_for = a["sha256"][entry].tobytes().hex()
    if made_for != record["sha256"]:
      raise ValueError(
        f"Soft labels in {self.split_dir} are misaligned: row {row} ({what}) was made for "
        f"image {made_for[:12]}… (sha256.npy entry {entry}), the record joined to it (record "
        f"{index}) is {record['sha256'][:12]}…. Re-run the soft_labels stage on this dataset "
        "(with the student's view: --config.replay.sampling / region_filter)."
      )
    return {
      "teacher_probs": np.asarray(a["probs"][row]),
      "teacher_classes": np.asarray(a["classes"][row], np.int32),  # stored int16 or int32
      "teacher_rest": np.float32(a["rest"][row]),
    }


def stored_lengths(split_dir):
  """{array: first dimension} of a stored split, from the .npy headers."""
  return {
    name: len(np.load(os.path.join(split_dir, f"{name}.npy"), mmap_mode="r")) for name in ARRAYS
  }


def expected_lengths(rows, positions):
  """What stored_lengths must say: `rows` of targets, one sha256 per view position."""
  return {name: positions if name == "sha256" else rows for name in ARRAYS}


def split_positions(meta, split):
  """View positions (sha256.npy entries) of a stored split: replayed N, else its rows."""
  replay = meta.get("replay")  # absent in sets made before crops were replayed
  if replay and replay["split"] == split:
    return replay["num_positions"]
  return meta["counts"][split]


def open_split(soft_labels_dir, dataset_dir, split):
  """(SoftLabelJoin, meta) of a split, refusing a set made for another dataset or size."""
  meta = read_meta(soft_labels_dir)
  fix = "re-run the soft_labels stage (configs/soft_labels.py) on this workdir"
  if meta is None:
    raise FileNotFoundError(f"{soft_labels_dir}/{META_FILE} is missing: {fix}.")
  current = manifest_sha256(dataset_dir)
  if meta["dataset_manifest_sha256"] != current:
    raise ValueError(
      f"Soft labels in {soft_labels_dir} were made for another dataset (manifest "
      f"sha256 {meta['dataset_manifest_sha256'][:12]}…, now {current[:12]}…): {fix}."
    )
  if split not in meta["counts"]:
    raise ValueError(
      f"Soft labels in {soft_labels_dir} have no {split!r} split "
      f"(have {meta['splits']}): add it to config.splits and {fix}."
    )
  count = split_count(dataset_dir, split)
  replay = meta.get("replay")
  split_dir = os.path.join(soft_labels_dir, split)
  if replay and replay["split"] == split:
    epochs, positions = replay["epochs"], replay["num_positions"]
    # A region-filtered view is smaller than the split; the sha256 check it when read.
    if not replay["region_filter"] and positions != count:
      raise ValueError(
        f"Soft labels in {soft_labels_dir}/{split} replay {positions} positions, "
        f"the dataset's {split} split has {count} records: {fix}."
      )
    join = SoftLabelJoin(split_dir, epochs, positions)
    expected, what = epochs * positions, f"{epochs} epochs × {positions} crops"
  else:
    join = SoftLabelJoin(split_dir)
    positions, expected, what = count, count, f"{count} records"
  if meta["counts"][split] != expected:
    raise ValueError(
      f"Soft labels in {soft_labels_dir}/{split}: meta.json counts "
      f"{meta['counts'][split]} rows, the dataset's {split} split needs "
      f"{expected} ({what}): {fix}."
    )
  lengths = stored_lengths(split_dir)
  for name, want in expected_lengths(expected, positions).items():
    if lengths[name] != want:
      unit = "sha256 entries (one per view position)" if name == "sha256" else "rows"
      raise ValueError(
        f"Soft labels in {soft_labels_dir}/{split}/{name}.npy holds "
        f"{lengths[name]} {unit}, the dataset's {split} split needs {want} "
        f"({what}): {fix}."
      )
  return join, meta
