"""tools/bench.py compares like with like: same architectures, same pipeline work.

Speeds are measured by the bench modes, never asserted here.
"""

import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aplantida_jax import models
from tests import helpers

sys.path.insert(0, os.path.join(helpers.ROOT, "tools"))
import bench  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite2"])
def test_torch_reference_has_the_flax_architecture(name):
  torch_reference = pytest.importorskip("torch_reference", exc_type=ImportError)
  flax_model = models.get_model(name, num_classes=1000)
  variables = jax.eval_shape(
    lambda: flax_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  flax_count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  torch_model = torch_reference.pure_torch_model(name, 1000)
  assert torch_reference.parameter_count(torch_model) == flax_count
  if name == "mobilenet_v2":
    assert flax_count == 3_504_872  # torchvision.models.mobilenet_v2()


def test_torch_reference_step_trains():
  torch_reference = pytest.importorskip("torch_reference", exc_type=ImportError)
  step, sync, info = torch_reference.train_step_fn(
    "mobilenet_v2", batch=4, res=32, num_classes=3, device="cpu"
  )
  losses = [float(step().detach()) for _ in range(4)]
  sync()
  assert losses[-1] < losses[0] and info["compile"] == "off"


def test_grain_and_tfdata_pipelines_do_the_same_work(tmp_path):
  """Whole-image crops (the 4:3 sources' own ratio): both give every source's colours."""
  pytest.importorskip("tensorflow")
  bench._synthetic_dataset(str(tmp_path), images=6, short_side=48, num_shards=2)  # pylint: disable=protected-access
  config = bench._loader_config(image_size=32, workers=0, seed=0)  # pylint: disable=protected-access
  config.input.crop_scale, config.input.crop_ratio = (1.0, 1.0), (4 / 3, 4 / 3)
  config.input.color_jitter = 0.0
  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top

  source_means = []
  for path in shards.shard_paths(str(tmp_path), "train"):
    for record in shards.read_shard(path):
      image = np.asarray(Image.open(io.BytesIO(record["jpeg"])).convert("RGB"), np.float32)
      assert image.shape == (48, 64, 3)
      source_means.append(image.mean(axis=(0, 1)))
  source_means = np.array(source_means)
  for make in (bench.grain_batches, bench.tfdata_batches):
    batches = make(str(tmp_path), config, 3)
    for _ in range(2):
      batch = next(batches)
      assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.uint8
      means = batch["image"].astype(np.float32).mean(axis=(1, 2))
      distance = np.abs(means[:, None] - source_means[None]).max(-1).min(-1)
      assert distance.max() < 4, (make.__name__, distance)


def test_scale_bench_measures_every_stage_it_runs(tmp_path):
  """The harness on a small catalog, first two stages: each measured in its own process."""
  out = tmp_path / "scale.json"
  result = bench.main(
    ["scale", "--classes", "12", "--per_class", "3", "--stages", "audit,export", "--out", str(out)]
  )
  assert result["images"] == 36 and sum(result["exported"].values()) == 36
  assert set(result["stages"]) == {"audit", "export"}
  for stage in result["stages"].values():
    assert stage["wall_s"] > 0 and stage["cpu_s"] > 0 and stage["peak_rss_mb"] > 50
  assert result["stages"]["export"]["output_mb"] > result["stages"]["audit"]["output_mb"] > 0
  with pytest.raises(SystemExit, match="3 images per species"):
    bench.main(["scale", "--per_class", "2", "--out", str(out)])


def test_a_3000_species_pipeline_runs_with_a_factorised_head(tmp_path):
  """audit → export → teacher → soft labels → evaluate → TF.js at 3,000 classes, 3 images each."""
  out = tmp_path / "scale.json"
  result = bench.main(
    [
      "scale",
      "--classes",
      "3000",
      "--per_class",
      "3",
      "--steps",
      "2",
      "--keep",
      str(tmp_path / "run"),
      "--out",
      str(out),
    ]
  )
  assert result["exported"] == {"train": 3000, "val": 3000, "test": 3000}
  assert list(result["stages"]) == [
    "audit",
    "export",
    "teacher_global",
    "soft_labels",
    "evaluate",
    "export_tfjs",
  ]
  workdir = tmp_path / "run" / "workdir"
  report = json.loads((workdir / "eval" / "report.json").read_text())
  assert len(report["per_class"]) == 3000 and report["test"]["calibrated"]["n"] == 3000
  assert report["test"]["calibrated"]["num_classes"] == 3000
  soft = json.loads((workdir / "soft_labels" / "meta.json").read_text())
  assert soft["counts"]["train"] == 3000
  # mobilenet_v2 at width 0.35 with a 128-wide head: the head is 3000 × 128 + 1280 × 128.
  assert 2 < result["tfjs_fp16_mb"] < 6
