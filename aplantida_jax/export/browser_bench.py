"""Browser latency: our exported student vs Keras MobileNetV2 converted the usual way.

Both models (same width, class count and input size, FP16 weights) load in one
Chromium page with the wasm backend and run interleaved, so a noisy neighbour
on the machine slows both alike; the median of `runs` predictions each and
their ratio are reported, with and without cross-origin isolation (threads).
"""

import contextlib
import os
import shutil
import statistics
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from aplantida_jax import models
from aplantida_jax.export import convert
from aplantida_jax.export import pwa_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
]


@contextlib.contextmanager
def served_page(model_dir, *, isolate=False, web_dir=pwa_server.WEB_DIR, path="/"):
  """A headless Chromium page at `path` of `web_dir` + `model_dir` served on 127.0.0.1."""
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  server = pwa_server.make_server(model_dir, port=0, isolate=isolate, web_dir=web_dir)
  pwa_server.serve_in_thread(server)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
      page = browser.new_page()
      page.goto(f"http://127.0.0.1:{server.server_address[1]}{path}")
      yield page
      browser.close()
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def pwa_page(tfjs_dir, script=""):
  """The PWA (web/ + `tfjs_dir`, no isolation) in headless Chromium, ready, with `script` added."""
  with served_page(tfjs_dir) as page:
    page.wait_for_selector("body[data-state=ready]", timeout=60_000)
    if script:
      page.add_script_tag(content=script)
    yield page


BENCH_PAGE = """<!doctype html><meta charset="utf-8">
<script src="/vendor/tfjs/dist/tf.min.js"></script>
<script src="/vendor/tfjs-backend-wasm/dist/tf-backend-wasm.min.js"></script>
<script>
async function bench(names, runs, size) {
  tf.wasm.setWasmPaths(location.origin + '/vendor/tfjs-backend-wasm/dist/');
  await tf.setBackend('wasm');
  await tf.ready();
  const x = tf.randomUniform([1, size, size, 3], 0, 255);
  const loaded = {};
  for (const name of names) {
    loaded[name] = await tf.loadGraphModel(name + '/model.json');
    for (let i = 0; i < 3; i++) await loaded[name].predict(x).data();  // warm-up
  }
  const times = Object.fromEntries(names.map((n) => [n, []]));
  for (let r = 0; r < runs; r++) {
    for (const name of names) {
      const t0 = performance.now();
      const y = loaded[name].predict(x);
      await y.data();
      times[name].push(performance.now() - t0);
      y.dispose();
    }
  }
  return {times, backend: tf.getBackend(), threads: tf.wasm.getThreadsCount(),
          crossOriginIsolated: self.crossOriginIsolated};
}
</script>"""


def _random_trained_like(variables, seed):
  """Non-trivial batch-norm statistics, so no op is folded away because a constant is 0 or 1."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    x = np.asarray(x)
    if "'var'" in name or "'scale'" in name:
      return rng.uniform(0.75, 1.25, x.shape).astype(np.float32)
    if "'mean'" in name or "'bias'" in name:
      return rng.normal(0, 0.1, x.shape).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(perturb, variables)


def export_student(out_dir, *, width, num_classes, image_size, seed=0):
  model = models.get_model("mobilenet_v2", num_classes, width=width)
  variables = model.init(
    jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)), train=False
  )
  return convert.export(
    model, _random_trained_like(variables, seed), image_size=image_size, out_dir=out_dir, max_mb=1e9
  )


def export_keras(out_dir, *, width, num_classes, image_size):
  """tf.keras.applications.MobileNetV2 → SavedModel → tensorflowjs FP16 (the usual route)."""
  keras_model = tf.keras.applications.MobileNetV2(
    input_shape=(image_size, image_size, 3), alpha=width, weights=None, classes=num_classes
  )
  saved_model_dir = os.path.join(out_dir, "saved_model")

  @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32)])
  def serve(images):
    return {"probabilities": keras_model(images, training=False)}

  module = tf.Module()
  module.model, module.serve = keras_model, serve
  tf.saved_model.save(module, saved_model_dir, signatures={"serving_default": serve})
  convert.saved_model_to_tfjs(saved_model_dir, out_dir, "float16")
  shutil.rmtree(saved_model_dir)


def measure(folders: dict, *, image_size: int, runs: int = 20, isolate: bool = True) -> dict:
  """{name: median ms} of each TF.js model in `folders`, interleaved in one Chromium page."""
  with tempfile.TemporaryDirectory(prefix="browser_bench_") as site:
    with open(os.path.join(site, "index.html"), "w") as f:
      f.write(BENCH_PAGE)
    for name, folder in folders.items():
      shutil.copytree(
        folder, os.path.join(site, name), ignore=shutil.ignore_patterns("saved_model")
      )
    model_dir = next(iter(folders.values()))
    with served_page(model_dir, isolate=isolate, web_dir=site, path="/index.html") as page:
      result = page.evaluate(
        "([names, runs, size]) => bench(names, runs, size)", [list(folders), runs, image_size]
      )
  medians = {name: statistics.median(t) for name, t in result["times"].items()}
  return {
    "median_ms": medians,
    "min_ms": {n: min(t) for n, t in result["times"].items()},
    "threads": result["threads"],
    "cross_origin_isolated": result["crossOriginIsolated"],
    "runs": runs,
  }


def compare_with_keras(
  *, width=1.0, num_classes=1000, image_size=224, runs=20, student_dir=None
) -> dict:
  """Ours/Keras latency ratio (≤ 1 means ours is no slower), with and without COOP/COEP."""
  with tempfile.TemporaryDirectory(prefix="browser_models_") as tmp:
    ours = student_dir or os.path.join(tmp, "ours")
    if student_dir is None:
      os.makedirs(ours)
      export_student(ours, width=width, num_classes=num_classes, image_size=image_size)
    keras_dir = os.path.join(tmp, "keras")
    os.makedirs(keras_dir)
    export_keras(keras_dir, width=width, num_classes=num_classes, image_size=image_size)
    sizes = {
      name: round(
        sum(
          os.path.getsize(os.path.join(d, f))
          for f in os.listdir(d)
          if f.endswith((".bin", ".json"))
        )
        / 1e6,
        3,
      )
      for name, d in (("ours", ours), ("keras", keras_dir))
    }
    out = {"width": width, "num_classes": num_classes, "image_size": image_size, "mb": sizes}
    for label, isolate in (("coop_coep", True), ("no_isolation", False)):
      m = measure(
        {"ours": ours, "keras": keras_dir}, image_size=image_size, runs=runs, isolate=isolate
      )
      m["ratio_ours_over_keras"] = m["median_ms"]["ours"] / m["median_ms"]["keras"]
      out[label] = m
  return out
