"""The whole pipeline on a tiny catalog: every stage runs, a re-run skips, seeds decide everything.

Three runs of `python -m aplantida_jax.repro.pipeline --configs DIR`: seed 0 twice
(identical shards, parameters and TF.js weights; the second pass over the first
workdir skips every stage) and seed 1 once (different ones). The configs are the
real stage configs' `:demo` variants, shrunk further (slim networks from scratch); the catalog is drawn demo
data served from 127.0.0.1, so the export goes through the real download path.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from aplantida_jax import stages
from aplantida_jax.data import demo_data
from aplantida_jax.repro import pipeline
from tests.helpers import ROOT
from tests.helpers import SLIM_LITE0
from tests.helpers import cli_env

# The demo's networks, slim and from scratch: the run checks the stages and their seams, not
# ImageNet transfer (tests/test_import_pretrained.py and ./run.sh do), at a fraction of the
# tracing, compiling and TF.js conversion. The downstream stages inherit them.
SLIM = [f"c.model.kwargs = {SLIM_LITE0!r}", "c.model.init_from = ''", "c.optimizer.frozen = ''"]
# A password every run's configs hold (catalog.mongo_uri); no file or output may show it.
PLANTED = "Pl4nted-S3cret"
MONGO_URI = f"mongodb://reader:{PLANTED}@db.example:27017/plants"
# Per stage: config module, then lines that shrink its :demo variant further.
SHRINK = {
  "audit": ["c.catalog.path = CATALOG"],
  "export": ["c.catalog.path = CATALOG", "c.export.image_size = 40", "c.export.min_per_class = 4"],
  "teacher_global": [
    "c.num_train_steps = 4",
    "c.eval_every_steps = 4",
    "c.checkpoint.every_steps = 2",
    "c.input.image_size = 32",
    "c.batch_size = 8",
    "c.tensorboard = True",
    *SLIM,
  ],
  "teacher_regional": [
    "c.num_train_steps = 2",
    "c.eval_every_steps = 2",
    "c.checkpoint.every_steps = 2",
    "c.input.image_size = 32",
    "c.batch_size = 8",
    "c.optimizer.frozen = ''",
  ],
  "student_distill": [
    "c.num_train_steps = 4",
    "c.eval_every_steps = 4",
    "c.checkpoint.every_steps = 2",
    "c.input.image_size = 32",
    "c.batch_size = 8",
    *SLIM,
  ],
  "student_finetune": [
    "c.num_train_steps = 2",
    "c.eval_every_steps = 2",
    "c.checkpoint.every_steps = 2",
    "c.input.image_size = 32",
    "c.batch_size = 8",
    "c.optimizer.frozen = ''",
  ],
}


def write_configs(folder, seed, catalog):
  """One wrapper per stage config: the built-in :demo variant, this seed, tiny sizes."""
  os.makedirs(folder, exist_ok=True)
  for stage in stages.PIPELINE:
    module = stage.config[:-3]
    lines = [f"c.seed = {seed}", *SHRINK.get(module, [])]
    body = "\n".join(f"  {line}" for line in lines)
    with open(os.path.join(folder, stage.config), "w") as f:
      f.write(
        f"from configs import {module} as base\nCATALOG = {catalog!r}\n\n\n"
        f"def get_config(arg=None):\n  c = base.get_config('demo')\n{body}\n  return c\n"
      )


def start_pipeline(configs, workdir, env):
  """`python -m aplantida_jax.repro.pipeline` in the background, output to <workdir>.log."""
  with open(f"{workdir}.log", "w") as log:
    return subprocess.Popen(
      [
        sys.executable,
        "-m",
        "aplantida_jax.repro.pipeline",
        "--configs",
        str(configs),
        "--workdir",
        str(workdir),
      ],
      cwd=ROOT,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def finish_pipeline(proc, workdir):
  """Waits for it; returns (its output, its manifest, the workdir)."""
  try:
    proc.wait(timeout=1800)
  finally:
    proc.kill()
  with open(f"{workdir}.log") as f:
    output = f.read()
  assert proc.returncode == 0, output[-6000:]
  with open(os.path.join(workdir, "manifest.json")) as f:
    return output, json.load(f), workdir


def outputs(manifest):
  """What must be identical across runs with one seed: shards, best params, TF.js weights."""
  shards = manifest["stages"]["export"]["output_hash"]
  tfjs_weights = {k: v for k, v in manifest["outputs"]["tfjs_files"].items() if k.endswith(".bin")}
  return shards, manifest["outputs"]["best_params_sha256"], tfjs_weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("pipeline")
  demo_data.make_demo_data(
    str(base / "catalog"),
    "http://127.0.0.1:1",
    seed=0,
    num_species=4,
    images_per_species=(14, 14),
    image_size=64,
  )
  results = {}
  with demo_data.serve_directory(str(base / "catalog"), 0) as server:
    catalog = str(base / "served.jsonl")
    with open(base / "catalog" / "catalog.jsonl") as src, open(catalog, "w") as dst:
      dst.write(src.read().replace("http://127.0.0.1:1/", f"{server.url.rstrip('/')}/"))
    for seed in (0, 1):
      write_configs(base / f"configs{seed}", seed, catalog)

    def start(name, seed, cache):
      env = cli_env(JAX_COMPILATION_CACHE_DIR=str(base / cache), APLANTIDA_MONGO_URI=MONGO_URI)
      return start_pipeline(base / f"configs{seed}", base / name, env)

    # "a" fills the compilation cache; "b" and "c" then run side by side (their stages are mostly
    # single-threaded start-up and cache reads), each on its own copy of that cache.
    results["a"] = finish_pipeline(start("a", 0, "xla_cache"), base / "a")
    shutil.copytree(base / "xla_cache", base / "xla_cache_c")
    running = {"b": start("b", 0, "xla_cache"), "c": start("c", 1, "xla_cache_c")}
    results.update({name: finish_pipeline(proc, base / name) for name, proc in running.items()})
    results["a_again"] = finish_pipeline(start("a", 0, "xla_cache"), base / "a")
  return results


def test_every_stage_runs_and_the_run_is_recorded(runs):
  stdout, manifest, workdir = runs["a"]
  assert sorted(s.name for s in stages.PIPELINE) == sorted(manifest["stages"])
  for name, record in manifest["stages"].items():
    assert record["status"] == "done" and record["metric"], name
    assert record["config"]["seed"] == 0
  assert manifest["jax"]["backend"] == "cpu" and manifest["versions"]["jax"]
  assert manifest["git"]["commit"] is None or len(manifest["git"]["commit"]) == 40
  assert set(manifest["outputs"]["best_params_sha256"]) == {
    "teacher_global",
    "teacher_regional",
    "student/distill",
    "student/finetune",
  }
  criteria = {row["criterion"]: row for row in manifest["success_criteria"]}
  assert criteria["licence check passes"]["passed"] is True
  assert criteria["model size (MB)"]["value"] > 0
  assert "license_check" in stdout and "ran" in stdout
  # TensorBoard on (clu's writer, the one path that imports TF in training; :demo turns it off).
  assert glob.glob(os.path.join(workdir, "teacher_global", "events.out.tfevents.*"))


def test_a_planted_mongo_password_is_nowhere_in_the_workdir_or_the_output(runs):
  """Every stage config holds catalog.mongo_uri (from $APLANTIDA_MONGO_URI): none may leak it."""
  stdout, _, workdir = runs["a"]
  assert PLANTED not in stdout
  leaked = []
  for folder, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        if PLANTED.encode() in f.read():
          leaked.append(os.path.relpath(path, workdir))
  assert not leaked, leaked
  with open(os.path.join(workdir, "manifest.json")) as f:
    assert "mongodb://***@db.example:27017/plants" in f.read()  # recorded, redacted


def test_rerun_skips_every_stage(runs):
  stdout, _, _ = runs["a_again"]
  table = stdout[stdout.index("stage               status") :]
  for stage in stages.PIPELINE:
    row = next(line for line in table.splitlines() if line.startswith(stage.name + " "))
    assert row.split()[1] == "skipped", row


def test_same_seed_gives_identical_outputs(runs):
  assert outputs(runs["a"][1]) == outputs(runs["b"][1])


def test_other_seed_gives_different_outputs(runs):
  (shards_a, params_a, tfjs_a), (shards_c, params_c, tfjs_c) = (
    outputs(runs["a"][1]),
    outputs(runs["c"][1]),
  )
  assert shards_a != shards_c
  assert all(params_a[stage] != params_c[stage] for stage in params_a)
  assert tfjs_a != tfjs_c


def test_a_failing_stage_prints_one_line_and_keeps_the_traceback_in_its_log(tmp_path):
  """The console gets the stage, the error's last line and the log path; the log gets the rest."""
  configs = tmp_path / "configs"
  configs.mkdir()
  missing = tmp_path / "no_such_catalog.jsonl"
  (configs / "audit.py").write_text(
    "from configs import audit\n\n\ndef get_config(arg=None):\n"
    f"  c = audit.get_config()\n  c.catalog.path = {str(missing)!r}\n  return c\n"
  )
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "aplantida_jax.repro.pipeline",
      "--configs",
      str(configs),
      "--workdir",
      str(workdir),
    ],
    cwd=ROOT,
    env=cli_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stdout + proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(errors) == 1 and errors[0].startswith("error: stage audit failed (exit 1): "), errors
  assert str(missing) in errors[0] and "logs/audit.log" in errors[0]
  assert "FAILED" in next(line for line in proc.stdout.splitlines() if " audit " in line)
  log = (workdir / "logs" / "audit.log").read_text()
  assert str(missing) in log and len(log.splitlines()) > 1


def test_demo_starts_every_network_from_the_weights_its_pretrained_stage_imports():
  configs = os.path.join(ROOT, "configs")
  imported = pipeline.load_config(os.path.join(configs, "pretrained.py"), "demo")
  for name in ("teacher_global.py", "student_distill.py"):
    config = pipeline.load_config(os.path.join(configs, name), "demo")
    assert config.model.name in imported.archs, name
    assert config.model.init_from == os.path.join(imported.out_dir, config.model.name), name
  for name, upstream in (
    ("teacher_regional.py", "teacher_global"),
    ("student_finetune.py", "student/distill"),
  ):
    config = pipeline.load_config(os.path.join(configs, name), "demo")
    assert config.init_from_stage == upstream and not config.model.init_from, name
  demo = {
    s.name: pipeline.load_config(os.path.join(configs, s.config), "demo") for s in stages.PIPELINE
  }
  deps = {s.name: d for s, d in stages.plan(stages.PIPELINE, demo, "/w")}
  assert "pretrained" in deps["teacher_global"] and "pretrained" in deps["distill"]
