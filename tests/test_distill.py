"""Distillation: KD loss, soft-label stage, alignment, refusal, resume, both modes.

The stages run as users run them (`python -m aplantida_jax.main`) on a tiny
dataset with two untrained MobileNetV2 teachers (32 px), sharing a persistent
XLA compilation cache so that each program is compiled once per session.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aplantida_jax import fileio
from aplantida_jax.data import shards
from aplantida_jax.distill import losses
from aplantida_jax.distill import soft_labels
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import loop
from aplantida_jax.train import state as state_lib
from configs import teacher_global
from tests import helpers
from tests.tiny_dataset import write_tiny_dataset

NUM_CLASSES = 4
TOP_K = 2
SIZE = 32
COMMON = [f"--config.input.image_size={SIZE}", "--config.batch_size=8", "--config.eval_batch_size=8"]
SOFT = ["--config.batch_size=8", "--config.chunk_size=16", f"--config.top_k={TOP_K}"]


# ---------------------------------------------------------------- KD loss vs NumPy


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference_kd(student_logits, labels, probs, classes, rest, alpha, t):
  """NumPy: KL over (top-k, "other") against the student's collapsed tempered distribution."""
  probs, rest = probs.astype(np.float64), rest.astype(np.float64)
  total = probs.sum(-1) + rest
  probs, rest = probs / total[:, None], rest / total
  q = _softmax(student_logits.astype(np.float64) / t)
  out = []
  for i in range(len(labels)):
    q_top = q[i, classes[i]]
    q_rest = 1.0 - q_top.sum()
    kl = np.sum(np.where(probs[i] > 0, probs[i] * np.log(probs[i] / q_top), 0.0))
    if rest[i] > 0:
      kl += rest[i] * np.log(rest[i] / q_rest)
    ce = -np.log(_softmax(student_logits[i].astype(np.float64))[labels[i]])
    out.append((alpha * t * t * kl + (1 - alpha) * ce, kl, ce))
  return np.array(out)


def test_kd_loss_matches_numpy_reference_with_remaining_mass():
  rng = np.random.default_rng(0)
  b, c, k, t, alpha = 6, 9, 3, 3.0, 0.7
  student = rng.normal(0, 2, (b, c)).astype(np.float32)
  teacher = _softmax(rng.normal(0, 3, (b, c)) / t)
  classes = np.argsort(-teacher, -1)[:, :k].astype(np.int32)
  probs = np.take_along_axis(teacher, classes, -1).astype(np.float16)  # stored as fp16
  rest = (1.0 - np.take_along_axis(teacher, classes, -1).sum(-1)).astype(np.float32)
  labels = rng.integers(0, c, b).astype(np.int32)
  loss, kl, ce = losses.kd_loss(jnp.asarray(student), jnp.asarray(labels), jnp.asarray(probs),
                                jnp.asarray(classes), jnp.asarray(rest), alpha=alpha,
                                temperature=t)
  want = _reference_kd(student, labels, probs, classes, rest, alpha, t)
  np.testing.assert_allclose(np.stack([loss, kl, ce], -1), want, rtol=1e-5, atol=1e-6)
  assert np.all(want[:, 1] > 0)


def test_full_top_k_equals_dense_kl_and_has_finite_gradients():
  rng = np.random.default_rng(1)
  b, c, t = 4, 5, 2.0
  student = rng.normal(0, 2, (b, c)).astype(np.float32)
  teacher = _softmax(rng.normal(0, 2, (b, c)) / t)
  target = losses.sparse_target(jnp.asarray(teacher, jnp.float32), c)  # k = C: rest = 0
  kl = losses.sparse_kl(jnp.asarray(student), *target, t)
  q = _softmax(student.astype(np.float64) / t)
  np.testing.assert_allclose(kl, np.sum(teacher * np.log(teacher / q), -1), rtol=1e-5, atol=1e-6)
  grads = jax.grad(lambda s: losses.sparse_kl(s, *target, t).sum())(jnp.asarray(student))
  assert np.all(np.isfinite(grads))


def test_remaining_mass_bucket_leaves_the_tail_shape_free():
  """Only the student's total mass outside the top-k is matched, not its shape."""
  t = 1.0
  probs = jnp.array([[0.5, 0.3]], jnp.float16)
  classes = jnp.array([[0, 1]], jnp.int32)
  rest = jnp.array([0.2], jnp.float32)
  # Same top-2 probabilities (0.5, 0.3) and tail mass 0.2, spread differently.
  flat = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.1]]))
  peaked = jnp.log(jnp.array([[0.5, 0.3, 0.19, 0.01]]))
  for student in (flat, peaked):
    np.testing.assert_allclose(losses.sparse_kl(student, probs, classes, rest, t), 0.0, atol=1e-4)
  wrong_tail = jnp.log(jnp.array([[0.6, 0.35, 0.025, 0.025]]))
  assert losses.sparse_kl(wrong_tail, probs, classes, rest, t)[0] > 0.01


# ---------------------------------------------------------------- a tiny workdir with teachers


def _save_teacher(workdir, name, seed):
  """An untrained MobileNetV2-0.35 teacher (config.json + real orbax best checkpoint)."""
  config = teacher_global.get_config("demo")
  config.input.image_size = SIZE
  config = loop.resolve_config(config, NUM_CLASSES)
  config.output_dir = name
  model = loop.create_model(config)
  variables = loop.initial_variables(config, model, workdir, jax.random.PRNGKey(seed))
  # Untrained logits are nearly equal; spread them so each teacher has a clear ranking.
  head = variables["params"]["head"]["logits"]
  head["kernel"] = head["kernel"] * 20.0
  head["bias"] = jnp.asarray(np.random.default_rng(seed).normal(0, 2, NUM_CLASSES), jnp.float32)
  stage_dir = os.path.join(workdir, name)
  os.makedirs(stage_dir)
  fileio.write_json(os.path.join(stage_dir, loop.CONFIG_FILE), config.to_dict())
  state = state_lib.create_train_state(model, variables, config.optimizer, 8, 10)
  ckpt = checkpointing.StageCheckpoints(stage_dir, config.checkpoint)
  ckpt.maybe_save_best(1, state, 0.5)
  ckpt.close()


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cache_env):
  """Workdir with dataset, two teachers and soft labels from the real stage (CLI)."""
  workdir = str(tmp_path_factory.mktemp("distill"))
  write_tiny_dataset(os.path.join(workdir, "dataset"), num_classes=NUM_CLASSES,
                     per_class={"train": 6, "val": 3}, size=SIZE)
  _save_teacher(workdir, "teacher_global", 1)
  _save_teacher(workdir, "teacher_regional", 2)
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *SOFT, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _copy(workdir, tmp_path, name="w"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def test_soft_labels_match_a_numpy_recomputation_of_the_weighted_ensemble(labelled):
  meta = json.load(open(os.path.join(labelled, "soft_labels", "meta.json")))
  assert [t["dir"] for t in meta["teachers"]] == ["teacher_global", "teacher_regional"]
  assert meta["counts"] == {"train": 6 * NUM_CLASSES, "val": 3 * NUM_CLASSES}
  assert meta["temperature"] == 3.0 and meta["top_k"] == TOP_K
  assert not os.path.exists(os.path.join(labelled, "soft_labels", "chunks"))
  stored = {a: np.load(os.path.join(labelled, "soft_labels", "train", f"{a}.npy"))
            for a in soft_labels.ARRAYS}
  assert stored["probs"].dtype == np.float16 and stored["classes"].dtype == np.int32

  # Recompute: each teacher on the eval crop, regional teacher ×4 on ES images (weights 1, 0.5).
  probs = []
  for name in ("teacher_global", "teacher_regional"):
    model = loop.create_model(loop.resolve_config(
        teacher_global.get_config("demo"), NUM_CLASSES))
    variables = checkpointing.load_variables(os.path.join(labelled, name))
    batch = next(input_pipeline.eval_batches(_input(), os.path.join(labelled, "dataset"),
                                             "train", 64))
    images = batch["image"][batch["mask"] > 0]
    logits = model.apply(variables, np.asarray(
        (images / 255.0 - input_pipeline.IMAGENET_MEAN) / input_pipeline.IMAGENET_STD,
        np.float32), train=False)
    probs.append(_softmax(np.asarray(logits, np.float64) / 3.0))
  regions = input_pipeline.read_metadata(os.path.join(labelled, "dataset"), "train")["regions"]
  in_spain = np.array([r == ["ES"] for r in regions])
  assert 0 < in_spain.sum() < len(in_spain)
  w_regional = np.where(in_spain, 0.5 * 4.0, 0.5)[:, None]
  mixed = (probs[0] + w_regional * probs[1]) / (1.0 + w_regional)
  want_classes = np.argsort(-mixed, -1)[:, :TOP_K]
  want_probs = np.take_along_axis(mixed, want_classes, -1)
  np.testing.assert_allclose(stored["probs"], want_probs, atol=2e-3)
  np.testing.assert_allclose(stored["rest"], 1 - want_probs.sum(-1), atol=2e-3)
  ranked = np.sort(mixed, -1)[:, ::-1]
  clear = np.all(ranked[:, :TOP_K] - ranked[:, 1:TOP_K + 1] > 1e-3, -1)  # no near-tie
  assert clear.mean() > 0.8
  np.testing.assert_array_equal(stored["classes"][clear], want_classes[clear])
  # The per-image weights matter: the plain mean of the two teachers is not what was stored.
  plain = np.sort((probs[0] + probs[1]) / 2, -1)[:, ::-1][:, :TOP_K]
  assert not np.allclose(stored["probs"], plain, atol=2e-3)


def _input():
  from configs import training  # pylint: disable=g-import-not-at-top
  config = training.input_config(SIZE)
  config.worker_count = 0
  return config


class _EchoJoin(soft_labels.SoftLabelJoin):
  """The real join plus the record's own sha256, so the test can check alignment."""

  def __call__(self, index, record):
    return {**super().__call__(index, record),
            "record_sha": np.frombuffer(bytes.fromhex(record["sha256"]), np.uint8)}


def _joined_batches(workdir, shard_index, join):
  dataset_dir = os.path.join(workdir, "dataset")
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, "train"))
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=grain.sharding.ShardOptions(shard_index, 2),
      shuffle=True, num_epochs=1, seed=7)
  return grain.DataLoader(data_source=source, sampler=sampler, operations=[
      input_pipeline.TrainTransform(SIZE, join_fn=join), grain.transforms.Batch(5)])


def test_soft_labels_stay_aligned_under_sharding_and_shuffling(labelled):
  join, _ = soft_labels.open_split(os.path.join(labelled, "soft_labels"),
                                   os.path.join(labelled, "dataset"), "train")
  stored = {a: np.load(os.path.join(labelled, "soft_labels", "train", f"{a}.npy"))
            for a in soft_labels.ARRAYS}
  by_sha = {stored["sha256"][i].tobytes(): i for i in range(len(stored["sha256"]))}
  seen = []
  for shard_index in (0, 1):
    for batch in _joined_batches(labelled, shard_index, _EchoJoin(join.split_dir)):
      for j, sha in enumerate(batch["record_sha"]):
        row = by_sha[sha.tobytes()]
        assert row == batch["index"][j]
        np.testing.assert_array_equal(batch["teacher_classes"][j], stored["classes"][row])
        np.testing.assert_array_equal(batch["teacher_probs"][j], stored["probs"][row])
        seen.append(row)
  assert sorted(seen) == list(range(len(by_sha))) and seen != sorted(seen)  # all, once, shuffled


def test_misaligned_rows_are_refused_when_read(labelled, tmp_path):
  workdir = _copy(labelled, tmp_path)
  path = os.path.join(workdir, "soft_labels", "train", "sha256.npy")
  np.save(path, np.roll(np.load(path), 1, axis=0))
  join, _ = soft_labels.open_split(os.path.join(workdir, "soft_labels"),
                                   os.path.join(workdir, "dataset"), "train")
  with pytest.raises(Exception, match="misaligned"):
    next(iter(_joined_batches(workdir, 0, join)))


def test_stale_or_mismatched_soft_labels_are_refused(labelled, tmp_path):
  workdir = _copy(labelled, tmp_path)
  soft_dir, dataset_dir = os.path.join(workdir, "soft_labels"), os.path.join(workdir, "dataset")
  sha_path = os.path.join(soft_dir, "train", "sha256.npy")
  full = np.load(sha_path)
  np.save(sha_path, full[:-1])
  with pytest.raises(ValueError, match="hold 23 rows"):
    soft_labels.open_split(soft_dir, dataset_dir, "train")
  np.save(sha_path, full)
  manifest = os.path.join(dataset_dir, "manifest.json")
  with open(manifest, "a") as f:
    f.write("\n")
  with pytest.raises(ValueError, match="another dataset"):
    soft_labels.open_split(soft_dir, dataset_dir, "train")
  # The stage says the same, before any training.
  result = helpers.run_main("configs/student_distill.py:demo", workdir, *COMMON)
  assert result.returncode != 0 and "another dataset" in result.stderr


def test_soft_labels_resume_from_finished_chunks(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  soft_dir = os.path.join(workdir, "soft_labels")
  meta = json.load(open(os.path.join(soft_dir, "meta.json")))
  chunks = os.path.join(soft_dir, "chunks")
  os.makedirs(chunks)
  with open(os.path.join(chunks, "fingerprint"), "w") as f:
    f.write(meta["fingerprint"])
  # A finished first chunk (16 records) with marked contents: a resumed run must keep it.
  first = {a: np.load(os.path.join(soft_dir, "train", f"{a}.npy"))[:16] for a in soft_labels.ARRAYS}
  first["rest"] = np.full(16, 0.125, np.float32)
  np.savez(os.path.join(chunks, "train-0000000000.npz"), **first)
  os.remove(os.path.join(soft_dir, "meta.json"))  # the interrupted run never finished
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *SOFT, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  rest = np.load(os.path.join(soft_dir, "train", "rest.npy"))
  original = np.load(os.path.join(labelled, "soft_labels", "train", "rest.npy"))
  np.testing.assert_array_equal(rest[:16], 0.125)
  np.testing.assert_allclose(rest[16:], original[16:])
  assert json.load(open(os.path.join(soft_dir, "meta.json")))["fingerprint"] == meta["fingerprint"]


# ---------------------------------------------------------------- distillation end to end


DISTILL = COMMON + ["--config.num_train_steps=16", "--config.checkpoint.every_steps=4",
                    "--config.eval_every_steps=2", "--config.log_every_steps=4",
                    "--config.tensorboard=False"]


def _latest_params(workdir, stage="student/distill"):
  return checkpointing.load_variables(os.path.join(workdir, stage), "latest")


def _kill_after_first_checkpoint(workdir, cache_env):
  cmd = [sys.executable, "-m", "aplantida_jax.main", "--config=configs/student_distill.py:demo",
         f"--workdir={workdir}", *DISTILL]
  proc = subprocess.Popen(cmd, cwd=helpers.ROOT, env=helpers.cli_env(**cache_env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "student", "distill", "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps_done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert steps_done and max(steps_done) < 16, f"not interrupted mid-run: {steps_done}"


def test_precomputed_distillation_resumes_exactly_after_sigkill_then_finetunes(
    labelled, tmp_path, cache_env):
  straight = _copy(labelled, tmp_path, "straight")
  result = helpers.run_main("configs/student_distill.py:demo", straight, *DISTILL, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert "teacher agreement" in summary["metric"]
  rows = [json.loads(l) for l in open(os.path.join(straight, "student/distill/metrics.jsonl"))]
  train_rows = [r for r in rows if "train_loss" in r]
  assert train_rows and all({"train_kl", "train_ce", "train_teacher_agree"} <= set(r)
                            for r in train_rows)

  killed = _copy(labelled, tmp_path, "killed")
  _kill_after_first_checkpoint(killed, cache_env)
  result = helpers.run_main("configs/student_distill.py:demo", killed, *DISTILL, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  a, b = _latest_params(straight), _latest_params(killed)
  jax.tree.map(np.testing.assert_array_equal, a, b)

  result = helpers.run_main("configs/student_finetune.py:demo", straight, *COMMON,
                            "--config.num_train_steps=4", "--config.eval_every_steps=4",
                            "--config.tensorboard=False", **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.load(open(os.path.join(straight, "student/finetune/config.json")))
  assert config["init_from_stage"] == "student/distill"
  assert os.path.isdir(os.path.join(straight, "student/finetune/best"))


def test_online_distillation_runs_end_to_end(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  shutil.rmtree(os.path.join(workdir, "soft_labels"))  # online mode needs only the teachers
  result = helpers.run_main("configs/student_distill.py:demo,mode=online", workdir, *DISTILL,
                            "--config.num_train_steps=4", "--config.distill.top_k=2", **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(l) for l in open(os.path.join(workdir, "student/distill/metrics.jsonl"))]
  train_rows = [r for r in rows if "train_kl" in r]
  assert train_rows and all(np.isfinite(r["train_loss"]) and r["train_kl"] >= 0 for r in train_rows)
  assert os.path.isdir(os.path.join(workdir, "student/distill/best"))
