"""Fail loudly when an export would not run (or not run synchronously) in TF.js.

Two views of the same model are checked:
- the SavedModel's serving function (what the converter starts from): no op
  that TF.js cannot execute at all (`Xla*`, left by jax2tf when XLA lowering
  sneaks in) or that the converter rejects (`PreventGradient`), and no control
  flow (`If`/`While` become `Switch`/`Merge`);
- the converted `model.json` graph (what the browser executes): every op must
  be in `TFJS_OPS`, the ops our models produce after conversion, each of which
  tfjs-converter 4.22 executes (a test checks that against its op list). A new
  op therefore fails here, is looked up, and is added on purpose.
`Switch`/`Merge` would force `executeAsync` (so `model.predict` throws).
"""

import collections
import glob
import json
import os

from tensorflow.python.saved_model import loader_impl

# Ops that would not run, or not with model.predict, in TF.js.
FORBIDDEN = {
  "Merge": "control flow: forces executeAsync in TF.js (model.predict fails)",
  "Switch": "control flow: forces executeAsync in TF.js (model.predict fails)",
  "Enter": "loop control flow: forces executeAsync in TF.js",
  "Exit": "loop control flow: forces executeAsync in TF.js",
  "NextIteration": "loop control flow: forces executeAsync in TF.js",
  "LoopCond": "loop control flow: forces executeAsync in TF.js",
  "If": "functional control flow: lowered to Switch/Merge by the converter",
  "StatelessIf": "functional control flow: lowered to Switch/Merge by the converter",
  "While": "functional control flow: lowered to loops by the converter",
  "StatelessWhile": "functional control flow: lowered to loops by the converter",
  "PreventGradient": "jax2tf with_gradient=False; the TF.js converter rejects it",
}
XLA_REASON = "XLA op (jax2tf enable_xla=True or native serialization): TF.js has no kernel"

# What our models become after tfjs-converter's freezing and grappler fusion.
TFJS_OPS = frozenset(
  {
    "Placeholder",
    "Const",
    "Identity",
    "Conv2D",
    "_FusedConv2D",
    "DepthwiseConv2dNative",
    "FusedDepthwiseConv2dNative",
    "MatMul",
    "_FusedMatMul",
    "BiasAdd",
    "Add",
    "AddV2",
    "Sub",
    "Mul",
    "RealDiv",
    "Maximum",
    "Minimum",
    "Relu",
    "Relu6",
    "Exp",
    "Rsqrt",
    "Sqrt",
    "Neg",
    "Reciprocal",
    "Sum",
    "Mean",
    "Max",
    "Softmax",
    "Reshape",
    "Squeeze",
    "ExpandDims",
    "Pad",
    "Cast",
  }
)


def import_tensorflowjs():
  """The tensorflowjs package, imported so that it works without a terminal.

  It imports tensorflow_decision_forests, whose welcome banner imports
  IPython (not installed) whenever stdout is not a terminal: under pytest,
  in CI logs, when run.sh output is piped. The documented switch turns it off.
  """
  os.environ.setdefault("TFDF_DISABLE_WELCOME_MESSAGE", "1")
  import tensorflowjs  # pylint: disable=g-import-not-at-top

  return tensorflowjs


class OpCheckError(ValueError):
  """The export contains ops that TF.js cannot run as required."""


def _function_ops(functions, name, seen, counts):
  """Adds the ops of library function `name` and of the functions it calls."""
  if name in seen or name not in functions:
    return
  seen.add(name)
  for node in functions[name].node_def:
    counts[node.op] += 1
    _called_functions(node, functions, seen, counts)


def _called_functions(node, functions, seen, counts):
  for value in node.attr.values():
    names = [value.func.name] if value.HasField("func") else [f.name for f in value.list.func]
    for name in names:
      _function_ops(functions, name, seen, counts)


def saved_model_ops(
  saved_model_dir: str, signature: str = "serving_default"
) -> collections.Counter:
  """Op counts of what `signature` executes, read from the proto (nothing runs).

  Only the nodes feeding the signature's outputs and the functions they call
  are counted; gradient functions (stored for with_gradient=True) never run in
  inference and are not.
  """
  meta_graph = loader_impl.parse_saved_model(saved_model_dir).meta_graphs[0]
  if signature not in meta_graph.signature_def:
    raise OpCheckError(
      f"{saved_model_dir} has no signature {signature!r} "
      f"(has {sorted(meta_graph.signature_def)}); re-export it."
    )
  graph = meta_graph.graph_def
  nodes = {node.name: node for node in graph.node}
  functions = {f.signature.name: f for f in graph.library.function}
  pending = [t.name.split(":")[0] for t in meta_graph.signature_def[signature].outputs.values()]
  visited, seen, counts = set(), set(), collections.Counter()
  while pending:
    name = pending.pop().lstrip("^")
    if name in visited or name not in nodes:
      continue
    visited.add(name)
    node = nodes[name]
    counts[node.op] += 1
    _called_functions(node, functions, seen, counts)
    pending.extend(i.split(":")[0] for i in node.input)
  return counts


def tfjs_ops(model_json_path: str) -> collections.Counter:
  """Op counts of a TF.js graph model, including its function library."""
  with open(model_json_path) as f:
    topology = json.load(f)["modelTopology"]
  counts = collections.Counter(node["op"] for node in topology.get("node", []))
  for function in topology.get("library", {}).get("function", []):
    counts.update(node["op"] for node in function.get("nodeDef", []))
  return counts


def _forbidden(ops):
  found = {op: FORBIDDEN[op] for op in ops if op in FORBIDDEN}
  found.update({op: XLA_REASON for op in ops if op.startswith("Xla")})
  return found


def check_saved_model(saved_model_dir: str) -> collections.Counter:
  """Raises OpCheckError on forbidden ops in the serving function; returns its op counts."""
  ops = saved_model_ops(saved_model_dir)
  bad = _forbidden(ops)
  if bad:
    raise OpCheckError(
      f"SavedModel {saved_model_dir} cannot be served by TF.js: "
      + "; ".join(f"{op} x{ops[op]} ({why})" for op, why in sorted(bad.items()))
      + ". Export with serving.to_tf_module (enable_xla=False, native_serialization=False, "
      "with_gradient=True, static batch) and keep data-dependent control flow out of the model."
    )
  return ops


def check_tfjs(model_json_path: str, allowed=TFJS_OPS) -> collections.Counter:
  """Raises OpCheckError on forbidden or unlisted ops in model.json; returns its op counts."""
  ops = tfjs_ops(model_json_path)
  bad = _forbidden(ops)
  bad.update(
    {
      op: "not in opcheck.TFJS_OPS (check tfjs-converter's op list, then add it there)"
      for op in ops
      if op not in allowed and op not in bad
    }
  )
  if bad:
    raise OpCheckError(
      f"TF.js graph {model_json_path} has ops the browser would not run as required: "
      + "; ".join(f"{op} x{ops[op]} ({why})" for op, why in sorted(bad.items()))
    )
  return ops


def folder_mb(folder: str) -> float:
  """What the PWA downloads and caches: model.json plus its weight shards, in MB (10^6 bytes)."""
  files = [os.path.join(folder, "model.json")] + glob.glob(os.path.join(folder, "*.bin"))
  return sum(os.path.getsize(p) for p in files) / 1e6


def check_size(folder: str, max_mb: float) -> float:
  """Raises OpCheckError when the TF.js model is over `max_mb`; returns its size in MB."""
  size = folder_mb(folder)
  if size > max_mb:
    raise OpCheckError(
      f"TF.js model in {folder} is {size:.1f} MB, over export.max_mb={max_mb}. Use a smaller "
      "width or a factorised head (model.kwargs.head_dim), or raise export.max_mb."
    )
  return size


def tfjs_supported_ops() -> set:
  """Every TF op tfjs-converter 4.22 maps to a TF.js kernel (its op_list/*.json)."""
  tensorflowjs = import_tensorflowjs()
  names = set()
  for path in glob.glob(os.path.join(os.path.dirname(tensorflowjs.__file__), "op_list", "*.json")):
    with open(path) as f:
      names.update(op["tfOpName"] for op in json.load(f))
  return names
