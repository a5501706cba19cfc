"""Atomic writes: a writer that fails half-way leaves the old file and no temp file."""

import hashlib
import json
import os

import pytest

from aplantida_jax import fileio


def test_json_round_trip_is_sorted_utf8_with_trailing_newline(tmp_path):
  path = str(tmp_path / "a.json")
  fileio.write_json(path, {"b": 1, "a": "Jara pringosa · Cistus ladanifer"})
  text = open(path, encoding="utf-8").read()
  assert text.endswith("}\n") and text.index('"a"') < text.index('"b"') and "·" in text
  assert fileio.read_json(path) == {"b": 1, "a": "Jara pringosa · Cistus ladanifer"}
  assert fileio.read_json(str(tmp_path / "missing.json"), default=[]) == []


def test_failed_write_keeps_the_old_content_and_leaves_no_temp_file(tmp_path):
  path = str(tmp_path / "report.json")
  fileio.write_json(path, {"version": 1})
  with pytest.raises(RuntimeError):
    with fileio.atomic_path(path) as tmp:
      with open(tmp, "w") as f:
        f.write('{"version": 3, "trunc')
      raise RuntimeError("killed mid-write")
  assert json.load(open(path)) == {"version": 1}
  assert os.listdir(tmp_path) == ["report.json"]


def test_sha256_file_matches_hashlib_over_several_chunks(tmp_path):
  data = os.urandom((1 << 20) * 2 + 123)
  path = str(tmp_path / "blob")
  fileio.write_bytes(path, data)
  assert fileio.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_corrupt_json_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"stage": "trai')
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON.*re-run the stage"):
    fileio.read_json(str(path))
