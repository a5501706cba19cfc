"""On-disk record format of `<workdir>/dataset/splits/*.array_record-*`.

One ArrayRecord record = msgpack map with the JPEG bytes and its metadata:
  jpeg (bytes), label (int), species (str), regions (list[str]; image country,
  else species regions), country (str|None), license (SPDX), author, url, sha256
  (hex of the JPEG bytes as stored).
msgpack is deterministic for the same map, so identical inputs give
byte-identical shards. Files are written under a temporary name and renamed.
"""

import glob
import os

import msgpack
from array_record.python import array_record_module

from aplantida_jax import fileio

FIELDS = ("jpeg", "label", "species", "regions", "country", "license", "author", "url", "sha256")
WRITER_OPTIONS = "group_size:1"  # random access for Grain


def encode(record: dict) -> bytes:
  missing = [f for f in FIELDS if f not in record]
  if missing:
    raise ValueError(f"shard record lacks fields {missing}")
  return msgpack.packb({f: record[f] for f in FIELDS}, use_bin_type=True)


def decode(data: bytes) -> dict:
  return msgpack.unpackb(data, raw=False)


def shard_paths(dataset_dir: str, split: str) -> list:
  """Sorted shard files of one split; raises a clear error if there are none."""
  paths = sorted(glob.glob(os.path.join(dataset_dir, "splits", f"{split}.array_record-*")))
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


def read_shard(path: str):
  """Yields decoded records of one shard in order."""
  reader = array_record_module.ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      yield decode(reader.read([i])[0])
  finally:
    reader.close()
