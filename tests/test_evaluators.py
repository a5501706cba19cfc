"""In-loop evaluators from config.evals: same numbers as the evaluate stage, strict specs."""

import jax
import ml_collections
import numpy as np
import pytest

from aplantida_jax import models
from aplantida_jax.evaluation import evaluators
from aplantida_jax.evaluation import metrics
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import sharding
from aplantida_jax.train import state as state_lib
from aplantida_jax.train import steps
from configs import training
from tests.tiny_dataset import write_tiny_dataset

NUM_CLASSES = 3
SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("evaluators") / "dataset")
  write_tiny_dataset(path, num_classes=NUM_CLASSES)
  return path


def _config(**evals):
  c = training.training_config(output_dir="x", model_name="efficientnet_lite0", image_size=SIZE)
  c.eval_batch_size = 8  # 18 val records: the last batch is padded
  c.input.worker_count = 0
  c.eval_every_steps = 6
  c.model.num_classes = NUM_CLASSES
  c.model.kwargs = ml_collections.ConfigDict({"width_coefficient": 0.25, "depth_coefficient": 0.1})
  if evals:
    c.evals = ml_collections.ConfigDict(evals)
  return c


def _state(config):
  model = models.from_config(config.model)
  variables = models.init_variables(model, {"params": jax.random.PRNGKey(3)}, SIZE)
  return model, state_lib.create_train_state(model, variables, config.optimizer, 8, 10)


def test_classification_evaluator_gives_the_evaluate_stage_numbers_per_region(dataset):
  config = _config()
  config.regions.france = ["FR"]
  config.evals.val.regions = ("spain", "europe", "france")
  config.checkpoint.best_metric = "val_france_top1"
  mesh = sharding.create_mesh()
  built = evaluators.build(config, "", dataset, mesh)
  model, state = _state(config)
  got = evaluators.run_due(built, state, 6, last=False)

  # The evaluate stage's way: every logit of the split, then numpy metrics.
  apply = jax.jit(
    lambda images: steps.forward(model.apply, state.eval_variables(), images, None, train=False)[0]
  )
  meta = input_pipeline.read_metadata(dataset, "val")
  logits = np.zeros((len(meta["labels"]), NUM_CLASSES), np.float32)
  for batch in input_pipeline.eval_batches(config.input, dataset, "val", 8):
    real = batch["mask"] > 0
    logits[batch["index"][real]] = np.asarray(apply(batch["image"]))[real]
  want = metrics.region_accuracy(logits, meta["labels"], meta["regions"], config.regions.to_dict())
  assert got["val_count"] == 18
  assert got["val_top1"] == pytest.approx(want["global"]["top1"])
  assert got["val_top5"] == pytest.approx(want["global"]["top5"])
  for region in ("spain", "europe", "france"):
    assert got[f"val_{region}_count"] == want[region]["n"] > 0
    assert got[f"val_{region}_top1"] == pytest.approx(want[region]["top1"]), region
  assert got["val_loss"] == pytest.approx(
    float(np.mean(-jax.nn.log_softmax(logits)[np.arange(18), meta["labels"]])), rel=1e-5
  )


def test_each_evaluator_runs_on_its_own_schedule_and_at_the_last_step(dataset):
  config = _config(
    val=training.eval_config("classification"),
    often=training.eval_config("classification", every_steps=2),
  )
  built = evaluators.build(config, "", dataset, sharding.create_mesh())
  _, state = _state(config)
  assert set(evaluators.run_due(built, state, 4, last=False)) == {
    "often_loss",
    "often_top1",
    "often_top5",
    "often_count",
  }
  assert evaluators.run_due(built, state, 5, last=False) == {}
  assert {k.split("_")[0] for k in evaluators.run_due(built, state, 5, last=True)} == {
    "val",
    "often",
  }


@pytest.mark.parametrize(
  "evals, best, message",
  [
    ({"val": {"kind": "accuracy", "split": "val"}}, "val_top1", "known kinds"),
    (
      {"val": {"kind": "classification", "split": "val", "region": ["spain"]}},
      "val_top1",
      "unknown fields ['region']",
    ),
    (
      {"val": {"kind": "classification", "split": "val", "regions": ["mars"]}},
      "val_top1",
      "names ['mars'], not in config.regions",
    ),
    ({"val": {"kind": "classification", "split": "val"}}, "top1", "choose one of ['val_loss'"),
    # The tiny dataset's val split has no Portuguese image: no metric to choose the best by.
    (
      {"val": {"kind": "classification", "split": "val", "regions": ["portugal"]}},
      "val_portugal_top1",
      "holds images of that region",
    ),
  ],
)
def test_a_bad_evaluator_spec_or_best_metric_is_an_error_naming_the_field(
  dataset, evals, best, message
):
  config = _config(**evals)
  config.regions.portugal = ["PT"]
  config.checkpoint.best_metric = best
  with pytest.raises(ValueError, match="config.evals|config.checkpoint.best_metric") as e:
    evaluators.build(config, "", dataset, sharding.create_mesh())
  assert message in str(e.value)
