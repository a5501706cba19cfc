"""On-disk record format of `<workdir>/dataset/splits/*.array_record-*`.

One ArrayRecord record = msgpack map with the JPEG bytes and its metadata:
  jpeg (bytes), label (int), species (str), regions (list[str]; image country,
  else species regions), country (str|None), license (SPDX), author, url, sha256
  (hex of the JPEG bytes as stored).
msgpack is deterministic for the same map, so identical inputs give
byte-identical shards. Files are written under a temporary name and renamed.

Beside each split's shards, `<split>.metadata.jsonl` holds every field but the
JPEG, one line per record in record order, so that sampling, soft-label
alignment, region masks and the license check never decode image bytes. The
shards stay the truth: the export records the sidecar's sha256 in the dataset
manifest, and `read_metadata` refuses a sidecar that does not match it.
"""

import glob
import hashlib
import json
import os

import msgpack
from array_record.python import array_record_module

from aplantida_jax import errors
from aplantida_jax import fileio

FIELDS = ("jpeg", "label", "species", "regions", "country", "license", "author", "url", "sha256")
METADATA_FIELDS = FIELDS[1:]  # all but the JPEG bytes
WRITER_OPTIONS = "group_size:1"  # random access for Grain


def encode(record: dict) -> bytes:
  missing = [f for f in FIELDS if f not in record]
  if missing:
    raise ValueError(f"shard record lacks fields {missing}")
  return msgpack.packb({f: record[f] for f in FIELDS}, use_bin_type=True)


def decode(data: bytes) -> dict:
  return msgpack.unpackb(data, raw=False)


def _shard_files(dataset_dir: str, split: str = "*") -> list:
  """Sorted finished shard files (not the temp files of a write a kill cut short)."""
  pattern = os.path.join(dataset_dir, "splits", f"{split}.array_record-*")
  return sorted(p for p in glob.glob(pattern) if ".tmp" not in os.path.basename(p))


def split_names(dataset_dir: str) -> list:
  """The splits that have shard files under dataset/splits/, sorted."""
  return sorted({os.path.basename(p).split(".array_record-")[0] for p in _shard_files(dataset_dir)})


def shard_paths(dataset_dir: str, split: str) -> list:
  """Sorted shard files of one split; raises a clear error if there are none."""
  paths = _shard_files(dataset_dir, split)
  if not paths:
    raise FileNotFoundError(
      f"No shards for split {split!r} under {dataset_dir}/splits/. "
      "Run the export stage first (configs/export.py)."
    )
  return paths


def shard_path(dataset_dir: str, split: str, index: int, num_shards: int) -> str:
  return os.path.join(
    dataset_dir, "splits", f"{split}.array_record-{index:05d}-of-{num_shards:05d}"
  )


def write_split(dataset_dir: str, split: str, records, num_shards: int = 1) -> list:
  """Writes record dicts (FIELDS) as `num_shards` near-equal shards of one split; returns paths.

  For datasets held in memory (tests, benchmarks); the export stage streams its shards.
  """
  encoded = [encode(r) for r in records]
  per_shard = -(-len(encoded) // num_shards)
  os.makedirs(os.path.join(dataset_dir, "splits"), exist_ok=True)
  paths = [shard_path(dataset_dir, split, s, num_shards) for s in range(num_shards)]
  for s, path in enumerate(paths):
    write_shard(path, encoded[s * per_shard : (s + 1) * per_shard])
  return paths


def write_shard(path: str, encoded_records) -> None:
  """Writes one shard atomically (temp file + rename)."""
  with fileio.atomic_path(path) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
    for data in encoded_records:
      writer.write(data)
    writer.close()


class CorruptShardError(errors.StageError):
  """A shard (or its metadata sidecar) cannot be trusted: the message names the file."""


def metadata_path(dataset_dir: str, split: str) -> str:
  return os.path.join(dataset_dir, "splits", f"{split}.metadata.jsonl")


def write_metadata(dataset_dir: str, split: str, records) -> dict:
  """Streams the split's sidecar from record dicts in record order (atomic write).

  Returns {file, records, sha256} for the dataset manifest.
  """
  path = metadata_path(dataset_dir, split)
  digest, count = hashlib.sha256(), 0
  with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
    for record in records:
      line = (json.dumps({k: record[k] for k in METADATA_FIELDS}, sort_keys=True) + "\n").encode()
      f.write(line)
      digest.update(line)
      count += 1
  return {
    "file": os.path.relpath(path, dataset_dir),
    "records": count,
    "sha256": digest.hexdigest(),
  }


def read_metadata(dataset_dir: str, split: str, recorded: dict) -> list:
  """Metadata dicts of a split, in record order, from its sidecar (no JPEG decoded).

  `recorded` is the dataset manifest's `metadata[split]`; a sidecar whose sha256
  differs from it is refused (CorruptShardError), since the shards are the truth.
  """
  path = os.path.join(dataset_dir, recorded["file"])
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise CorruptShardError(
      f"metadata sidecar {path} is unreadable ({e}); re-run the export stage (configs/export.py)."
    ) from None
  if hashlib.sha256(data).hexdigest() != recorded["sha256"]:
    raise CorruptShardError(
      f"metadata sidecar {path} differs from the one dataset/manifest.json recorded (sha256); "
      "re-run the export stage (configs/export.py) to rewrite it from the shards."
    )
  return [json.loads(line) for line in data.decode().splitlines()]


def split_records(dataset_dir: str, split: str):
  """(file, metadata dict) of every record of a split, in record order.

  From the split's sidecar when dataset/manifest.json records one (sha256-checked, no
  JPEG decoded), else by decoding its shards (datasets written without the export).
  """
  manifest = fileio.read_json(os.path.join(dataset_dir, "manifest.json")) or {}
  recorded = (manifest.get("metadata") or {}).get(split)
  if recorded:
    path = os.path.join(dataset_dir, recorded["file"])
    for record in read_metadata(dataset_dir, split, recorded):
      yield path, record
    return
  for path in shard_paths(dataset_dir, split):
    for record in read_shard(path):
      yield path, record


def corrupt(path: str, error: Exception, where: str = "") -> CorruptShardError:
  reason = str(error) or type(error).__name__
  return CorruptShardError(
    f"dataset shard {path} is corrupt{where} ({reason}). Re-run the export stage "
    "(configs/export.py): it rebuilds the shards from its download cache."
  )


def read_shard(path: str):
  """Yields decoded records of one shard in order; a CorruptShardError names a bad file."""
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except RuntimeError as e:
    raise corrupt(path, e) from None
  try:
    for i in range(reader.num_records()):
      try:
        data = reader.read([i])[0]
      except RuntimeError as e:
        raise corrupt(path, e, f" at record {i}") from None
      yield decode(data)
  except BaseException:  # an error, or a consumer that stopped early (GeneratorExit)
    _close_quietly(reader)
    raise
  try:
    reader.close()  # Riegeli reports some damage (a cut tail) only here
  except RuntimeError as e:
    raise corrupt(path, e) from None


def _close_quietly(reader) -> None:
  try:
    reader.close()
  except RuntimeError:
    pass


def check_readable(paths) -> None:
  """Opens every shard; raises CorruptShardError naming the first that cannot be opened."""
  for path in paths:
    try:
      array_record_module.ArrayRecordReader(path).close()
    except RuntimeError as e:
      raise corrupt(path, e) from None


def locate(paths, index: int) -> tuple:
  """(shard path, record within it) of record `index` across `paths` in order."""
  for path in paths:
    reader = array_record_module.ArrayRecordReader(path)
    count = reader.num_records()
    reader.close()
    if index < count:
      return path, index
    index -= count
  raise IndexError(index)
