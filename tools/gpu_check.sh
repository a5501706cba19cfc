#!/usr/bin/env bash
# GPU check, one table: JAX vs PyTorch train-step images/s (mobilenet_v2, efficientnet_lite2;
# 224 px, bf16, batch 256), the distillation step, and the Grain loader with 16 workers on
# synthetic shards it writes. Under 8 minutes on one H100 (before the on-device augmentation
# was timed too; not re-run since).
#
#   tools/fetch_gpu_wheels.sh      # once, where PyPI is reachable: wheels into .whl/
#   tools/gpu_check.sh             # on the GPU host, offline, from a copy of the repo + .whl/
#
# The host's Python (3.12) brings jax with CUDA, flax, optax, orbax, torch and timm; this
# script installs only the wheels in .whl/ (into $GPU_CHECK_SITE, not the system), then checks
# every import and the GPU BEFORE any benchmark and stops with the list of what is missing.
# Env: PYTHON (python3), GPU_CHECK_OUT (bench_results/gpu: JSON per step + table.txt),
#      BATCH (256), RES (224), LOADER_WORKERS (16), TORCH_COMPILE (auto|on|off).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-bench_results/gpu}
SITE=${GPU_CHECK_SITE:-/tmp/aplantida_site}
BATCH=${BATCH:-256}
RES=${RES:-224}
LOADER_WORKERS=${LOADER_WORKERS:-16}
TORCH_COMPILE=${TORCH_COMPILE:-auto}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json "$OUT_DIR"/distill_skipped.txt
start=$SECONDS

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || { echo "[gpu_check] wheel install failed"; exit 1; }
  export PYTHONPATH="$SITE:$ROOT"
else
  echo "[gpu_check] no .whl/ here (tools/fetch_gpu_wheels.sh makes it); using $PY as it is"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export TF_CPP_MIN_LOG_LEVEL=2 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU in one process

"$PY" - "$OUT_DIR" <<'EOF' || exit 1
"""Every import the benchmarks need, and a GPU for both frameworks, before any timing."""
import importlib
import os
import sys

sys.path.insert(0, "tools")
REQUIRED = ["numpy", "PIL", "cv2", "absl", "msgpack", "etils.epath", "cloudpickle", "portpicker", "tqdm",
            "jax", "flax", "optax", "orbax.checkpoint", "grain", "array_record.python.array_record_module",
            "ml_collections", "torch",
            "configs.training", "aplantida_jax.models", "aplantida_jax.train.steps",
            "aplantida_jax.train.state", "aplantida_jax.train.sharding",
            "aplantida_jax.train.input_pipeline", "torch_reference", "bench"]
# The distill row also needs these; when they fail it is skipped (said here, before any timing).
DISTILL = ["configs.student_distill", "aplantida_jax.distill.loop", "aplantida_jax.distill.soft_labels"]
OPTIONAL = {"timm": "EfficientNet-Lite reference falls back to tools/torch_reference.py",
            "torchvision": "MobileNetV2 reference falls back to tools/torch_reference.py",
            "tensorflow": "no tf.data column in the loader row"}
missing, modules = [], {}
for name in REQUIRED + list(OPTIONAL):
  try:
    modules[name] = importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    if name in REQUIRED:
      missing.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    else:
      print(f"[gpu_check] optional {name} not importable: {OPTIONAL[name]}")
distill_missing = []
for name in DISTILL:
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    distill_missing.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
if "bench" in modules:
  missing += [f"tools/bench.py mode {m!r}" for m in ("train", "loader")
              if m not in modules["bench"].MODES]
  if "distill" not in modules["bench"].MODES:
    distill_missing.append("tools/bench.py mode 'distill'")
if distill_missing:
  print("[gpu_check] the distill row will be SKIPPED:\n  " + "\n  ".join(distill_missing))
  with open(os.path.join(sys.argv[1], "distill_skipped.txt"), "w") as f:
    f.write("\n".join(distill_missing) + "\n")
if "jax" in modules and modules["jax"].default_backend() != "gpu":
  missing.append(f"a JAX GPU backend (jax.default_backend() is {modules['jax'].default_backend()!r}; "
                 "install jax[cuda12] / the CUDA plugin)")
if "torch" in modules and not modules["torch"].cuda.is_available():
  missing.append("a CUDA device for torch (torch.cuda.is_available() is False)")
if missing:
  print("[gpu_check] MISSING, nothing was benchmarked:\n  " + "\n  ".join(missing))
  print("  Add missing Python packages as wheels to .whl/ (tools/fetch_gpu_wheels.sh) and rerun.")
  sys.exit(1)
import jax, torch  # pylint: disable=g-import-not-at-top,multiple-statements
print(f"[gpu_check] imports ok: jax {jax.__version__} on {jax.devices()[0].device_kind}, "
      f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
EOF

# step NAME SECONDS ARGS...: one bench mode, bounded so that the table always comes out.
step() {
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check] $(( SECONDS - start ))s: $name (at most ${limit}s)"
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" tools/bench.py "$@" \
    --out "$OUT_DIR/$name.json" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  if (( rc != 0 )); then
    echo "[gpu_check] $name failed (exit $rc), last lines of $OUT_DIR/$name.log:"
    tail -n 15 "$OUT_DIR/$name.log"
    rm -f "$OUT_DIR/$name.json"
  fi
}

# One model per call: a step that runs out of time loses only its own row.
for model in mobilenet_v2 efficientnet_lite2; do
  step "train_$model" 140 train --model "$model" --batch "$BATCH" --res "$RES" --dtype bfloat16 \
    --torch_compile "$TORCH_COMPILE" --warmup 3 --windows 5 --window_s 1.5
done
if [[ ! -f "$OUT_DIR/distill_skipped.txt" ]]; then
  step distill 100 distill --batch "$BATCH" --res "$RES" --teachers 1 --dtype bfloat16 \
    --warmup 2 --windows 5 --window_s 1.0
fi
step loader 70 loader --workers "$LOADER_WORKERS" --batch "$BATCH" --image_size "$RES" \
  --images 2048 --pipelines grain,tfdata --warmup_batches 12 --batches_per_window 4

"$PY" - "$OUT_DIR" "$BATCH" "$RES" <<'EOF' | tee "$OUT_DIR/table.txt"
"""One table from the JSON of each step."""
import json
import os
import sys

out_dir, batch, res = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def load(name):
  path = os.path.join(out_dir, name + ".json")
  return json.load(open(path)) if os.path.exists(path) else None


def fmt(stats):
  if not stats:
    return "-"
  return f"{stats['median']:8.0f} ({stats['min']:.0f}-{stats['max']:.0f})"


rows = []
student_jax = None
for model in ("mobilenet_v2", "efficientnet_lite2"):
  train = load("train_" + model)
  if not train:
    rows.append((f"train {model}", "failed", "", "", f"see train_{model}.log"))
    continue
  device = train["device"]
  if model == "mobilenet_v2":
    print(f"device: {device['jax']['device_kind']} | jax {device['jax']['jax']} | "
          f"torch {device.get('torch', {}).get('torch', '-')}")
  for name, r in train["results"].items():
    torch_side = r["torch"]
    note = (f"{torch_side.get('source')}, {torch_side.get('precision')}, "
            f"channels_last={torch_side.get('channels_last')}, compile: {torch_side.get('compile')}"
            if "images_per_s" in torch_side else torch_side.get("skipped", ""))
    ratio = f"{r['jax_over_torch']:.2f}x" if r["jax_over_torch"] else "-"
    rows.append((f"train {name} {res}px bf16 b{batch}", fmt(r["jax"]["images_per_s"]),
                 fmt(torch_side.get("images_per_s")), ratio, note))
    cost = r["jax"].get("augmentation_cost")
    if cost is not None:
      rows.append(("  on-device flip + jitter, share of the step", f"{100 * cost:.1f} %", "",
                   "met" if cost < 0.05 else "NOT met", "goal < 5 %"))
    if name == "mobilenet_v2":
      student_jax = r["jax"]["images_per_s"]["median"]
      if r["jax_over_torch"]:
        goal = "met" if r["jax_over_torch"] >= 1.2 else "NOT met"
        rows.append(("  goal: student JAX >= 1.2x PyTorch AMP", "", "", goal, ""))
distill = load("distill")
if distill:
  for case, r in distill["results"].items():
    precision = "bf16" if distill.get("dtype") == "bfloat16" else "fp32"
    rows.append((f"distill step {case}: {distill['student']} {distill['res']}px {precision} "
                 f"b{distill['batch']}", fmt(r["images_per_s"]), "", "",
                 f"{distill['teachers']} online {distill['teacher']} teacher(s)"
                 if case == "online" else ""))
else:
  rows.append(("distill step", "skipped or failed", "", "", "see the log above / distill.log"))
loader = load("loader")
if loader:
  for workers, r in loader["results"].get("grain", {}).items():
    tf_side = loader["results"].get("tfdata", {}).get(workers)
    ratio = loader["grain_over_tfdata"].get(workers)
    rows.append((f"grain loader {workers} workers {res}px b{loader['batch']}",
                 fmt(r["images_per_s"]), fmt(tf_side["images_per_s"]) if tf_side else "-",
                 f"{ratio:.2f}x" if ratio else "-",
                 f"{r['images_per_s_per_worker']['median']:.0f} img/s per worker"
                 + (f"; tf.data: {loader['skipped']['tfdata'][:60]}" if "tfdata" in loader["skipped"] else "")))
    if student_jax:
      need = student_jax / r["images_per_s_per_worker"]["median"]
      rows.append((f"  workers to feed the student at {student_jax:.0f} img/s", f"{need:8.1f}", "",
                   "", f"of {os.cpu_count()} cores here"))
else:
  rows.append(("grain loader", "failed", "", "", "see loader.log"))

header = ("what", "JAX / Grain img/s (min-max)", "PyTorch / tf.data", "ratio", "notes")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
for r in [header] + rows:
  print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
EOF
echo "[gpu_check] done in $(( SECONDS - start ))s; JSON and logs in $OUT_DIR"
