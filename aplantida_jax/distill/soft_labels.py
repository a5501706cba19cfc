"""Stage "soft_labels": the teacher ensemble's tempered predictions, stored sparse.

For every record of the train split (and val, for monitoring) each teacher
sees the eval crop (plus K−1 augmented views when config.num_views = K) at its
own resolution; its probabilities at temperature T are averaged over views,
then over teachers with per-image weights (a regional teacher counts
`region_weight` times more on images of its region: image country, else the
species' regions, as stored in the shards). Only the top-k probabilities
(float16), their classes (int32) and the remaining mass are kept: dense
storage is N × C × 2 bytes (900k images × 9,000 classes ≈ 16 GB) against the
user's 3.3 GB budget.

  <workdir>/soft_labels/meta.json                 T, k, teachers, dataset hash, counts
  <workdir>/soft_labels/<split>/probs.npy         [N, k] float16 (teacher probabilities at T)
                               classes.npy        [N, k] int32
                               rest.npy           [N] float32 (1 − Σ probs)
                               sha256.npy         [N, 32] uint8 (record sha256, for alignment)
  <workdir>/soft_labels/chunks/                   resumable work (atomic .npz per chunk)

Row i belongs to record i of the split; `open_split` refuses a set made for
another dataset and `SoftLabelJoin` checks every record's sha256 when it is
read, so a misaligned set fails instead of training on the wrong targets.
"""
import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from aplantida_jax import fileio
from aplantida_jax.data import records
from aplantida_jax.data import shards
from aplantida_jax.distill import losses
from aplantida_jax.repro import hashing
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import loop
from aplantida_jax.train import sharding
from aplantida_jax.train import steps

META_FILE = "meta.json"
ARRAYS = ("probs", "classes", "rest", "sha256")
REFERENCE = dict(images=900_000, classes=9_000, budget_bytes=3.3e9)  # the user's plan


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One loaded teacher and how much it counts."""
  name: str
  dir: str                 # stage folder under the workdir
  model: Any
  variables: Any
  image_size: int
  eval_crop_fraction: float
  weight: float
  countries: tuple         # its region (empty = everywhere)
  region_weight: float     # weight multiplier on images of its region
  checkpoint_sha256: str


def active_teachers(config):
  """(name, teacher config) of the teachers with a folder set, in config order."""
  return [(name, t) for name, t in config.teachers.items() if t.dir]


def teacher_countries(config, teacher_config):
  if not teacher_config.region:
    return ()
  if teacher_config.region not in config.regions:
    raise ValueError(f"teacher region {teacher_config.region!r} is not in config.regions "
                     f"({sorted(config.regions)}); fix config.teachers.*.region.")
  return tuple(config.regions[teacher_config.region])


def load_teachers(config, workdir, num_classes):
  """Every active teacher's model, best variables and checkpoint hash."""
  teachers = []
  for name, t in active_teachers(config):
    stage_dir = os.path.join(workdir, t.dir)
    config_path = os.path.join(stage_dir, loop.CONFIG_FILE)
    if not os.path.exists(config_path):
      raise FileNotFoundError(f"Teacher {name!r}: {config_path} is missing; train it first "
                              f"or clear config.teachers.{name}.dir.")
    if t.weight <= 0 or t.region_weight <= 0:
      raise ValueError(f"config.teachers.{name}: weight={t.weight} and region_weight="
                       f"{t.region_weight} must be > 0 (clear .dir to leave the teacher out).")
    with open(config_path) as f:
      teacher_config = ml_collections.ConfigDict(json.load(f))
    if teacher_config.model.num_classes != num_classes:
      raise ValueError(f"Teacher {name!r} ({stage_dir}) has {teacher_config.model.num_classes} "
                       f"classes, the dataset {num_classes}: retrain it on this dataset.")
    teachers.append(Teacher(
        name=name, dir=t.dir, model=loop.create_model(teacher_config),
        variables=checkpointing.load_variables(stage_dir, "best"),
        image_size=teacher_config.input.image_size,
        eval_crop_fraction=teacher_config.input.eval_crop_fraction, weight=float(t.weight),
        countries=teacher_countries(config, t), region_weight=float(t.region_weight),
        checkpoint_sha256=hashing.folder_hash(os.path.join(stage_dir, "best"))))
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
    return cls([t.weight for t in teachers], [t.countries for t in teachers],
               [t.region_weight for t in teachers])

  def __call__(self, index, record):
    del index
    w = [w * (rw if c and records.in_region(record["regions"], c) else 1.0)
         for w, c, rw in zip(self.weights, self.countries, self.region_weights)]
    return {"teacher_weights": np.asarray(w, np.float32)}


class TeacherViews(grain.transforms.Map):
  """A record → its eval crop and K−1 augmented views at each teacher resolution.

  View v of record i is drawn from rng (seed, v, i): the same crop for every
  teacher and independent of chunking, batch size and workers.
  """

  def __init__(self, crops, num_views, crop_scale, crop_ratio, color_jitter, seed, weights):
    # (image_size, eval transform, augmenting transform) per distinct teacher input.
    self.transforms = tuple(
        (size, input_pipeline.EvalTransform(size, fraction),
         input_pipeline.TrainTransform(size, crop_scale, crop_ratio, color_jitter))
        for size, fraction in crops)
    self.num_views = num_views
    self.seed = seed
    self.weights = weights

  def map(self, element):
    record = shards.decode(element["data"])
    out = {"index": np.int32(element["index"]), "label": np.int32(record["label"]),
           "sha256": np.frombuffer(bytes.fromhex(record["sha256"]), np.uint8),
           **self.weights(element["index"], record)}
    for size, eval_transform, augment in self.transforms:
      out[view_key(size, eval_transform.crop_fraction, 0)] = eval_transform.map(element)["image"]
      for v in range(1, self.num_views):
        rng = np.random.default_rng((self.seed, v, element["index"]))
        out[view_key(size, eval_transform.crop_fraction, v)] = augment.random_map(
            element, rng)["image"]
    return out


def view_key(image_size, crop_fraction, view):
  return f"image_{image_size}_{crop_fraction}_{view}"


def teacher_probs(teacher, variables, images, temperature):
  """softmax(logits / T) of one teacher in eval mode, float32 [B, C]."""
  logits, _ = steps.forward(teacher.model.apply, variables, images, None, train=False)
  return jax.nn.softmax(logits / temperature, axis=-1)


def mix(probs, weights):
  """Per-image weighted mean of per-teacher probabilities: list of [B, C], weights [B, T]."""
  mixed = sum(weights[:, t:t + 1] * p for t, p in enumerate(probs))
  return mixed / jnp.sum(weights, axis=-1, keepdims=True)


def ensemble_topk(variables, batch, *, teachers, num_views, temperature, k):
  """Teachers' view-averaged tempered probabilities, mixed per image → sparse top-k."""
  probs = [sum(teacher_probs(t, v, batch[view_key(t.image_size, t.eval_crop_fraction, view)],
                             temperature)
               for view in range(num_views)) / num_views
           for t, v in zip(teachers, variables)]
  return losses.sparse_target(mix(probs, batch["teacher_weights"]), k)


def _pad(batch, size):
  return {k: np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _atomic_save(path, **arrays):
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    if len(arrays) == 1 and "array" in arrays:
      np.save(f, arrays["array"])
    else:
      np.savez(f, **arrays)


def fingerprint(config, teachers, manifest_sha256, num_classes):
  """What the soft labels depend on; chunks of another fingerprint are stale."""
  return hashing.sha256_json({
      "temperature": config.temperature, "top_k": config.top_k, "num_views": config.num_views,
      "seed": config.seed, "augment": config.augment.to_dict(), "manifest": manifest_sha256,
      "num_classes": num_classes, "teachers": [
          (t.dir, t.checkpoint_sha256, t.weight, t.countries, t.region_weight, t.image_size,
           t.eval_crop_fraction) for t in teachers]})


def manifest_sha256(dataset_dir):
  path = os.path.join(dataset_dir, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; run the export stage first (configs/export.py).")
  return fileio.sha256_file(path)


def split_count(dataset_dir, split):
  return len(grain.sources.ArrayRecordDataSource(shards.shard_paths(dataset_dir, split)))


def _chunk_loader(config, dataset_dir, split, start, stop, transform, batch_size):
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, split),
                                       np.arange(start, stop))
  sampler = grain.samplers.IndexSampler(num_records=len(source),
                                        shard_options=grain.sharding.NoSharding(),
                                        shuffle=False, num_epochs=1, seed=config.seed)
  return input_pipeline.data_loader(
      source, sampler, [transform, grain.transforms.Batch(batch_size, drop_remainder=False)],
      config.input)


def label_split(config, dataset_dir, chunk_dir, split, compute, transform, mesh):
  """Writes chunk files of one split (skipping finished ones) → merged arrays."""
  count = split_count(dataset_dir, split)
  chunk = config.chunk_size
  parts = []
  with tqdm(total=count, desc=f"soft labels {split}", unit="img", disable=None) as bar:
    for start in range(0, count, chunk):
      stop = min(start + chunk, count)
      path = os.path.join(chunk_dir, f"{split}-{start:010d}.npz")
      if not os.path.exists(path):
        out = {name: [] for name in ("index",) + ARRAYS}
        for batch in _chunk_loader(config, dataset_dir, split, start, stop, transform,
                                   config.batch_size):
          real = len(batch["index"])
          device_batch = sharding.global_batch(
              mesh, _pad({k: v for k, v in batch.items() if k not in ("index", "sha256", "label")},
                         config.batch_size))
          probs, classes, rest = jax.device_get(compute(device_batch))
          out["probs"].append(probs[:real].astype(np.float16))
          out["classes"].append(classes[:real].astype(np.int32))
          out["rest"].append(rest[:real].astype(np.float32))
          out["sha256"].append(batch["sha256"])
          out["index"].append(batch["index"])
          bar.update(real)
        arrays = {name: np.concatenate(v) for name, v in out.items()}
        if not np.array_equal(arrays.pop("index"), np.arange(start, stop)):
          raise RuntimeError(f"soft labels {split} [{start}, {stop}): records came back out of "
                             "order; this is a bug, please report it.")
        _atomic_save(path, **arrays)
      else:
        bar.update(stop - start)
      with np.load(path) as saved:
        parts.append({name: saved[name] for name in ARRAYS})
  return {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}


def _write_split(out_dir, split, arrays):
  split_dir = os.path.join(out_dir, split)
  os.makedirs(split_dir, exist_ok=True)
  for name in ARRAYS:
    _atomic_save(os.path.join(split_dir, f"{name}.npy"), array=arrays[name])


def _folder_bytes(folder):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder)
             for f in files)


def storage_report(out_dir, splits, counts, num_classes):
  """Disk size of the sparse set vs dense fp16 storage, here and at the user's scale."""
  sparse = sum(_folder_bytes(os.path.join(out_dir, s)) for s in splits)
  dense = sum(counts.values()) * num_classes * 2
  reference = REFERENCE["images"] * REFERENCE["classes"] * 2
  logging.info("soft labels on disk: %.3f MB sparse; dense N×C×fp16 would be %.3f MB. "
               "At the plan's scale (%d images × %d classes) dense fp16 is %.1f GB against the "
               "%.1f GB budget.", sparse / 1e6, dense / 1e6, REFERENCE["images"],
               REFERENCE["classes"], reference / 1e9, REFERENCE["budget_bytes"] / 1e9)
  return {"sparse_bytes": sparse, "dense_fp16_bytes": dense,
          "reference_dense_fp16_bytes": reference,
          "reference_budget_bytes": REFERENCE["budget_bytes"]}


def read_meta(out_dir):
  path = os.path.join(out_dir, META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run(config, workdir) -> dict:
  """Computes (or resumes, or reuses) the soft labels; returns a summary."""
  if jax.process_count() > 1:
    raise ValueError("soft_labels runs as one process (it uses all local devices); start it "
                     "without config.mesh.coordinator_address.")
  dataset_dir = os.path.join(workdir, config.dataset_dir)
  out_dir = os.path.join(workdir, config.output_dir)
  num_classes = len(loop.load_classes(dataset_dir))
  k = min(config.top_k, num_classes)
  dataset_hash = manifest_sha256(dataset_dir)
  teachers = load_teachers(config, workdir, num_classes)
  run_fingerprint = fingerprint(config, teachers, dataset_hash, num_classes)
  meta = read_meta(out_dir)
  if meta and meta.get("fingerprint") == run_fingerprint and all(
      os.path.exists(os.path.join(out_dir, s, f"{a}.npy")) for s in meta["splits"] for a in ARRAYS):
    logging.info("soft labels in %s are up to date", out_dir)
    return {"metric": meta["metric"], **meta["storage"]}

  chunk_dir = os.path.join(out_dir, "chunks")
  stamp = os.path.join(chunk_dir, "fingerprint")
  if os.path.isdir(chunk_dir) and (not os.path.exists(stamp) or open(stamp).read() != run_fingerprint):
    logging.warning("dropping stale soft-label chunks in %s (teachers, dataset or config changed)",
                    chunk_dir)
    shutil.rmtree(chunk_dir)
  if not os.path.isdir(chunk_dir):
    os.makedirs(chunk_dir)
    with open(stamp, "w") as f:
      f.write(run_fingerprint)

  mesh = sharding.create_mesh()
  sharding.process_batch_size(config.batch_size, mesh)  # checks divisibility
  replicated = sharding.replicated(mesh)
  variables = jax.device_put([t.variables for t in teachers], replicated)
  compute = jax.jit(functools.partial(
      ensemble_topk, teachers=teachers, num_views=config.num_views,
      temperature=config.temperature, k=k), out_shardings=replicated)
  crops = sorted({(t.image_size, t.eval_crop_fraction) for t in teachers})
  aug = config.augment
  transform = TeacherViews(crops, config.num_views, tuple(aug.crop_scale), tuple(aug.crop_ratio),
                           aug.color_jitter, config.seed, TeacherWeights.of(teachers))

  counts, ensemble_top1 = {}, {}
  for split in config.splits:
    arrays = label_split(config, dataset_dir, chunk_dir, split,
                         functools.partial(compute, variables), transform, mesh)
    labels = input_pipeline.read_metadata(dataset_dir, split)["labels"]
    counts[split] = len(labels)
    ensemble_top1[split] = float(np.mean(arrays["classes"][:, 0] == labels)) if len(labels) else 0.0
    _write_split(out_dir, split, arrays)

  storage = storage_report(out_dir, config.splits, counts, num_classes)
  metric = ", ".join(f"{s} ensemble top-1 {v:.3f}" for s, v in ensemble_top1.items())
  metric += (f"; {storage['sparse_bytes'] / 1e3:.1f} kB on disk "
             f"(dense fp16 {storage['dense_fp16_bytes'] / 1e3:.1f} kB)")
  meta = {
      "temperature": config.temperature, "top_k": k, "num_views": config.num_views,
      "num_classes": num_classes, "dataset_manifest_sha256": dataset_hash, "counts": counts,
      "splits": list(config.splits), "ensemble_top1": ensemble_top1, "storage": storage,
      "teachers": [{"dir": t.dir, "name": t.name, "checkpoint_sha256": t.checkpoint_sha256,
                    "weight": t.weight, "countries": list(t.countries),
                    "region_weight": t.region_weight, "image_size": t.image_size}
                   for t in teachers],
      "fingerprint": run_fingerprint, "metric": metric}
  fileio.write_json(os.path.join(out_dir, META_FILE), meta)
  shutil.rmtree(chunk_dir)
  return {"metric": metric, **storage}


class SoftLabelJoin:
  """join_fn: record index → its soft labels, after checking the record's sha256.

  Picklable (Grain workers); the arrays are memory-mapped on first use.
  """

  def __init__(self, split_dir):
    self.split_dir = split_dir
    self._arrays = None

  def __getstate__(self):
    return {"split_dir": self.split_dir, "_arrays": None}

  def arrays(self):
    if self._arrays is None:
      self._arrays = {name: np.load(os.path.join(self.split_dir, f"{name}.npy"), mmap_mode="r")
                      for name in ARRAYS}
    return self._arrays

  def __call__(self, index, record):
    a = self.arrays()
    if a["sha256"][index].tobytes().hex() != record["sha256"]:
      raise ValueError(
          f"Soft labels in {self.split_dir} are misaligned: row {index} was made for image "
          f"{a['sha256'][index].tobytes().hex()[:12]}…, the dataset's record {index} is "
          f"{record['sha256'][:12]}…. Re-run the soft_labels stage on this dataset.")
    return {"teacher_probs": np.asarray(a["probs"][index]),
            "teacher_classes": np.asarray(a["classes"][index]),
            "teacher_rest": np.float32(a["rest"][index])}


def open_split(soft_labels_dir, dataset_dir, split):
  """(SoftLabelJoin, meta) of a split, refusing a set made for another dataset."""
  meta = read_meta(soft_labels_dir)
  fix = "re-run the soft_labels stage (configs/soft_labels.py) on this workdir"
  if meta is None:
    raise FileNotFoundError(f"{soft_labels_dir}/{META_FILE} is missing: {fix}.")
  current = manifest_sha256(dataset_dir)
  if meta["dataset_manifest_sha256"] != current:
    raise ValueError(f"Soft labels in {soft_labels_dir} were made for another dataset (manifest "
                     f"sha256 {meta['dataset_manifest_sha256'][:12]}…, now {current[:12]}…): {fix}.")
  if split not in meta["counts"]:
    raise ValueError(f"Soft labels in {soft_labels_dir} have no {split!r} split "
                     f"(have {meta['splits']}): add it to config.splits and {fix}.")
  count = split_count(dataset_dir, split)
  stored = len(np.load(os.path.join(soft_labels_dir, split, "sha256.npy"), mmap_mode="r"))
  if not meta["counts"][split] == stored == count:
    raise ValueError(f"Soft labels in {soft_labels_dir}/{split} hold {stored} rows "
                     f"(meta.json says {meta['counts'][split]}), the dataset's {split} split "
                     f"{count} records: {fix}.")
  return SoftLabelJoin(os.path.join(soft_labels_dir, split)), meta
