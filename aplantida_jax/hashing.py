"""Content hashes of files, folders and configs: what "unchanged" means for a stage.

Timestamps lie after a copy or a checkout; content hashes do not. Files whose
content carries wall-clock time (TensorBoard event files) are left out of
folder hashes so that a re-run with identical results hashes identically.
"""

import hashlib
import json
import os
import re

from aplantida_jax import fileio

# Files that record when something ran, not what it produced.
VOLATILE = re.compile(
  r"(events\.out\.tfevents\..*|.*\.lock|.*\.tmp\d*|metrics\.jsonl|_CHECKPOINT_METADATA)$"
)
# Folders that are working state, not output: the export's download cache logs arrival order.
WORKING_DIRS = ("cache", "logs")


def sha256_json(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_sha256(tree) -> str:
  """sha256 over a pytree's leaves (path, dtype, shape, bytes): equal iff the arrays are equal.

  Checkpoint folders carry timestamps and storage layout; parameters do not.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def file_hashes(folder: str, skip=VOLATILE) -> dict:
  """{relative path: sha256} of every non-volatile file under `folder`, sorted."""
  out = {}
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if d not in WORKING_DIRS)
    for name in sorted(files):
      if skip is not None and skip.match(name):
        continue
      path = os.path.join(root, name)
      out[os.path.relpath(path, folder)] = fileio.sha256_file(path)
  return out


def folder_hash(folder: str) -> str:
  """One sha256 over a folder's non-volatile files (names and contents)."""
  return sha256_json(file_hashes(folder))


def output_hash(path: str) -> str:
  """sha256 of a stage's output: a single file's content or a folder's files."""
  return fileio.sha256_file(path) if os.path.isfile(path) else folder_hash(path)
