"""Training engine: steps, accumulation, resume after SIGKILL, teachers through main.py.

In-process tests check the pure steps; the stages run as users run them
(`python -m aplantida_jax.main`) on a tiny shapes dataset (tests/tiny_dataset.py)
with a slim EfficientNet-Lite0 at 32 px, sharing one persistent XLA cache so each
program compiles once per session. Multi-device equivalence (8 forced host
devices, 2 processes) is tests/test_multidevice.py.
"""

import functools
import json
import os
import re
import shutil
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aplantida_jax import models
from aplantida_jax.train import checkpointing
from aplantida_jax.train import inference
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import loop
from aplantida_jax.train import state as state_lib
from aplantida_jax.train import steps
from configs import training
from tests import helpers
from tests.tiny_dataset import write_tiny_dataset

NUM_CLASSES = 3
TINY_MODEL = {
  "width_coefficient": 0.25,
  "depth_coefficient": 0.1,
  "dropout_rate": 0.0,
  "bn_momentum": 0.9,
}
STEPS = 12
LEARNING_RATE = 0.03
# The same overrides for both teachers: identical programs, compiled once.
TINY = [
  *helpers.model_overrides(),
  "--config.input.image_size=32",
  "--config.batch_size=8",
  "--config.eval_batch_size=8",
  f"--config.num_train_steps={STEPS}",
  "--config.checkpoint.every_steps=2",
  "--config.eval_every_steps=6",
  "--config.log_every_steps=2",
  f"--config.optimizer.learning_rate={LEARNING_RATE}",
  "--config.optimizer.warmup_steps=2",
  "--config.tensorboard=False",
]


def _tiny_model():
  return models.get_model("efficientnet_lite0", NUM_CLASSES, **TINY_MODEL)


def _optimizer_config(**overrides):
  c = training.optimizer_config()
  c.scale_learning_rate = False
  c.warmup_steps = 0
  c.update(overrides)
  return c


def _batch(seed, size=8, image_size=32):
  rng = np.random.default_rng(seed)
  return {
    "image": rng.integers(0, 256, (size, image_size, image_size, 3), dtype=np.uint8),
    "label": (np.arange(size) % NUM_CLASSES).astype(np.int32),
  }


def test_loss_goes_down_on_a_tiny_batch():
  model = _tiny_model()
  variables = model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)), train=False)
  opt = _optimizer_config(name="adamw", learning_rate=3e-3, weight_decay=0.0)
  state = state_lib.create_train_state(model, variables, opt, 8, 30)
  step = jax.jit(
    functools.partial(steps.train_step, loss_fn=steps.classification_task(0.0).loss_fn)
  )
  batch, rng = _batch(0), jax.random.PRNGKey(1)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, rng, None)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
  assert int(state.step) == 30


class _NoBatchNorm(nn.Module):
  """Batch norm makes micro-batch gradients differ from the full batch's by design,
  so the accumulation identity is checked on a conv net without it."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    return nn.Dense(NUM_CLASSES)(x.mean(axis=(1, 2)))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_gradient_accumulation_equals_one_big_batch(name):
  model, k = _NoBatchNorm(), 4
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  loss_fn = steps.classification_task(0.1).loss_fn
  big = _batch(3, size=16)
  rng = jax.random.PRNGKey(0)

  def run(accum, batches, updates):
    opt = _optimizer_config(name=name, learning_rate=0.1, grad_accum_steps=accum, weight_decay=1e-3)
    state = state_lib.create_train_state(model, variables, opt, 16, updates)
    step = jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn))
    history = []
    for batch in batches:
      state, _ = step(state, batch, rng, None)
      history.append(state.params)
    return history

  one = run(1, [big, big], updates=2)
  micro = [jax.tree.map(lambda x, i=i: x[i * 4 : (i + 1) * 4], big) for i in range(k)]
  accumulated = run(k, micro + micro, updates=2)
  for partial in accumulated[: k - 1]:  # nothing moves until the k-th micro-batch
    jax.tree.map(np.testing.assert_array_equal, partial, variables["params"])
  for got, want in ((accumulated[k - 1], one[0]), (accumulated[-1], one[1])):
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), got, want)


def test_ema_params_follow_updates_only():
  model = _NoBatchNorm()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  opt = _optimizer_config(learning_rate=0.1, grad_accum_steps=2, ema_decay=0.5)
  state = state_lib.create_train_state(model, variables, opt, 8, 4)
  step = jax.jit(
    functools.partial(steps.train_step, loss_fn=steps.classification_task(0.0).loss_fn)
  )
  state, _ = step(state, _batch(0, 4), jax.random.PRNGKey(0), None)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, variables["params"])
  state, _ = step(state, _batch(1, 4), jax.random.PRNGKey(0), None)
  expected = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, variables["params"], state.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), state.ema_params, expected)
  assert state.eval_variables()["params"] is state.ema_params


def test_schedule_warms_up_then_decays_and_decay_skips_biases_and_norms():
  opt = _optimizer_config(learning_rate=0.2, warmup_steps=10, end_learning_rate_factor=0.1)
  _, schedule = state_lib.create_optimizer(opt, 256, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.2)
  assert float(schedule(100)) == pytest.approx(0.02)
  mask = state_lib.decay_mask(
    _tiny_model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  )
  flat = {
    "/".join(str(getattr(k, "key", k)) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert all(flat[p] for p in flat if p.endswith("kernel"))
  assert not any(flat[p] for p in flat if p.endswith(("bias", "scale")))


def test_frozen_layers_keep_their_weights_and_the_rest_train():
  model = _tiny_model()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  opt = _optimizer_config(learning_rate=0.1, frozen="^(stem|block0)/")
  state = state_lib.create_train_state(model, variables, opt, 8, 4)
  step = jax.jit(
    functools.partial(steps.train_step, loss_fn=steps.classification_task(0.0).loss_fn)
  )
  for seed in range(2):
    state, _ = step(state, _batch(seed), jax.random.PRNGKey(seed), None)
  before, after = _flat(variables["params"]), _flat(state.params)
  frozen = [k for k in before if k.startswith(("['stem']", "['block0']"))]
  assert frozen and len(frozen) < len(before)
  for key in before:
    if key in frozen:
      np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  assert all(
    not np.array_equal(after[k], before[k])
    for k in before
    if k not in frozen and k.endswith("['kernel']")
  )


def test_frozen_layers_cost_no_backward_pass_and_grad_norm_covers_the_trained_ones():
  """XLA drops the backward pass of frozen layers only while nothing reads their gradient:
  the logged grad_norm must not (it once made the demo's frozen teacher 1.7x slower)."""
  model = _tiny_model()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  task = steps.classification_task(0.0)
  flops, metrics = {}, {}
  for frozen in ("", "^(stem|block0)/"):
    state = state_lib.create_train_state(model, variables, _optimizer_config(frozen=frozen), 8, 4)
    step = (
      jax.jit(functools.partial(steps.train_step, loss_fn=task.loss_fn))
      .lower(state, _batch(0), jax.random.PRNGKey(0), None)
      .compile()
    )
    cost = step.cost_analysis()
    flops[frozen] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    metrics[frozen] = step(state, _batch(0), jax.random.PRNGKey(0), None)[1]
  assert flops["^(stem|block0)/"] < 0.9 * flops[""], flops
  # The same gradients, but the norm covers only the trained ones.
  grads = jax.jit(
    jax.grad(
      lambda p: task.loss_fn(
        model.apply, {**variables, "params": p}, _batch(0), jax.random.PRNGKey(0), None
      )[0]
    )
  )(variables["params"])
  trained = [
    g for path, g in _flat(grads).items() if not path.startswith(("['stem']", "['block0']"))
  ]
  np.testing.assert_allclose(metrics[""]["grad_norm"], optax.global_norm(grads), rtol=1e-4)
  np.testing.assert_allclose(
    metrics["^(stem|block0)/"]["grad_norm"], optax.global_norm(trained), rtol=1e-4
  )


@pytest.mark.parametrize("pattern,what", [("^nothing_here/", "no"), (".", "every")])
def test_frozen_pattern_that_freezes_all_or_nothing_is_a_clear_error(pattern, what):
  params = _tiny_model().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)[
    "params"
  ]
  with pytest.raises(ValueError, match=f"config.optimizer.frozen.*matches {what} parameter"):
    state_lib.create_optimizer(_optimizer_config(frozen=pattern), 8, 4, params)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  """One XLA cache for every run here (or the caller's JAX_COMPILATION_CACHE_DIR)."""
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("xla_cache"))
  return {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _new_workdir(path):
  write_tiny_dataset(os.path.join(path, "dataset"), num_classes=NUM_CLASSES)
  return str(path)


def _checked(result):
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_env):
  """The global teacher trained in one go (the reference for resume)."""
  workdir = _new_workdir(tmp_path_factory.mktemp("straight"))
  summary = _checked(
    helpers.run_main("configs/teacher_global.py:demo", workdir, *TINY, **cache_env)
  )
  return workdir, summary


def _metrics(workdir, stage="teacher_global"):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _flat(variables):
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


def test_teacher_global_trains_through_main_and_logs(straight):
  workdir, summary = straight
  stage = os.path.join(workdir, "teacher_global")
  rows = _metrics(workdir)
  evals = [r for r in rows if "val_top1" in r]
  assert [r["step"] for r in evals] == [6, 12]
  assert evals[-1]["val_count"] == 18  # 6 val images per class, each counted once
  # Per region (the tiny dataset's countries cycle ES, FR, DE; all three are in Europe).
  assert (evals[-1]["val_spain_count"], evals[-1]["val_europe_count"]) == (6, 18)
  assert evals[-1]["val_europe_top1"] == pytest.approx(evals[-1]["val_top1"])
  train = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train] == list(range(2, STEPS + 1, 2))
  assert all(np.isfinite(r["train_loss"]) and 0 <= r["train_top1"] <= 1 for r in train)
  assert summary["best"]["value"] == max(r["val_top1"] for r in evals)
  with open(os.path.join(stage, "config.json")) as f:
    config = json.load(f)
  assert config["model"]["num_classes"] == NUM_CLASSES
  assert sorted(os.listdir(os.path.join(stage, "checkpoints"))) == ["10", "12", "8"]


def test_config_override_reaches_the_step(straight):
  """--config.optimizer.learning_rate is the peak of the schedule the step used."""
  workdir, _ = straight
  with open(os.path.join(workdir, "teacher_global", "config.json")) as f:
    assert json.load(f)["optimizer"]["learning_rate"] == LEARNING_RATE
  logged = {r["step"]: r["learning_rate"] for r in _metrics(workdir) if "learning_rate" in r}
  # Logged at step s is the rate of update s: linear warmup over 2, then cosine over 10.
  assert logged[2] == pytest.approx(LEARNING_RATE / 2, rel=1e-5)
  assert logged[4] == pytest.approx(LEARNING_RATE * 0.5 * (1 + np.cos(np.pi / 10)), rel=1e-5)


def test_best_checkpoint_reproduces_its_recorded_top1(straight):
  workdir, summary = straight
  stage = os.path.join(workdir, "teacher_global")
  out = inference.predict_split(stage, os.path.join(workdir, "dataset"), "val", batch_size=8)
  metadata = input_pipeline.read_metadata(os.path.join(workdir, "dataset"), "val")
  scores = out["scores"]
  assert (len(scores), scores.num_classes, scores.k) == (18, NUM_CLASSES, NUM_CLASSES)
  np.testing.assert_array_equal(out["labels"], metadata["labels"])
  assert out["sha256"] == metadata["sha256"] and out["regions"] == metadata["regions"]
  top1 = np.mean(scores.predicted == out["labels"])
  assert top1 == pytest.approx(summary["best"]["value"], abs=1e-6)
  model, variables, config = inference.load_model(stage, "latest")
  assert config.model.name == "efficientnet_lite0" and set(variables) == {"params", "batch_stats"}


def test_offset_views_are_the_shifted_logits_at_the_given_temperature(straight):
  """predict_split's offsets give, per view, softmax(β·(logits + offset)) of every image."""
  workdir, _ = straight
  stage, dataset = os.path.join(workdir, "teacher_global"), os.path.join(workdir, "dataset")
  offsets = np.random.default_rng(0).normal(0, 2, (2, NUM_CLASSES)).astype(np.float32)
  out = inference.predict_split(stage, dataset, "val", batch_size=8, offsets=offsets, beta=0.5)
  plain = out["scores"]  # K = C: every logit, so the dense logits can be rebuilt
  logits = np.zeros((len(plain), NUM_CLASSES))
  np.put_along_axis(logits, plain.top_classes, plain.top_logits, axis=1)
  views = out["views"]
  assert views["log_z"].shape == (2, len(plain))
  for v, offset in enumerate(offsets):
    z = 0.5 * (logits + offset)
    label = z[np.arange(len(z)), out["labels"]]
    np.testing.assert_allclose(views["log_z"][v], np.log(np.exp(z).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(views["top"][v], z.max(1), rtol=1e-5)
    np.testing.assert_allclose(views["label"][v], label, rtol=1e-5)
    np.testing.assert_array_equal(views["rank"][v], (z > label[:, None]).sum(1))
  assert "views" not in inference.predict_split(stage, dataset, "val", batch_size=8)


def _kill_mid_run(workdir, cache_env, after_step=4):
  """Starts the global teacher, SIGKILLs it once checkpoint `after_step` is committed."""
  proc = helpers.start_main("configs/teacher_global.py:demo", workdir, *TINY, **cache_env)
  committed = os.path.join(workdir, "teacher_global", "checkpoints", str(after_step))
  assert helpers.kill_when(proc, lambda: os.path.isdir(committed)), "ended before the kill"


def _descendants(pid):
  """Live (non-zombie) processes below `pid`, from /proc."""
  parents = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if fields[0] != "Z":
        parents[int(entry)] = int(fields[1])
  found, frontier = set(), {pid}
  while frontier:
    frontier = {child for child, parent in parents.items() if parent in frontier} - found
    found |= frontier
  return found


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def test_a_sigkilled_stage_leaves_no_data_worker_behind(straight, tmp_path, cache_env):
  reference, _ = straight
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference, "dataset"), os.path.join(workdir, "dataset"))
  proc = helpers.start_main(
    "configs/teacher_global.py:demo", workdir, *TINY, "--config.input.worker_count=2", **cache_env
  )
  first = os.path.join(workdir, "teacher_global", "checkpoints", "2")
  tree = set()

  def training():  # the processes below the stage, once it trains
    if os.path.isdir(first):
      tree.update(_descendants(proc.pid))
    return bool(tree)

  assert helpers.kill_when(proc, training), "the run ended before it could be killed"
  assert len(tree) >= 2, f"expected the Grain workers below {proc.pid}, found {tree}"
  deadline = time.time() + 10
  while any(_alive(p) for p in tree) and time.time() < deadline:
    time.sleep(0.2)
  assert not [p for p in tree if _alive(p)], "processes of the killed stage outlived it by 10 s"


def test_resume_after_sigkill_gives_bitwise_identical_params(straight, tmp_path, cache_env):
  reference, _ = straight
  workdir = str(tmp_path)
  shutil.copytree(os.path.join(reference, "dataset"), os.path.join(workdir, "dataset"))
  _kill_mid_run(workdir, cache_env)
  latest = checkpointing.StageCheckpoints(
    os.path.join(workdir, "teacher_global"),
    ml_collections.ConfigDict({"keep": 3, "async_save": False, "best_metric": "val_top1"}),
  )
  killed_at = latest.latest.latest_step()
  latest.close()
  assert 4 <= killed_at < STEPS
  rerun = helpers.run_main("configs/teacher_global.py:demo", workdir, *TINY, **cache_env)
  _checked(rerun)
  # A resume, not a restart from step 0 (orbax would skip the saves it already holds, and
  # the metrics rows would be rewritten, so equal results alone could not tell).
  assert re.findall(r"resumed \S+ at step (\d+)", rerun.stderr) == [str(killed_at)]
  trained = [int(s) for s in re.findall(rf"\bstep (\d+)/{STEPS}\b", rerun.stderr)]
  assert trained and min(trained) > killed_at and max(trained) == STEPS
  for which in ("latest", "best"):
    got = _flat(checkpointing.load_variables(os.path.join(workdir, "teacher_global"), which))
    want = _flat(checkpointing.load_variables(os.path.join(reference, "teacher_global"), which))
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{which} {key}")
  resumed = [r for r in _metrics(workdir) if "val_top1" in r]
  assert resumed == [r for r in _metrics(reference) if "val_top1" in r]


def test_a_diverged_run_stops_with_one_line_and_saves_nothing_after(tmp_path, cache_env):
  """loss NaN: the stage exits 1 naming the step and the learning rate, and saves, logs and
  evaluates nothing from then on (the programs of `straight`; only the learning rate differs)."""
  workdir = _new_workdir(tmp_path)
  result = helpers.run_main(
    "configs/teacher_global.py:demo",
    workdir,
    *TINY,
    "--config.optimizer.learning_rate=1e12",
    **cache_env,
  )
  assert result.returncode == 1, result.stderr[-4000:]
  last = result.stderr.strip().splitlines()[-1]
  # Steps 1-2 are finite (warmup starts at 0); update 2 at 5e11 blows up the loss of step 3,
  # seen at the next log step, 4, before its checkpoint is written.
  assert re.fullmatch(
    r"error: train: training diverged: grad_norm nan, loss nan, param_norm nan "
    r"in the steps up to 4 \(learning rate 9\.76e\+11\); the latest checkpoint "
    r"is step 2 \(the rerun resumes there\)\. Lower "
    r"--config\.optimizer\.learning_rate .*",
    last,
  ), last
  assert "Traceback" not in result.stderr
  stage = os.path.join(workdir, "teacher_global")
  assert os.listdir(os.path.join(stage, "checkpoints")) == ["2"]
  assert not os.path.isdir(os.path.join(stage, "best")) or not os.listdir(
    os.path.join(stage, "best")
  )  # no evaluation ran (the first is at step 6)
  assert [r["step"] for r in _metrics(workdir) if "train_loss" in r] == [2]


def test_a_stage_start_refuses_a_checkpoint_with_another_head(straight):
  """From a stage every tensor must fit: a class-count change is an error, not a silently
  re-initialised head (ImageNet imports replace it; stages do not)."""
  from configs import teacher_regional  # pylint: disable=g-import-not-at-top

  workdir, _ = straight
  config = loop.inherit_from_stage(teacher_regional.get_config("demo"), workdir)
  config = loop.resolve_config(config, NUM_CLASSES + 1)
  with pytest.raises(
    ValueError,
    match=r"teacher_global's best checkpoint does not fit "
    r"teacher_regional's network: 2 tensors differ "
    r"\(e\.g\. \['params/head/",
  ):
    loop.initial_variables(config, models.from_config(config.model), workdir, jax.random.PRNGKey(0))


def test_non_finite_logits_are_never_correct():
  logits = jnp.array([[0.0, 1.0, 2.0], [jnp.nan] * 3, [1.0, jnp.inf, 0.0], [3.0, 2.0, 1.0]])
  labels = jnp.array([2, 0, 1, 0])
  np.testing.assert_array_equal(steps.topk_correct(logits, labels, 1), [1, 0, 0, 1])
  np.testing.assert_array_equal(steps.topk_correct(logits, labels, 3), [1, 0, 0, 1])
  np.testing.assert_array_equal(steps.top1_agrees(logits, labels), [1, 0, 0, 1])


@pytest.mark.parametrize("mode", ["region_only", "region_weighted"])
def test_teacher_regional_starts_from_the_global_best(straight, tmp_path, cache_env, mode):
  reference, _ = straight
  workdir = str(tmp_path)
  for folder in ("dataset", "teacher_global"):
    shutil.copytree(os.path.join(reference, folder), os.path.join(workdir, folder))
  result = helpers.run_main(
    f"configs/teacher_regional.py:demo,mode={mode}", workdir, *TINY, **cache_env
  )
  summary = _checked(result)
  assert "initialised from" in result.stderr and "teacher_global" in result.stderr
  with open(os.path.join(workdir, "teacher_regional", "config.json")) as f:
    config = json.load(f)
  if mode == "region_only":
    assert config["input"]["region_filter"] == ["ES"]
    regions = input_pipeline.read_metadata(os.path.join(workdir, "dataset"), "train")["regions"]
    in_spain = sum(r == ["ES"] for r in regions)
    assert 0 < in_spain < len(regions)
    assert f"region filter ['ES'] keeps {in_spain} of {len(regions)} train records" in result.stderr
  else:
    assert config["input"]["sampling"] == "region_weighted"
  # The best checkpoint is the one with the highest Spain val top-1, not the world's.
  assert config["checkpoint"]["best_metric"] == "val_spain_top1"
  evals = [r for r in _metrics(workdir, "teacher_regional") if "val_top1" in r]
  assert evals and all(0 < r["val_spain_count"] < r["val_count"] for r in evals)
  best = max(evals, key=lambda r: r["val_spain_top1"])  # the first of equals
  assert summary["best"] == {
    "metric": "val_spain_top1",
    "value": pytest.approx(best["val_spain_top1"]),
  }
  assert os.listdir(os.path.join(workdir, "teacher_regional", "best")) == [str(best["step"])]
