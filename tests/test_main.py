"""main.py: config files, overrides and stage lookup fail with errors that name the problem."""

import textwrap

import pytest

from aplantida_jax import stages
from aplantida_jax.repro import manifest
from tests.helpers import run_main


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(
    textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.stage = arg or "no_such_stage"
        c.seed = 0
        c.catalog = ml_collections.ConfigDict({"kind": "jsonl"})
        return c
  """)
  )
  return path


def test_mistyped_override_names_the_key(config_file, tmp_path):
  proc = run_main(config_file, tmp_path / "w", "--config.catalog.kindd=mongo")
  assert proc.returncode != 0
  assert "--config.catalog.kindd" in proc.stderr and 'Did you mean "kind"' in proc.stderr
  assert "Traceback" not in proc.stderr


def test_override_of_wrong_type_names_the_key(config_file, tmp_path):
  proc = run_main(config_file, tmp_path / "w", "--config.seed=abc")
  assert proc.returncode != 0 and "--config.seed" in proc.stderr and "abc" in proc.stderr


def test_unknown_stage_lists_known_stages(config_file, tmp_path):
  proc = run_main(config_file, tmp_path / "w")
  assert proc.returncode != 0
  assert "no_such_stage" in proc.stderr and "audit" in proc.stderr


def test_every_registered_stage_resolves():
  for name in stages.KINDS:
    assert callable(stages.get_stage(name)), name


@pytest.mark.parametrize(
  "raw,clean",
  [
    ("mongodb://ana:s3cret@db.example:27017/aplantida", "mongodb://***@db.example:27017/aplantida"),
    (
      "mongodb+srv://u:p@cluster0.x.net/?retryWrites=true",
      "mongodb+srv://***@cluster0.x.net/?retryWrites=true",
    ),
    (
      "mongodb://host/?authSource=admin&password=hunter2",
      "mongodb://host/?authSource=admin&password=***",
    ),
    ("mongodb://localhost:27017", "mongodb://localhost:27017"),
  ],
)
def test_redact_removes_credentials(raw, clean):
  assert manifest.redact(raw) == clean
  nested = manifest.redacted({"catalog": {"mongo_uri": raw, "list": [raw]}})
  assert nested == {"catalog": {"mongo_uri": clean, "list": [clean]}}
