"""Where to apply the region prior in the browser: app.js on the output, or ops in the graph.

Times, in one Chromium page (wasm backend), app.js `applyPrior` on a C-class output against
the TF.js ops an in-graph prior would add (log, scale, add the region's log-ratio, softmax
on [1, C]), interleaved, medians; and the bytes each ships: region_prior.json (as the
evaluate stage writes it, raw and gzipped) or an FP16 [regions, C] constant in the weights.
"""

import gzip
import json
import statistics

import numpy as np

from aplantida_jax.export import browser_bench

BENCH_JS = """
window.priorBench = async (prior, probabilities, runs) => {
  const p = Float32Array.from(probabilities);
  const g = tf.tensor(prior.regions.spain.log_ratio, [1, p.length]);
  const inGraph = () => tf.tidy(() => tf.softmax(
      tf.log(tf.tensor(p, [1, p.length])).mul(prior.scale).add(g.mul(prior.strength))));
  const times = {app_js: [], tfjs_ops: []};
  for (let i = 0; i < 5; i++) { aplantida.applyPrior(p, prior, 'spain'); inGraph().dispose(); }
  for (let r = 0; r < runs; r++) {
    let t0 = performance.now();
    const a = aplantida.applyPrior(p, prior, 'spain');
    times.app_js.push(performance.now() - t0);
    t0 = performance.now();
    const y = inGraph();
    const b = await y.data();
    times.tfjs_ops.push(performance.now() - t0);
    y.dispose();
    times.max_abs_diff = Math.max(times.max_abs_diff || 0, ...a.map((v, i) => Math.abs(v - b[i])));
  }
  g.dispose();
  return times;
};
"""


def synthetic_prior(num_classes, regions=("spain", "europe"), seed=0):
  """A region_prior.json of `num_classes` classes with log-ratios of a realistic spread."""
  rng = np.random.default_rng(seed)
  return {
    "scale": 1.0,
    "strength": 1.8,
    "threshold": 0.5,
    "regions": {
      name: {
        "countries": ["ES"],
        "log_ratio": [round(float(g), 4) for g in rng.normal(0, 2, num_classes)],
      }
      for name in regions
    },
  }


def compare(tfjs_dir, num_classes=9000, runs=50):
  """Medians (ms) of both ways on one page, their largest output difference, and their sizes."""
  prior = synthetic_prior(num_classes)
  probabilities = np.random.default_rng(1).dirichlet(np.ones(num_classes) * 0.05)
  with browser_bench.pwa_page(tfjs_dir, BENCH_JS) as page:
    times = page.evaluate(
      "([prior, p, runs]) => priorBench(prior, p, runs)",
      [prior, probabilities.astype(np.float32).tolist(), runs],
    )
  text = json.dumps(prior).encode()
  return {
    "num_classes": num_classes,
    "regions": len(prior["regions"]),
    "runs": runs,
    "app_js_median_ms": statistics.median(times["app_js"]),
    "tfjs_ops_median_ms": statistics.median(times["tfjs_ops"]),
    "max_abs_diff": times["max_abs_diff"],
    "json_bytes": len(text),
    "json_gzip_bytes": len(gzip.compress(text, mtime=0)),
    "in_graph_fp16_bytes": 2 * num_classes * len(prior["regions"]),
  }
