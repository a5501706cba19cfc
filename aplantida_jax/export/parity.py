"""Does the browser model say what the JAX model says?

The same images (the model's own input: float32 RGB 0–255) go through the JAX
serving function and through TF.js in Node (tools/tfjs_parity.mjs, pure-JS
cpu and wasm backends, FP16 weights as shipped). Reported per backend: top-1
agreement and the largest absolute probability difference.
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


def split_images(dataset_dir: str, split: str, count: int, image_size: int,
                 crop_fraction: float) -> np.ndarray:
  """`count` evenly spaced records of `split`, preprocessed as evaluation does."""
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, split))
  transform = input_pipeline.EvalTransform(image_size, crop_fraction)
  indices = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).astype(int))
  return np.stack([transform.map(source[int(i)])["image"] for i in indices]).astype(np.float32)


def tfjs_probabilities(tfjs_dir: str, images: np.ndarray, backends=BACKENDS, repeats: int = 1) -> dict:
  """{backend: {"probabilities": [N, C] array, "median_ms": float}} from TF.js in Node."""
  reason = node_missing_reason()
  if reason:
    raise RuntimeError(f"TF.js parity needs Node: {reason}")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "images.npy")
    np.save(path, np.ascontiguousarray(images, np.float32))
    proc = subprocess.run(
        ["node", NODE_SCRIPT, "--model", os.path.abspath(tfjs_dir), "--images", path,
         "--backends", ",".join(backends), "--repeats", str(repeats)],
        capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{NODE_SCRIPT} failed on {tfjs_dir} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return {name: {"probabilities": np.asarray(r["probabilities"], np.float32), "median_ms": r["median_ms"]}
          for name, r in result["backends"].items()}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
  """Top-1 agreement and max |Δp| of two [N, C] probability arrays."""
  if reference.shape != candidate.shape:
    raise ValueError(f"probability shapes differ: {reference.shape} vs {candidate.shape}")
  return {"n": int(len(reference)),
          "top1_agreement": float(np.mean(reference.argmax(-1) == candidate.argmax(-1))),
          "max_abs_diff": float(np.max(np.abs(reference - candidate)))}


def report(jax_probs: np.ndarray, tfjs: dict) -> dict:
  """Per-backend comparison with the targets, and whether every backend meets them."""
  backends = {name: {**compare(jax_probs, r["probabilities"]), "median_ms": r["median_ms"]}
              for name, r in tfjs.items()}
  passed = all(b["top1_agreement"] >= TARGET["top1_agreement"] and
               b["max_abs_diff"] <= TARGET["max_abs_diff"] for b in backends.values())
  return {"target": TARGET, "passed": passed, "backends": backends}
