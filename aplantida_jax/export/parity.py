"""Does the browser model say what the JAX model says?

The same images (the model's own input: float32 RGB 0–255) go through the JAX
serving function and through TF.js in Node (tools/tfjs_parity.mjs, pure-JS
cpu and wasm backends, FP16 weights as shipped). Reported per backend: the
largest absolute probability difference, raw top-1 agreement, and top-1
agreement on the images whose answer is decided (margin-aware, the one judged).

An image is decided when the JAX top-1 leads its runner-up by more than the
probability tolerance: there an honest FP16 rounding (|Δp| within tolerance)
cannot flip the answer, so a flip is a real mismatch. Among near-ties a flip
says nothing, and a model that is unsure about everything (near-uniform
probabilities) would otherwise fail on rounding alone. A wrong normalisation
or a wrong op moves probabilities by far more than the tolerance, so it still
fails on |Δp| and on the decided images.
"""

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from aplantida_jax.data import shards
from aplantida_jax.train import input_pipeline

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE_SCRIPT = os.path.join(REPO_ROOT, "tools", "tfjs_parity.mjs")
BACKENDS = ("cpu", "wasm")
TARGET = {"top1_agreement": 0.99, "max_abs_diff": 0.02}


def node_missing_reason():
  """None when Node and the project's TF.js are installed, else what to do."""
  if shutil.which("node") is None:
    return "node is not on PATH (install Node.js 18+)"
  if not os.path.isdir(os.path.join(REPO_ROOT, "node_modules", "@tensorflow", "tfjs-backend-wasm")):
    return f"TF.js is not installed in {REPO_ROOT}/node_modules (run `npm ci` or ./run.sh)"
  return None


def _spaced(num_records: int, count: int) -> np.ndarray:
  return np.unique(np.linspace(0, num_records - 1, min(count, num_records)).astype(int))


def split_images(
  dataset_dir: str, split: str, count: int, image_size: int, crop_fraction: float
) -> np.ndarray:
  """`count` evenly spaced records of `split`, preprocessed as evaluation does."""
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, split))
  transform = input_pipeline.EvalTransform(image_size, crop_fraction)
  return np.stack(
    [transform.map(source[int(i)])["image"] for i in _spaced(len(source), count)]
  ).astype(np.float32)


def split_labels(dataset_dir: str, split: str, count: int) -> np.ndarray:
  """The labels of the records split_images picks, in the same order."""
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, split))
  return np.asarray(
    [shards.decode(source[int(i)]["data"])["label"] for i in _spaced(len(source), count)], np.int64
  )


def tfjs_probabilities(
  tfjs_dir: str, images: np.ndarray, backends=BACKENDS, repeats: int = 1
) -> dict:
  """{backend: {"probabilities": [N, C] array, "median_ms": float}} from TF.js in Node."""
  reason = node_missing_reason()
  if reason:
    raise RuntimeError(f"TF.js parity needs Node: {reason}")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "images.npy")
    np.save(path, np.ascontiguousarray(images, np.float32))
    proc = subprocess.run(
      [
        "node",
        NODE_SCRIPT,
        "--model",
        os.path.abspath(tfjs_dir),
        "--images",
        path,
        "--backends",
        ",".join(backends),
        "--repeats",
        str(repeats),
      ],
      capture_output=True,
      text=True,
      cwd=REPO_ROOT,
      check=False,
    )
  if proc.returncode != 0:
    raise RuntimeError(
      f"{NODE_SCRIPT} failed on {tfjs_dir} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return {
    name: {"probabilities": np.asarray(r["probabilities"], np.float32), "median_ms": r["median_ms"]}
    for name, r in result["backends"].items()
  }


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float = None) -> dict:
  """Raw and margin-aware top-1 agreement and max |Δp| of two [N, C] probability arrays.

  `reference` is the JAX side; an image counts for the margin-aware agreement
  only when its reference top-1 leads the runner-up by more than `tolerance`
  (default TARGET["max_abs_diff"]). With no decided image that agreement is 1.
  """
  if reference.shape != candidate.shape:
    raise ValueError(f"probability shapes differ: {reference.shape} vs {candidate.shape}")
  tolerance = TARGET["max_abs_diff"] if tolerance is None else tolerance
  agree = reference.argmax(-1) == candidate.argmax(-1)
  top2 = -np.sort(-reference, axis=-1)[:, :2]
  margin = top2[:, 0] - (top2[:, 1] if reference.shape[-1] > 1 else 0.0)
  decided = margin > tolerance
  return {
    "n": int(len(reference)),
    "n_decided": int(decided.sum()),
    "top1_agreement": float(np.mean(agree[decided])) if decided.any() else 1.0,
    "top1_agreement_raw": float(np.mean(agree)),
    "max_abs_diff": float(np.max(np.abs(reference - candidate))),
  }


def report(jax_probs: np.ndarray, tfjs: dict, labels: np.ndarray = None) -> dict:
  """Per-backend comparison with the targets, and whether every backend meets them.

  Judged on the margin-aware top-1 agreement and max |Δp|; the raw agreement
  is reported beside them. With `labels`, each side's top-1 accuracy on these
  images is reported too (the shipped model's own accuracy, not judged).
  """
  backends = {
    name: {**compare(jax_probs, r["probabilities"]), "median_ms": r["median_ms"]}
    for name, r in tfjs.items()
  }
  if labels is not None:
    for name, r in tfjs.items():
      backends[name]["top1_accuracy"] = float(np.mean(r["probabilities"].argmax(-1) == labels))
  passed = all(
    b["top1_agreement"] >= TARGET["top1_agreement"] and b["max_abs_diff"] <= TARGET["max_abs_diff"]
    for b in backends.values()
  )
  out = {
    "target": TARGET,
    "margin": "top-1 agreement counts images whose JAX top-1 leads the "
    "runner-up by more than max_abs_diff",
    "passed": passed,
    "backends": backends,
  }
  if labels is not None:
    out["jax_top1_accuracy"] = float(np.mean(jax_probs.argmax(-1) == labels))
  return out
