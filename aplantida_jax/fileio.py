"""Atomic writes and file hashes, shared by every stage.

A stage killed mid-write must never leave a half-written file under its final
name: readers (the next stage, a resumed run, the skip check) would trust it.
Every writer here writes `<path>.tmp<pid>` and renames it over `path`, which is
atomic on POSIX filesystems.
"""

import contextlib
import hashlib
import json
import os

_CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path to write; renames it to `path` only if the block succeeds."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, obj, *, indent=2, sort_keys=True) -> None:
  """Readable, stable JSON (sorted keys, UTF-8 kept, trailing newline)."""
  text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str)
  write_text(path, text + "\n")


def read_json(path: str, default=None):
  """`default` when the file is missing; a truncated or corrupt file is an error that says so."""
  if not os.path.exists(path):
    return default
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
        f"{path} is not valid JSON ({e}); re-run the stage that writes it."
      ) from None


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      digest.update(block)
  return digest.hexdigest()
