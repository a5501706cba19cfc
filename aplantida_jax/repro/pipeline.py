"""Runs the pipeline's stages in order, skipping those whose inputs did not change.

`./run.sh` calls this. Each stage runs as its own `python -m aplantida_jax.main`
process (clean memory, Grain workers spawn from a real __main__). A stage is
skipped when its fingerprint — the hash of its resolved config and of its
upstream stages' output hashes — equals the one recorded when it last
completed and its output folder still hashes the same. Everything is recorded
in `<workdir>/manifest.json` (see repro/manifest.py).

  python -m aplantida_jax.repro.pipeline [--workdir runs/demo] [--configs DIR]
      [--from STAGE] [--only STAGE] [--force]
"""

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

from absl import logging as absl_logging

from aplantida_jax import hashing
from aplantida_jax import stages as stages_lib
from aplantida_jax.repro import manifest as manifest_lib

ROOT = stages_lib.REPO


class StageFailed(Exception):
  """A stage exited non-zero; the message is the one line the console shows."""


def available_stages(configs_dir):
  """The registry's stages whose config file exists in configs_dir, in registry order."""
  return [s for s in stages_lib.PIPELINE if os.path.exists(os.path.join(configs_dir, s.config))]


def load_config(path, arg):
  """Imports a config file and calls get_config(arg), as config_flags does."""
  spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


_PROGRESS = re.compile(r"\bstep \d+/\d+\b")  # the train loop's log line
_ERROR = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit)\b|error:)")


def shown(path):
  """A path as the user's shell would name it: relative below the current folder, else absolute."""
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def last_error_line(lines):
  """The line of a failed stage's log that says why: the exception, else its last line."""
  lines = [line.strip() for line in lines if line.strip()]
  errors = [line for line in lines if _ERROR.match(line)]
  return (errors or lines or ["(no output)"])[-1]


class Console:
  """One line per stage on the terminal; every byte of the stage's output goes to its log.

  On a terminal the running stage's line shows its latest train step and is
  rewritten in place; elsewhere (CI, a pipe) only
  the finished line is printed.
  """

  def __init__(self, total, stream=None):
    self.total = total
    self.stream = stream or sys.stdout
    self.live = self.stream.isatty()
    self.index = 0

  def _head(self, name):
    return f"[{self.index:>2}/{self.total}] {name:<17}"

  def start(self, name):
    self.index += 1
    self.progress(name, "")

  def progress(self, name, detail):
    if self.live:
      self.stream.write(f"\r\033[K{self._head(name)} running   {detail}")
      self.stream.flush()

  def finish(self, name, status, wall, metric):
    prefix = "\r\033[K" if self.live else ""
    self.stream.write(f"{prefix}{self._head(name)} {status:<9} {wall:6.1f}s  {metric}\n")
    self.stream.flush()


def _run_stage(stage, config_arg, workdir, log_path, console):
  """Runs one stage in a subprocess, its output to a log only; returns its summary.

  Raises StageFailed with the stage, the error's last line and the log path.
  """
  cmd = [
    sys.executable,
    "-m",
    "aplantida_jax.main",
    f"--config={config_arg}",
    f"--workdir={workdir}",
  ]
  summary, tail = {}, collections.deque(maxlen=200)
  env = dict(
    os.environ, PYTHONUNBUFFERED="1"
  )  # progress reaches the log (and console) as it happens
  with (
    open(log_path, "w", buffering=1) as log,
    subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, bufsize=1
    ) as proc,
  ):
    log.write(f"$ {' '.join(cmd)}\n")
    for line in proc.stdout:
      log.write(line)
      tail.append(line)
      match = _PROGRESS.search(line)
      if match:
        console.progress(stage.name, match.group(0))
      if line.startswith("{") and '"stage"' in line:
        with contextlib.suppress(json.JSONDecodeError):
          summary = json.loads(line)
  if proc.returncode != 0:
    raise StageFailed(
      f"{stage.name} failed (exit {proc.returncode}): {last_error_line(tail)}  "
      f"[full log: {shown(log_path)}]"
    )
  return summary


@contextlib.contextmanager
def _demo_cdn(needed, demo_dir, port):
  if not needed:
    yield
    return
  from aplantida_jax.data import demo_data  # pylint: disable=g-import-not-at-top

  with demo_data.serve_directory(demo_dir, port):
    yield


def _ensure_demo_data(demo_dir, port):
  """Draws the demo catalog unless it exists and points at the port the CDN will use."""
  catalog = os.path.join(demo_dir, "catalog.jsonl")
  if os.path.exists(catalog):
    with open(catalog) as f:
      if f"http://127.0.0.1:{port}/" in f.readline():
        return
  print(f"drawing the demo catalog into {shown(demo_dir)}/", flush=True)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "tools", "make_demo_data.py"),
      "--out",
      demo_dir,
      "--base-url",
      f"http://127.0.0.1:{port}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode != 0:
    raise StageFailed(
      f"drawing the demo catalog failed (exit {proc.returncode}): "
      f"{last_error_line(proc.stderr.splitlines())}"
    )


def select(planned, start=None, only=None):
  """The [(stage, deps)] of `planned` that --from / --only keep."""
  names = [s.name for s, _ in planned]
  for flag, value in (("--from", start), ("--only", only)):
    if value is not None and value not in names:
      raise SystemExit(f"{flag} {value!r}: unknown stage; stages are {names}")
  if only:
    return [p for p in planned if p[0].name == only]
  if start:
    return planned[names.index(start) :]
  return list(planned)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument(
    "--configs",
    default=None,
    help="folder of your own stage configs (same file names as configs/); "
    "default: the built-in configs with their :demo variant on the demo data",
  )
  parser.add_argument("--from", dest="start", default=None, help="run from this stage on")
  parser.add_argument("--only", default=None, help="run only this stage")
  parser.add_argument("--force", action="store_true", help="re-run stages even when unchanged")
  args = parser.parse_args(argv)

  from configs import common  # pylint: disable=g-import-not-at-top

  demo = args.configs is None
  configs_dir = os.path.join(ROOT, "configs") if demo else os.path.abspath(args.configs)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  demo_dir = os.path.join(ROOT, common.DEMO_DATA_DIR)
  if demo:
    try:
      _ensure_demo_data(demo_dir, common.DEMO_PORT)
    except StageFailed as e:
      print(f"error: {e}", file=sys.stderr)
      return 1

  available = available_stages(configs_dir)
  configs = {
    s.name: load_config(os.path.join(configs_dir, s.config), "demo" if demo else None)
    for s in available
  }
  try:
    planned = select(stages_lib.plan(available, configs, workdir), args.start, args.only)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  manifest = manifest_lib.load(workdir)
  console = Console(len(planned))
  print(f"pipeline → {shown(workdir)} (stage logs in {shown(workdir)}/logs/)", flush=True)
  rows = []
  for stage, stage_deps in planned:
    path, config = os.path.join(configs_dir, stage.config), configs[stage.name]
    record = manifest["stages"].get(stage.name, {})
    deps = {d: manifest["stages"].get(d, {}).get("output_hash") for d in stage_deps}
    fingerprint = hashing.sha256_json(
      {"config": manifest_lib.redacted(config.to_dict()), "deps": deps}
    )
    out_dir = stages_lib.output(config, workdir)
    console.start(stage.name)
    unchanged = (
      record.get("status") == "done"
      and record.get("fingerprint") == fingerprint
      and os.path.exists(out_dir)
      and hashing.output_hash(out_dir) == record.get("output_hash")
    )
    if unchanged and not args.force:
      rows.append((stage.name, "skipped", 0.0, record.get("metric", "")))
      console.finish(*rows[-1])
      continue
    start = time.time()
    try:
      with _demo_cdn(demo and stage.serves_demo, demo_dir, common.DEMO_PORT):
        summary = _run_stage(
          stage,
          path + (":demo" if demo else ""),
          workdir,
          os.path.join(workdir, "logs", f"{stage.name}.log"),
          console,
        )
    except StageFailed as e:
      console.finish(stage.name, "FAILED", time.time() - start, "")
      print(f"error: stage {e}", file=sys.stderr)
      return 1
    wall = time.time() - start
    manifest["stages"][stage.name] = {
      "status": "done",
      "fingerprint": fingerprint,
      "config": manifest_lib.redacted(config.to_dict()),
      "seed": config.get("seed"),
      "output_hash": hashing.output_hash(out_dir),
      "wall_s": round(wall, 1),
      "metric": summary.get("metric", ""),
    }
    manifest_lib.save(workdir, manifest)  # after every stage: a crash keeps what completed
    rows.append((stage.name, "ran", wall, summary.get("metric", "")))
    console.finish(*rows[-1])

  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax/grain import chatter, not results
  manifest_lib.finalize(workdir, manifest)
  print("\nstage               status    time      key metric")
  for name, status, wall, metric in rows:
    print(f"{name:<19} {status:<9} {wall:7.1f}s  {metric}")
  print(f"{sum(r[2] for r in rows):.0f}s in all; manifest: {shown(workdir)}/manifest.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
