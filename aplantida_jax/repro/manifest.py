"""`<workdir>/manifest.json`: what ran, with what, and what it produced.

Versions, JAX backend and devices, git commit and dirty flag, every stage's
resolved config and seed, output hashes, pretrained-weight provenance and wall
time per stage. Secrets never get in: every string is passed through `redact`.
"""

import glob
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

from aplantida_jax import fileio
from aplantida_jax import hashing
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import sources

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "clu",
  "ml-collections",
  "tensorflow",
  "tensorflowjs",
  "tf-keras",
  "numpy",
  "pillow",
  "pymongo",
  "torch",
)


def redact(value: str) -> str:
  """Removes credentials from a string that holds a URI; other strings pass unchanged."""
  return sources.redact_uri(value) if "://" in value else value


def redacted(obj):
  """`obj` (nested dicts/lists of JSON values) with every string redacted."""
  if isinstance(obj, dict):
    return {k: redacted(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [redacted(v) for v in obj]
  if isinstance(obj, str):
    return redact(obj)
  return obj


def load(workdir: str) -> dict:
  path = workdir_lib.Workdir(workdir).manifest
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
    data.setdefault("stages", {})
    return data
  return {"stages": {}}


def save(workdir: str, manifest: dict) -> None:
  """Atomic write: a killed run never leaves a half-written manifest."""
  fileio.write_json(workdir_lib.Workdir(workdir).manifest, redacted(manifest))


def _versions() -> dict:
  out = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _git(root: str) -> dict:
  def git(*args):
    return subprocess.run(
      ["git", *args], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()

  commit = git("rev-parse", "HEAD")
  return {"commit": commit or None, "dirty": bool(git("status", "--porcelain")) if commit else None}


def _jax_devices() -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  return {
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "process_count": jax.process_count(),
  }


def _outputs(workdir: str) -> dict:
  """Hashes of the artefacts people ship or audit."""
  # Imported here: orbax and grain log warnings when imported, and the runner's console shows
  # only its stage lines (repro/pipeline.py); by now the stages are done.
  from aplantida_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

  out = {}
  dataset_manifest = workdir_lib.Workdir(workdir).dataset_manifest
  if os.path.exists(dataset_manifest):
    out["dataset_manifest_sha256"] = fileio.sha256_file(dataset_manifest)
  tfjs = workdir_lib.Workdir(workdir).tfjs
  if os.path.isdir(tfjs):
    out["tfjs_files"] = hashing.file_hashes(tfjs)
  params = {}
  for best in sorted(glob.glob(os.path.join(workdir, "**", "best"), recursive=True)):
    stage_dir = os.path.dirname(best)
    params[os.path.relpath(stage_dir, workdir)] = hashing.tree_sha256(
      checkpointing.load_variables(stage_dir)
    )
  if params:
    out["best_params_sha256"] = params
  provenance = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**", "provenance.json"), recursive=True)):
    with open(path) as f:
      provenance[os.path.relpath(path, workdir)] = json.load(f)
  if provenance:
    out["pretrained_provenance"] = provenance
  return out


def success_criteria(workdir: str):
  """The user's acceptance table: eval/report.json's rows, completed by later stages' outputs."""
  run = workdir_lib.Workdir(workdir)
  report = fileio.read_json(run.eval_report)
  if report is None:
    return None
  export_report = fileio.read_json(run.export_report)
  license_report = fileio.read_json(run.license_report)
  rows = []
  for row in report.get("criteria", []):
    row = dict(row)
    if row["criterion"].startswith("model size") and export_report:
      size = export_report["size"]["tfjs_mb"]
      limit = float(row["target"].split()[-1])
      row.update(value=size, passed=size <= limit, note="tfjs/export_report.json")
    elif row["criterion"].startswith("licence check") and license_report:
      row.update(
        value=license_report.get("passed"),
        passed=license_report.get("passed"),
        note="license_report.json",
      )
    rows.append(row)
  return rows


def finalize(workdir: str, manifest: dict) -> None:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  manifest.update(
    {
      "platform": platform.platform(),
      "versions": _versions(),
      "jax": _jax_devices(),
      "git": _git(root),
      "outputs": _outputs(workdir),
      "success_criteria": success_criteria(workdir),
      "seeds": {k: v.get("seed") for k, v in manifest["stages"].items()},
      "total_wall_s": round(sum(v.get("wall_s", 0) for v in manifest["stages"].values()), 1),
    }
  )
  save(workdir, manifest)
