"""Flax model → SavedModel → TF.js graph model, checked at each step.

The SavedModel is a deliverable itself (TF Serving, TFLite); the TF.js folder
is what the PWA downloads. Both pass `opcheck` before this returns, so a model
that would not run in the browser never leaves this module silently.
"""

import base64
import collections
import json
import os

import numpy as np
import tensorflow as tf

from aplantida_jax import fileio
from aplantida_jax.export import opcheck
from aplantida_jax.export import serving

QUANTIZE = ("float16", "uint8", "uint16", "")  # "" = float32 weights
SHARD_BYTES = 4 * 1024 * 1024  # browsers fetch and cache shards one by one


def save_saved_model(module: tf.Module, path: str) -> None:
  """Saves the serving signature only; gradient functions are not traced (inference needs none)."""
  tf.saved_model.save(
    module,
    path,
    signatures={"serving_default": module.serving_default},
    options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
  )


def saved_model_to_tfjs(saved_model_dir: str, out_dir: str, quantize: str = "float16") -> None:
  """tensorflowjs' own converter (`tensorflowjs_converter --quantize_float16`)."""
  if quantize not in QUANTIZE:
    raise ValueError(f"export.quantize={quantize!r}; choose one of {QUANTIZE}")
  opcheck.import_tensorflowjs().converters.tf_saved_model_conversion_v2.convert_tf_saved_model(
    saved_model_dir,
    out_dir,
    quantization_dtype_map={quantize: True} if quantize else None,
    weight_shard_size_bytes=SHARD_BYTES,
  )


# Fused op → the op it fuses a bias (and maybe an activation) into.
UNFUSED = {
  "_FusedConv2D": "Conv2D",
  "FusedDepthwiseConv2dNative": "DepthwiseConv2dNative",
  "_FusedMatMul": "MatMul",
}
FUSED_ONLY_ATTRS = ("fused_ops", "num_args", "num_host_args", "epsilon", "leakyrelu_alpha", "TArgs")
ACTIVATIONS = ("Relu", "Relu6")


def _fused_ops(node):
  return [base64.b64decode(s).decode() for s in node["attr"]["fused_ops"]["list"].get("s", [])]


def _split_fused(node):
  """`fused(x, w, y)` → `op(x, w)`, `AddV2(·, y)`[, activation]; the last keeps the name."""
  fused = _fused_ops(node)
  if (
    fused[0] != "BiasAdd"
    or any(op not in ACTIVATIONS for op in fused[1:])
    or len(node["input"]) != 3
  ):
    raise ValueError(f"cannot split {node['op']} {node['name']} with fused_ops {fused}")
  dtype = {"T": node["attr"]["T"]}
  plain = {
    "name": node["name"] + "/unfused",
    "op": UNFUSED[node["op"]],
    "input": node["input"][:2],
    "attr": {k: v for k, v in node["attr"].items() if k not in FUSED_ONLY_ATTRS},
  }
  add = {
    "name": node["name"] + "/add",
    "op": "AddV2",
    "input": [plain["name"], node["input"][2]],
    "attr": dtype,
  }
  chain = [plain, add] + [
    {"name": node["name"] + f"/{op.lower()}", "op": op, "input": [], "attr": dtype}
    for op in fused[1:]
  ]
  for previous, current in zip(chain[1:], chain[2:]):
    current["input"] = [previous["name"]]
  chain[-1]["name"] = node["name"]
  return chain


def fix_fused_biases(model_json_path: str) -> dict:
  """Makes every fused bias rank 1, as the wasm backend requires; returns what changed.

  tfjs-converter 4.22 fuses `Add(conv(x), y)` into the convolution whenever the
  conv has one consumer, with `y` kept as it is: a [1,1,1,C] constant (jnp
  broadcasting) or even an activation (a residual input). The cpu backend
  broadcasts both; the wasm backend throws "FusedConv2D only supports rank-1
  bias". Constants used only as fused biases are relabelled [C] (same bytes);
  any other fused "bias" is split back into the plain op and an AddV2.
  """
  with open(model_json_path) as f:
    model = json.load(f)
  specs = {w["name"]: w for group in model["weightsManifest"] for w in group["weights"]}
  nodes = model["modelTopology"]["node"]

  def bias_of(node):
    return (
      node["input"][2].split(":")[0] if node["op"] in UNFUSED and len(node["input"]) > 2 else None
    )

  consumers = {}
  for node in nodes:
    for position, name in enumerate(node.get("input", [])):
      consumers.setdefault(name.split(":")[0], []).append((node, position))
  reshaped, split, out = set(), 0, []
  for node in nodes:
    bias = bias_of(node)
    spec = specs.get(bias)
    if bias is None or (spec is not None and len(spec["shape"]) == 1):
      out.append(node)
    elif (
      spec is not None
      and all(d == 1 for d in spec["shape"][:-1])
      and all(bias_of(user) == bias and position == 2 for user, position in consumers[bias])
    ):
      spec["shape"] = spec["shape"][-1:]
      reshaped.add(bias)
      out.append(node)
    else:
      out.extend(_split_fused(node))
      split += 1
  if reshaped or split:
    model["modelTopology"]["node"] = out
    _write_model_json(model_json_path, model)
  return {"reshaped": len(reshaped), "split": split}


def _write_model_json(path, model):
  fileio.write_text(path, json.dumps(model))


def _scalar_weights(tfjs_dir, model) -> dict:
  weights = opcheck.import_tensorflowjs().read_weights.read_weights(
    model["weightsManifest"], tfjs_dir, flatten=True
  )
  return {w["name"]: float(w["data"]) for w in weights if np.ndim(w["data"]) == 0}


def _renamed_input(name, renamed):
  """An input reference ("node", "node:1" or "^node") with the node renamed."""
  control = name.startswith("^")
  node, _, port = name.lstrip("^").partition(":")
  node = renamed.get(node, node)
  return ("^" if control else "") + node + (":" + port if port else "")


def fuse_relu6(tfjs_dir: str) -> int:
  """`Minimum(Maximum(x, 0), 6)` → Relu6, fused into x's convolution when it can be; returns how many.

  jax2tf writes ReLU6 as the two element-wise ops it is in JAX; TF.js runs
  Relu6 as a fused activation of the convolution before it (as in Keras
  models), which saves two passes over every activation map.
  """
  path = os.path.join(tfjs_dir, "model.json")
  with open(path) as f:
    model = json.load(f)
  nodes = {n["name"]: n for n in model["modelTopology"]["node"]}
  scalars = _scalar_weights(tfjs_dir, model)
  uses = collections.Counter(i.split(":")[0] for n in nodes.values() for i in n.get("input", []))

  def split_scalar(node, value):
    """(other input, True) when one input of `node` is the scalar constant `value`."""
    a, b = (i.split(":")[0] for i in node["input"])
    if scalars.get(b) == value:
      return a, True
    return b, scalars.get(a) == value

  outputs = {
    t["name"].split(":")[0] for t in model.get("signature", {}).get("outputs", {}).values()
  }
  dropped, renamed, count = set(), {}, 0
  for node in list(nodes.values()):
    if node["op"] != "Minimum" or len(node["input"]) != 2:
      continue
    inner_name, six = split_scalar(node, 6.0)
    inner = nodes.get(inner_name)
    if not six or inner is None or inner["op"] != "Maximum" or uses[inner_name] != 1:
      continue
    x_name, zero = split_scalar(inner, 0.0)
    if not zero:
      continue
    x = nodes[x_name]
    dropped.add(inner_name)
    count += 1
    if (
      x["op"] in UNFUSED
      and _fused_ops(x) == ["BiasAdd"]
      and uses[x_name] == 1
      and node["name"] not in outputs
    ):
      x["attr"]["fused_ops"]["list"]["s"].append(base64.b64encode(b"Relu6").decode())
      dropped.add(node["name"])
      renamed[node["name"]] = x_name  # consumers read the convolution directly
    else:
      node.update(op="Relu6", input=[x_name], attr={"T": node["attr"]["T"]})
  if count:
    for node in nodes.values():
      node["input"] = [_renamed_input(i, renamed) for i in node.get("input", [])]
    model["modelTopology"]["node"] = [n for n in nodes.values() if n["name"] not in dropped]
    _write_model_json(path, model)
  return count


def export(
  model,
  variables,
  *,
  image_size: int,
  out_dir: str,
  temperature: float = 1.0,
  quantize: str = "float16",
  max_mb: float = 150.0,
) -> dict:
  """Writes `out_dir/saved_model/` and the TF.js model in `out_dir`; returns op counts and size.

  Raises opcheck.OpCheckError when either graph has ops TF.js would not run
  with `model.predict`, or the TF.js model is over `max_mb`.
  """
  saved_model_dir = os.path.join(out_dir, "saved_model")
  serve = serving.serving_fn(model, temperature)
  save_saved_model(serving.to_tf_module(serve, variables, image_size), saved_model_dir)
  saved_model_ops = opcheck.check_saved_model(saved_model_dir)
  saved_model_to_tfjs(saved_model_dir, out_dir, quantize)
  fixed_biases = fix_fused_biases(os.path.join(out_dir, "model.json"))
  relu6 = fuse_relu6(out_dir)
  tfjs_ops = opcheck.check_tfjs(os.path.join(out_dir, "model.json"))
  size_mb = opcheck.check_size(out_dir, max_mb)
  return {
    "tfjs_mb": size_mb,
    "tfjs_ops": dict(sorted(tfjs_ops.items())),
    "saved_model_op_types": len(saved_model_ops),
    "fixed_fused_biases": fixed_biases,
    "relu6": relu6,
  }
