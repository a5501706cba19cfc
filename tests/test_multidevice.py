"""Data parallelism over 8 devices and over 2 processes gives the 1-device result.

Device count and jax.distributed are fixed when a process starts, so each run
is a subprocess running the real loop (`train_and_evaluate`) on the same tiny
dataset, all four processes at once: the 1-device reference, one process with
8 forced host devices, and two processes on 127.0.0.1 (gloo collectives, each
loading its ShardByJaxProcess share).

The setup makes the comparison exact in expectation: images are mirror
symmetric, crops cover the whole image, colour jitter, dropout and stochastic
depth are off, so augmentation cannot differ between runs (checked below);
and one global batch is one epoch (16 records), so every step of every run
sees the same examples, only in another order and placement. Mean loss and
batch-norm statistics over the global batch do not depend on that order, so
losses and parameters agree up to float summation order (the small learning
rate keeps that noise from growing). Were the two processes to read the same
share, or not to reduce gradients across processes, they would not.
"""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import aplantida_jax
from tests import helpers

NUM_CLASSES = 4
TRAIN_RECORDS = 16  # == batch size: one global batch is one epoch
STEPS = 4
STAGE = "student"
TIMEOUT_S = 420
PLANT_ENV = "APLANTIDA_TEST_PLANT_MISSING_REDUCTION"
# Per tensor, |sharded − reference| / |reference − initial| (relative_deviations). Float
# summation order keeps it below ~2e-3 in these runs (medians ~1e-5 on 8 devices, ~1e-3
# through gloo); a missing gradient reduction gives a median of ~2 (the planted run), so the
# check does not hang on one CPU's rounding. FLOAT_NOISE: ~8 float32 ulps of an O(1) value.
MAX_RELATIVE_DEVIATION = 1e-2
FLOAT_NOISE = 1e-6


def _mirrored_image(rng, label, size=32):
  """A noisy background with a class-coloured patch, mirror-symmetric, as lossless PNG.

  PIL decodes PNG where the shards hold JPEG (the pipeline is otherwise unchanged); JPEG's
  rounding would break the exact symmetry. Images must keep texture in both directions:
  with little horizontal structure, batch norm is near-degenerate and 16 examples in another
  order already give visibly different losses after a few steps.
  """
  colours = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40))
  half = rng.integers(40, 200, size=(size, size // 2, 3)).astype(np.uint8)
  top, left = rng.integers(0, size - 12, size=2) // (1, 2)
  half[top : top + 12, left : left + 8] = colours[label]
  out = io.BytesIO()
  Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)).save(out, format="PNG")
  return out.getvalue()


def write_flip_invariant_dataset(dataset_dir):
  from aplantida_jax import fileio  # pylint: disable=g-import-not-at-top
  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for split, n, num_shards in (("train", TRAIN_RECORDS, 2), ("val", 8, 1)):
    records = []
    for k in range(n):
      jpeg = _mirrored_image(rng, k % NUM_CLASSES)
      records.append(
        dict(
          jpeg=jpeg,
          label=k % NUM_CLASSES,
          species=f"Species {k % NUM_CLASSES}",
          regions=["ES"],
          country="ES",
          license="CC0-1.0",
          author="test",
          url=f"https://example.invalid/{k}.jpg",
          sha256=hashlib.sha256(jpeg).hexdigest(),
        )
      )
    shards.write_split(dataset_dir, split, records, num_shards)
  fileio.write_json(
    os.path.join(dataset_dir, "classes.json"),
    [
      {
        "index": i,
        "species": f"Species {i}",
        "common_names": {},
        "regions": ["ES"],
        "family": "Testaceae",
      }
      for i in range(NUM_CLASSES)
    ],
  )


def tiny_config(coordinator="", num_processes=1, process_id=0):
  from configs import training  # pylint: disable=g-import-not-at-top

  config = training.training_config(
    output_dir=STAGE, model_name="efficientnet_lite0", image_size=32
  )
  # 7 narrow blocks compile fast; no dropout or stochastic depth, whose masks follow the
  # position in the batch, which differs between the runs.
  config.model.kwargs = {
    "width_coefficient": 0.25,
    "depth_coefficient": 0.25,
    "dropout_rate": 0.0,
    "drop_path_rate": 0.0,
  }
  config.input.crop_scale = (1.0, 1.0)  # the whole image ...
  config.input.crop_ratio = (1.0, 1.0)  # ... of these square images
  config.input.color_jitter = 0.0
  config.input.worker_count = 0
  config.input.read_threads = 2
  config.input.prefetch_buffer_size = 16
  config.batch_size = TRAIN_RECORDS
  config.eval_batch_size = 8
  config.num_train_steps = STEPS
  config.log_every_steps = 1
  config.eval_every_steps = STEPS
  config.checkpoint.every_steps = STEPS
  config.checkpoint.async_save = False
  config.tensorboard = False
  config.optimizer.learning_rate = 0.002  # larger steps make this tiny net chaotic
  config.optimizer.scale_learning_rate = False
  config.optimizer.warmup_steps = 0
  config.mesh.coordinator_address = coordinator
  config.mesh.num_processes = num_processes
  config.mesh.process_id = process_id
  return config


def _plant_missing_gradient_reduction():
  """The bug the 8-device check must catch: each device's update from its own share of the
  batch, without the cross-device mean (device 0's replica kept). Forward pass and batch
  statistics are unchanged; only the loss, hence the gradient, covers device 0's 2 examples."""
  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax.train import steps  # pylint: disable=g-import-not-at-top

  share = TRAIN_RECORDS // jax.device_count()

  def classification_task(label_smoothing):
    def loss_fn(apply_fn, variables, batch, rng, aux):
      del aux
      logits, batch_stats = steps.forward(apply_fn, variables, batch["image"], rng)
      loss = steps.cross_entropy(logits[:share], batch["label"][:share], label_smoothing).mean()
      return loss, (batch_stats, {"top1": steps.topk_correct(logits, batch["label"], 1).mean()})

    return steps.Task(loss_fn=loss_fn)

  steps.classification_task = classification_task


def _train(workdir, coordinator="", num_processes=1, process_id=0):
  """Subprocess body: train, then print one JSON line with the topology and summary."""
  import jax  # pylint: disable=g-import-not-at-top

  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top

  if os.environ.get(PLANT_ENV):
    _plant_missing_gradient_reduction()
  summary = loop.train_and_evaluate(tiny_config(coordinator, num_processes, process_id), workdir)
  print(
    "RESULT "
    + json.dumps(
      {"devices": jax.device_count(), "processes": jax.process_count(), "final": summary["final"]},
      default=float,
    )
  )


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, *args, devices=1, plant=False):
  # Not the inherited XLA_FLAGS: the classic runtime that importing aplantida_jax chose there
  # aborts on the collectives these runs need, and at the tests' LLVM level 0 the sharded float
  # sums drift past rtol 1e-4 by step 4. Every run, one device or eight, uses the thunk runtime
  # at the default level, so the curves differ only by sharding.
  flags = [f"--xla_force_host_platform_device_count={devices}"]
  if aplantida_jax.cpu_runtime_flag_supported():
    flags.append("--xla_cpu_use_thunk_runtime=true")
  env = helpers.cli_env(
    XLA_FLAGS=" ".join(flags), TQDM_DISABLE="1", **({PLANT_ENV: "1"} if plant else {})
  )
  return subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), workdir, *map(str, args)],
    cwd=helpers.ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(name, proc):
  try:
    out, _ = proc.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"{name} run timed out after {TIMEOUT_S}s:\n{out[-4000:]}")
  results = [line[len("RESULT ") :] for line in out.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and results, f"{name} run failed:\n{out[-4000:]}"
  return json.loads(results[-1])


def _train_losses(workdir):
  with open(os.path.join(workdir, STAGE, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
  assert sorted(losses) == list(range(1, STEPS + 1))
  return np.array([losses[s] for s in sorted(losses)])


def _final_params(workdir):
  from aplantida_jax.train import checkpointing  # pylint: disable=g-import-not-at-top

  variables = checkpointing.load_variables(os.path.join(workdir, STAGE), "latest")
  return {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in _flatten(variables)}


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for key, value in sorted(tree.items()):
      yield from _flatten(value, prefix + (key,))
  else:
    yield prefix, tree


def _initial_params():
  """The variables every run starts from (the loop's own init, from the config seed)."""
  import jax  # pylint: disable=g-import-not-at-top

  from aplantida_jax import models  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = loop.resolve_config(tiny_config(), NUM_CLASSES)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = loop.initial_variables(config, models.from_config(config.model), "", init_rng)
  return {"/".join(map(str, path)): np.asarray(leaf) for path, leaf in _flatten(variables)}


def relative_deviations(actual, expected, initial):
  """{tensor: |actual − expected| / (|expected − initial| + FLOAT_NOISE·√n)} (L2 norms).

  The disagreement as a fraction of how far training moved the tensor. The floor covers
  tensors training cannot move (a batch-norm bias before another batch norm has zero
  gradient): their values are rounding noise of O(1) sums in every run alike.
  """
  assert actual.keys() == expected.keys() == initial.keys() and expected
  out = {}
  for k in expected:
    moved = np.linalg.norm(expected[k].astype(np.float64) - initial[k])
    off = np.linalg.norm(actual[k].astype(np.float64) - expected[k])
    out[k] = off / (moved + FLOAT_NOISE * np.sqrt(expected[k].size))
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs and results of all four processes, started together."""
  root = tmp_path_factory.mktemp("multidevice")
  workdirs = {
    name: str(root / name) for name in ("reference", "eight_devices", "two_processes", "planted")
  }
  for workdir in workdirs.values():
    write_flip_invariant_dataset(os.path.join(workdir, "dataset"))
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = {
    "reference": _start(workdirs["reference"]),
    "eight_devices": _start(workdirs["eight_devices"], devices=8),
    "process0": _start(workdirs["two_processes"], coordinator, 2, 0),
    "process1": _start(workdirs["two_processes"], coordinator, 2, 1),
    "planted": _start(workdirs["planted"], devices=8, plant=True),
  }
  results = {}
  for name, proc in procs.items():
    try:
      results[name] = _finish(name, proc)
    except BaseException as e:  # pylint: disable=broad-except  # reported by the test that needs it
      results[name] = e
  return workdirs, results


def _result(results, name):
  if isinstance(results[name], BaseException):
    raise results[name]
  return results[name]


def test_train_augmentation_is_the_same_for_every_seed_and_epoch(tmp_path):
  """The premise of the exact comparison: with this config, a record's train crop is the same
  whatever the seed and epoch (so the runs' different orders and placements see equal pixels)."""
  from aplantida_jax.data import shards  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import augment  # pylint: disable=g-import-not-at-top
  from aplantida_jax.train import input_pipeline  # pylint: disable=g-import-not-at-top

  write_flip_invariant_dataset(str(tmp_path))
  inp = tiny_config().input
  source = input_pipeline.RecordSource(shards.shard_paths(str(tmp_path), "train"))
  draws = [(seed, epoch) for seed in range(4) for epoch in range(3)]
  augments = {seed: augment.Augment.of(inp, seed) for seed in range(4)}
  transforms = {
    seed: input_pipeline.TrainTransform(inp.image_size, augments[seed]) for seed in range(4)
  }
  flips = set()
  for index in range(len(source)):
    element = source[index]
    views = []
    for seed, epoch in draws:
      crop = transforms[seed].map({**element, "epoch": epoch})["image"]
      flip, _ = augments[seed].draws([epoch], [element["position"]])
      flips.add(bool(flip[0]))
      views.append(
        np.asarray(augments[seed].flip_jitter(crop[None], [epoch], [element["position"]])[0])
      )
    for view in views[1:]:
      np.testing.assert_array_equal(view, views[0])
  assert flips == {False, True}  # both flip outcomes occurred: the equality is not vacuous


def test_eight_devices_give_the_single_device_loss_curve_and_params(runs):
  workdirs, results = runs
  reference, sharded = _result(results, "reference"), _result(results, "eight_devices")
  assert (reference["devices"], sharded["devices"]) == (1, 8)
  expected = _train_losses(workdirs["reference"])
  assert np.ptp(expected) > 1e-3  # the parameters moved: the comparison is not vacuous
  np.testing.assert_allclose(_train_losses(workdirs["eight_devices"]), expected, rtol=1e-4)
  initial, expected_params = _initial_params(), _final_params(workdirs["reference"])
  deviations = relative_deviations(
    _final_params(workdirs["eight_devices"]), expected_params, initial
  )
  worst = max(deviations, key=deviations.get)
  assert deviations[worst] < MAX_RELATIVE_DEVIATION, (worst, deviations[worst])
  # The same check on a run whose gradients were not reduced across devices fails by far.
  _result(results, "planted")
  planted = relative_deviations(_final_params(workdirs["planted"]), expected_params, initial)
  assert max(planted.values()) > 10 * MAX_RELATIVE_DEVIATION
  assert np.median(list(planted.values())) > MAX_RELATIVE_DEVIATION
  assert sharded["final"]["val_count"] == reference["final"]["val_count"] == 8
  np.testing.assert_allclose(
    sharded["final"]["val_loss"], reference["final"]["val_loss"], rtol=1e-4
  )


def test_two_processes_give_the_single_process_params(runs):
  """gloo sums in another order than one device, and in this net that noise grows each step;
  a real bug (the same share read twice, gradients not reduced) changes the batch or the
  update itself, by the size of the update (the planted run above)."""
  workdirs, results = runs
  reference = _result(results, "reference")
  process0, process1 = _result(results, "process0"), _result(results, "process1")
  for process in (process0, process1):
    assert (process["devices"], process["processes"]) == (2, 2)
    # Each process evaluated its share; the reported sums cover the whole split.
    assert process["final"]["val_count"] == reference["final"]["val_count"] == 8
    np.testing.assert_allclose(
      process["final"]["val_loss"], reference["final"]["val_loss"], rtol=1e-3
    )
  np.testing.assert_allclose(
    _train_losses(workdirs["two_processes"]), _train_losses(workdirs["reference"]), rtol=1e-3
  )
  deviations = relative_deviations(
    _final_params(workdirs["two_processes"]),
    _final_params(workdirs["reference"]),
    _initial_params(),
  )
  worst = max(deviations, key=deviations.get)
  assert deviations[worst] < MAX_RELATIVE_DEVIATION, (worst, deviations[worst])


if __name__ == "__main__":
  sys.path.insert(0, helpers.ROOT)
  _train(sys.argv[1], *(sys.argv[2:3]), *map(int, sys.argv[3:]))
