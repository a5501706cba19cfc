"""Distillation: KD loss, soft-label stage, crop replay, alignment, refusal, resume, both modes.

The stages run as users run them (`python -m aplantida_jax.main`) on a tiny
dataset with two untrained teachers (32 px, the student's size), sharing a
persistent XLA compilation cache so that each program is compiled once per
session. The soft labels replay 2 epochs of the :demo student's crops.

Models are pinned, whatever runs/pretrained/ holds (the :demo configs start
EfficientNet-Lite0 from ImageNet there, lower blocks frozen): the teachers are
helpers.SLIM_LITE0 and the student MobileNetV2-0.35, both from scratch, the
same in every subprocess and config object so that programs compile once.
"""

import hashlib
import itertools
import json
import os
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import shards
from aplantida_jax.distill import loop as distill_loop
from aplantida_jax.distill import losses
from aplantida_jax.distill import soft_labels
from aplantida_jax.models import preprocess
from aplantida_jax.train import augment
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import loop
from aplantida_jax.train import state as state_lib
from configs import soft_labels as soft_labels_config
from configs import student_distill
from configs import teacher_global
from tests import helpers
from tests.tiny_dataset import write_tiny_dataset

NUM_CLASSES = 4
TOP_K = 2
SIZE = 32
COMMON = [
  f"--config.input.image_size={SIZE}",
  "--config.batch_size=8",
  "--config.eval_batch_size=8",
]
EPOCHS = 2  # replayed
TRAIN, VAL = 6 * NUM_CLASSES, 3 * NUM_CLASSES
SOFT = [
  "--config.batch_size=8",
  "--config.chunk_size=16",
  f"--config.top_k={TOP_K}",
  f"--config.replay_epochs={EPOCHS}",
]
# The old :demo student, from scratch: the same flags for distill and finetune, so that
# finetune loads the distilled weights one to one.
STUDENT_MODEL = ("mobilenet_v2", {"width": 0.35, "dropout_rate": 0.1})
STUDENT = helpers.model_overrides(*STUDENT_MODEL)


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
  loss, kl, ce = losses.kd_loss(
    jnp.asarray(student),
    jnp.asarray(labels),
    jnp.asarray(probs),
    jnp.asarray(classes),
    jnp.asarray(rest),
    alpha=alpha,
    temperature=t,
  )
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


def _teacher_config():
  """The :demo teacher as a slim Lite0 from scratch (not runs/pretrained/'s), at SIZE px."""
  config = helpers.use_model(teacher_global.get_config("demo"))
  config.input.image_size = SIZE
  return loop.resolve_config(config, NUM_CLASSES)


def _normalized(images):
  return np.asarray(
    (images / 255.0 - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD, np.float32
  )


def _save_teacher(workdir, name, seed, diverged=False):
  """An untrained slim Lite0 teacher (config.json + real orbax best checkpoint).

  Its batch-norm statistics are those of the train images: with the initial ones (mean 0,
  variance 1) the random network's eval-mode signal vanishes with depth, and its logits
  would not depend on the image (nor on the crop) at all.
  """
  config = _teacher_config()
  config.output_dir = name
  model = models.from_config(config.model)
  variables = loop.initial_variables(config, model, workdir, jax.random.PRNGKey(seed))
  batch = next(input_pipeline.eval_batches(_input(), os.path.join(workdir, "dataset"), "train", 64))
  # One train-mode pass at momentum 0, without dropout: running stats = this batch's.
  calibrate = model.clone(bn_momentum=0.0, dropout_rate=0.0, drop_path_rate=0.0)
  _, updates = calibrate.apply(
    variables, _normalized(batch["image"][batch["mask"] > 0]), train=True, mutable=["batch_stats"]
  )
  variables = {**variables, "batch_stats": updates["batch_stats"]}
  # Untrained logits are nearly equal; spread them so each teacher has a clear ranking.
  head = variables["params"]["head"]["logits"]
  head["kernel"] = head["kernel"] * 20.0
  head["bias"] = jnp.asarray(np.random.default_rng(seed).normal(0, 2, NUM_CLASSES), jnp.float32)
  if diverged:  # as a run whose loss went NaN would have left it
    head["bias"] = jnp.full(NUM_CLASSES, jnp.nan, jnp.float32)
  stage_dir = os.path.join(workdir, name)
  os.makedirs(stage_dir)
  fileio.write_json(os.path.join(stage_dir, workdir_lib.CONFIG_FILE), config.to_dict())
  state = state_lib.create_train_state(model, variables, config.optimizer, 8, 10)
  ckpt = checkpointing.StageCheckpoints(stage_dir, config.checkpoint)
  ckpt.maybe_save_best(1, state, {"val_top1": 0.5})
  ckpt.close()


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  return {
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cache_env):
  """Workdir with dataset, two teachers and soft labels from the real stage (CLI)."""
  workdir = str(tmp_path_factory.mktemp("distill"))
  write_tiny_dataset(
    os.path.join(workdir, "dataset"),
    num_classes=NUM_CLASSES,
    per_class={"train": 6, "val": 3},
    size=SIZE,
  )
  _save_teacher(workdir, "teacher_global", 1)
  _save_teacher(workdir, "teacher_regional", 2)
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *SOFT, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _copy(workdir, tmp_path, name="w"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def _stored(workdir, split):
  return {
    a: np.load(os.path.join(workdir, "soft_labels", split, f"{a}.npy")) for a in soft_labels.ARRAYS
  }


def _numpy_ensemble(workdir, images, regions):
  """Each teacher on `images` (0..255 RGB), regional teacher ×4 on ES images (weights 1, 0.5).

  → (weighted mix, plain mean) of the tempered probabilities."""
  probs = []
  for name in ("teacher_global", "teacher_regional"):
    model = models.from_config(_teacher_config().model)
    variables = checkpointing.load_variables(os.path.join(workdir, name))
    logits = model.apply(variables, _normalized(images), train=False)
    probs.append(_softmax(np.asarray(logits, np.float64) / 3.0))
  in_spain = np.array([r == ["ES"] for r in regions])
  assert 0 < in_spain.sum() < len(in_spain)
  w_regional = np.where(in_spain, 0.5 * 4.0, 0.5)[:, None]
  return (probs[0] + w_regional * probs[1]) / (1.0 + w_regional), (probs[0] + probs[1]) / 2


def _assert_stored_top_k(stored, mixed):
  want_classes = np.argsort(-mixed, -1)[:, :TOP_K]
  want_probs = np.take_along_axis(mixed, want_classes, -1)
  np.testing.assert_allclose(stored["probs"], want_probs, atol=2e-3)
  np.testing.assert_allclose(stored["rest"], 1 - want_probs.sum(-1), atol=2e-3)
  ranked = np.sort(mixed, -1)[:, ::-1]
  clear = np.all(ranked[:, :TOP_K] - ranked[:, 1 : TOP_K + 1] > 1e-3, -1)  # no near-tie
  assert clear.mean() > 0.8
  np.testing.assert_array_equal(stored["classes"][clear], want_classes[clear])


def _student_config(**inputs):
  """The :demo student at the tiny size: its seed and crops are the replayed ones."""
  config = helpers.use_model(student_distill.get_config("demo"), *STUDENT_MODEL)  # = STUDENT
  config.input.image_size = SIZE
  config.input.worker_count = 0
  config.input.read_threads = 2
  config.input.update(inputs)
  return config


def _distill_batches(workdir, n, config=None):
  """`n` batches of 8 from the distill stage's own train loader and join."""
  config = config or _student_config()
  task = distill_loop.build_task(config, workdir)
  loader = input_pipeline.train_loader(
    config, os.path.join(workdir, "dataset"), 8, num_samples=8 * n, join_fn=task.join_fn
  )
  return list(itertools.islice(iter(loader), n))


def test_soft_labels_match_a_numpy_recomputation_of_the_weighted_ensemble(labelled):
  meta = json.load(open(os.path.join(labelled, "soft_labels", "meta.json")))
  assert [t["dir"] for t in meta["teachers"]] == ["teacher_global", "teacher_regional"]
  assert meta["counts"] == {"train": EPOCHS * TRAIN, "val": VAL}
  assert meta["temperature"] == 3.0 and meta["top_k"] == TOP_K
  replay = soft_labels_config.replay_config(demo=True)
  assert meta["replay"] == {
    "split": "train",
    "epochs": EPOCHS,
    "num_positions": TRAIN,
    "seed": 0,
    "crop_scale": list(replay.crop_scale),
    "crop_ratio": list(replay.crop_ratio),
    "color_jitter": replay.color_jitter,
    "sampling": "uniform",
    "region_filter": [],
    "view_sha256": hashlib.sha256(np.arange(TRAIN, dtype=np.int64).tobytes()).hexdigest(),
    "recipe": augment.VERSION,
  }
  assert not os.path.exists(os.path.join(labelled, "soft_labels", "chunks"))
  dataset_dir = os.path.join(labelled, "dataset")

  # val: each teacher on the eval crop.
  stored = _stored(labelled, "val")
  assert stored["probs"].dtype == np.float16 and stored["classes"].dtype == np.int16
  batch = next(input_pipeline.eval_batches(_input(), dataset_dir, "val", 64))
  mixed, plain = _numpy_ensemble(
    labelled,
    batch["image"][batch["mask"] > 0],
    input_pipeline.read_metadata(dataset_dir, "val")["regions"],
  )
  _assert_stored_top_k(stored, mixed)
  # The per-image weights matter: the plain mean of the two teachers is not what was stored.
  assert not np.allclose(stored["probs"], np.sort(plain, -1)[:, ::-1][:, :TOP_K], atol=2e-3)

  # train: each teacher on the very view the student's step sees (teachers and student are
  # both 32 px here: the loader's crop, flipped and jittered as the train step does), two
  # shuffled epochs; row epoch * N + position.
  batches = _distill_batches(labelled, EPOCHS * TRAIN // 8)
  epoch, position, index = (
    np.concatenate([b[k] for b in batches]) for k in ("epoch", "position", "index")
  )
  rows = epoch * TRAIN + position
  assert sorted(rows) == list(range(EPOCHS * TRAIN)) and list(rows) != sorted(rows)
  metadata = input_pipeline.read_metadata(dataset_dir, "train")
  student = _student_config()
  views = augment.Augment.of(student.input, student.seed).flip_jitter(
    np.concatenate([b["image"] for b in batches]), epoch, position
  )
  mixed, _ = _numpy_ensemble(labelled, np.asarray(views), [metadata["regions"][i] for i in index])
  # The record sha256 is stored once per view position (here position = record), not per row.
  sha256 = _stored(labelled, "train")["sha256"]
  assert sha256.shape == (TRAIN, 32) and sha256.dtype == np.uint8
  assert [h.tobytes().hex() for h in sha256] == metadata["sha256"]
  stored = {a: v[rows] for a, v in _stored(labelled, "train").items() if a != "sha256"}
  _assert_stored_top_k(stored, mixed)
  np.testing.assert_array_equal(
    np.concatenate([b["teacher_classes"] for b in batches]), stored["classes"]
  )
  # The two epochs' crops differ, and so do their targets.
  first, second = (_stored(labelled, "train")["probs"][e * TRAIN : (e + 1) * TRAIN] for e in (0, 1))
  assert not np.allclose(first, second, atol=2e-3)


def _input():
  from configs import training  # pylint: disable=g-import-not-at-top

  config = training.input_config(SIZE)
  config.worker_count = 0
  return config


class _EchoJoin(soft_labels.SoftLabelJoin):
  """The real join plus the record's own sha256, so the test can check alignment."""

  def __call__(self, index, epoch, position, record):
    return {
      **super().__call__(index, epoch, position, record),
      "record_sha": np.frombuffer(bytes.fromhex(record["sha256"]), np.uint8),
    }


def _joined_batches(workdir, shard_index, join, num_epochs=1):
  """This shard's batches (of 5) with the student's crops, replay-wrapped like train_loader's."""
  dataset_dir = os.path.join(workdir, "dataset")
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, "train"), epoch_keys=True)
  sampler = input_pipeline.EpochIndexSampler(
    num_records=source.num_positions,
    shard_options=grain.sharding.ShardOptions(shard_index, 2),
    shuffle=True,
    num_epochs=num_epochs,
    seed=7,
  )
  inp = _student_config().input
  transform = input_pipeline.TrainTransform(
    SIZE, augment.Augment.of(inp, 0), join, crop_epochs=join.crop_epochs
  )
  return grain.DataLoader(
    data_source=source, sampler=sampler, operations=[transform, grain.transforms.Batch(5)]
  )


def test_soft_labels_stay_aligned_under_sharding_and_shuffling(labelled):
  join, _ = soft_labels.open_split(
    os.path.join(labelled, "soft_labels"), os.path.join(labelled, "dataset"), "train"
  )
  assert (join.crop_epochs, join.num_positions) == (EPOCHS, TRAIN)
  stored = _stored(labelled, "train")
  seen, crops = [], {}
  for shard_index in (0, 1):
    # 3 epochs of this shard: the third reuses the first's crops and rows (epoch % 2).
    for batch in _joined_batches(
      labelled, shard_index, _EchoJoin(join.split_dir, EPOCHS, TRAIN), num_epochs=3
    ):
      for j, sha in enumerate(batch["record_sha"]):
        epoch, position = int(batch["epoch"][j]), int(batch["position"][j])
        row = (epoch % EPOCHS) * TRAIN + position
        assert stored["sha256"][position].tobytes() == sha.tobytes()  # one entry per position
        assert position == batch["index"][j]
        np.testing.assert_array_equal(batch["teacher_classes"][j], stored["classes"][row])
        np.testing.assert_array_equal(batch["teacher_probs"][j], stored["probs"][row])
        crops.setdefault(row, []).append(batch["image"][j])
        seen.append((epoch, row))
  assert sorted(r for e, r in seen if e < EPOCHS) == list(range(EPOCHS * TRAIN))  # all, once
  assert sorted(r for e, r in seen if e == EPOCHS) == list(range(TRAIN))  # epoch 2 → epoch 0
  assert [r for _, r in seen] != sorted(r for _, r in seen)  # shuffled
  for images in crops.values():
    for image in images[1:]:
      np.testing.assert_array_equal(image, images[0])  # a row's crop, whichever epoch drew it


def test_replayed_crops_are_the_pixels_the_student_loader_yields(tmp_path):
  """The stage's replay redraws the train loader's crops: same uint8 pixels, 2 shuffled epochs.

  96 px photos for a 32 px student, so the wide crops shrink up to 3x.
  """
  dataset_dir = str(tmp_path / "dataset")
  write_tiny_dataset(dataset_dir, num_classes=3, per_class={"train": 4}, size=96)
  replay_config = soft_labels_config.get_config("demo")
  replay_config.replay_epochs = EPOCHS
  replay, view = soft_labels.replay_spec(replay_config, dataset_dir)
  assert view is None and replay["num_positions"] == 12
  source = input_pipeline.RecordSource(shards.shard_paths(dataset_dir, "train"), view)
  views = soft_labels.TeacherViews(
    [(SIZE, 0.875)],
    soft_labels.TeacherWeights([1.0], [()], [1.0]),
    replay=augment.Augment.of(replay_config.replay, replay_config.seed),
  )
  replayed = {}
  chunk_loader = soft_labels._chunk_loader  # pylint: disable=protected-access  # the stage's
  for batch in chunk_loader(replay_config, source, 0, EPOCHS * 12, views, 5):
    for e, j, image in zip(
      batch["epoch"], batch["position"], batch[soft_labels.view_key(SIZE, 0.875, 0)]
    ):
      replayed[int(e), int(j)] = image
  assert len(replayed) == EPOCHS * 12
  loader = input_pipeline.train_loader(_student_config(), dataset_dir, 4, num_samples=EPOCHS * 12)
  drawn = list(itertools.islice(iter(loader), EPOCHS * 3))
  order = [int(i) for b in drawn for i in b["index"]]
  assert sorted(order[:12]) == sorted(order[12:]) and order[:12] != order[12:]  # reshuffled
  for batch in drawn:
    for e, j, image in zip(batch["epoch"], batch["position"], batch["image"]):
      np.testing.assert_array_equal(image, replayed[int(e), int(j)])
  assert not np.array_equal(replayed[0, 0], replayed[1, 0])


def test_a_student_with_other_crops_seed_or_view_is_refused(labelled):
  task = distill_loop.build_task(_student_config(), labelled)
  assert task.join_fn.crop_epochs == EPOCHS
  for field, change, message in (
    ("crop_scale", {"crop_scale": (0.08, 1.0)}, "config.input.crop_scale=(0.08, 1.0)"),
    ("crop_ratio", {"crop_ratio": (1.0, 1.0)}, "config.input.crop_ratio"),
    ("color_jitter", {"color_jitter": 0.0}, "config.input.color_jitter"),
    ("region_filter", {"region_filter": ["ES"]}, "config.input.region_filter"),
    ("sampling", {"sampling": "class_balanced"}, "config.input.sampling"),
  ):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
      distill_loop.build_task(_student_config(**change), labelled)
    assert f"--config.replay.{field}=" in str(error.value)
  config = _student_config()
  config.seed = 1
  with pytest.raises(
    ValueError, match=r"config.seed=1 but .* seed=0: set --config.seed='0'"
  ) as error:
    distill_loop.build_task(config, labelled)
  assert "re-run soft_labels with --config.seed='1'" in str(error.value)  # the stage's own seed


def test_soft_labels_of_another_augmentation_recipe_are_refused(labelled, monkeypatch):
  """Targets of crops made by other code (e.g. before flip and jitter moved on device)."""
  monkeypatch.setattr(augment, "VERSION", "another-recipe")
  with pytest.raises(ValueError, match="augmentation recipe .* re-run soft_labels"):
    distill_loop.build_task(_student_config(), labelled)


def test_sha256_is_kept_once_per_position_after_checking_every_epoch(tmp_path):
  """_write_split: E × N rows of targets, N sha256 entries; a position reading another record
  in a later epoch is a bug, refused."""
  positions = np.arange(5 * 32, dtype=np.uint8).reshape(5, 32)
  rows = np.concatenate([positions] * 3)  # 3 epochs × 5 positions, in row order
  paths = []
  for start in range(0, 15, 4):  # chunks of 4 rows, across epoch boundaries
    paths.append(str(tmp_path / f"train-{start:010d}.npz"))
    np.savez(
      paths[-1],
      probs=np.zeros((len(rows[start : start + 4]), TOP_K), np.float16),
      classes=np.zeros((len(rows[start : start + 4]), TOP_K), np.int32),
      rest=np.full(len(rows[start : start + 4]), start, np.float32),
      sha256=rows[start : start + 4],
    )
  write_split = soft_labels._write_split  # pylint: disable=protected-access
  write_split(str(tmp_path / "out"), "train", paths, 15, 5)
  assert soft_labels.stored_lengths(str(tmp_path / "out" / "train")) == (
    soft_labels.expected_lengths(15, 5)
  )
  np.testing.assert_array_equal(np.load(tmp_path / "out" / "train" / "sha256.npy"), positions)
  with np.load(paths[3]) as saved:
    bad = dict(saved)
  bad["sha256"] = bad["sha256"][::-1]  # rows 12..14 (epoch 2) read other records
  np.savez(paths[3], **bad)
  with pytest.raises(RuntimeError, match="read another record"):
    write_split(str(tmp_path / "bad"), "train", paths, 15, 5)


def test_misaligned_rows_are_refused_when_read(labelled, tmp_path):
  workdir = _copy(labelled, tmp_path)
  path = os.path.join(workdir, "soft_labels", "train", "sha256.npy")
  np.save(path, np.roll(np.load(path), 1, axis=0))
  join, _ = soft_labels.open_split(
    os.path.join(workdir, "soft_labels"), os.path.join(workdir, "dataset"), "train"
  )
  with pytest.raises(Exception, match="misaligned"):
    next(iter(_joined_batches(workdir, 0, join)))


def test_stale_or_mismatched_soft_labels_are_refused(labelled, tmp_path):
  workdir = _copy(labelled, tmp_path)
  soft_dir, dataset_dir = os.path.join(workdir, "soft_labels"), os.path.join(workdir, "dataset")
  for name, message in (
    ("probs", f"probs.npy holds {EPOCHS * TRAIN - 1} rows"),
    ("sha256", f"sha256.npy holds {TRAIN - 1} sha256 entries"),
  ):
    path = os.path.join(soft_dir, "train", f"{name}.npy")
    full = np.load(path)
    np.save(path, full[:-1])
    with pytest.raises(ValueError, match=message):
      soft_labels.open_split(soft_dir, dataset_dir, "train")
    np.save(path, full)
  soft_labels.open_split(soft_dir, dataset_dir, "train")  # restored
  manifest = os.path.join(dataset_dir, "manifest.json")
  with open(manifest, "a") as f:
    f.write("\n")
  with pytest.raises(ValueError, match="another dataset"):
    soft_labels.open_split(soft_dir, dataset_dir, "train")
  # The stage says the same, before any training.
  result = helpers.run_main("configs/student_distill.py:demo", workdir, *COMMON, *STUDENT)
  assert result.returncode != 0 and "another dataset" in result.stderr


def test_soft_labels_resume_from_finished_chunks(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  soft_dir = os.path.join(workdir, "soft_labels")
  meta = json.load(open(os.path.join(soft_dir, "meta.json")))
  chunks = os.path.join(soft_dir, "chunks")
  os.makedirs(chunks)
  with open(os.path.join(chunks, "fingerprint"), "w") as f:
    f.write(meta["fingerprint"])
  # A finished first chunk (16 rows) with marked contents: a resumed run must keep it. Chunks
  # hold a sha256 per row (here rows 0..15 = epoch 0's positions 0..15).
  first = {a: v[:16] for a, v in _stored(workdir, "train").items()}
  first["rest"] = np.full(16, 0.125, np.float32)
  np.savez(os.path.join(chunks, "train-0000000000.npz"), **first)
  os.remove(os.path.join(soft_dir, "meta.json"))  # the interrupted run never finished
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *SOFT, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  rest = np.load(os.path.join(soft_dir, "train", "rest.npy"))
  original = np.load(os.path.join(labelled, "soft_labels", "train", "rest.npy"))
  assert len(rest) == EPOCHS * TRAIN  # E × N rows, N sha256 entries
  assert np.load(os.path.join(soft_dir, "train", "sha256.npy")).shape == (TRAIN, 32)
  np.testing.assert_array_equal(rest[:16], 0.125)
  np.testing.assert_allclose(rest[16:], original[16:])
  assert json.load(open(os.path.join(soft_dir, "meta.json")))["fingerprint"] == meta["fingerprint"]
  assert "rows an image" in result.stderr  # the storage report, at the plan's scale too


def test_a_diverged_teacher_stops_soft_labels_with_one_line(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  shutil.rmtree(os.path.join(workdir, "soft_labels"))
  shutil.rmtree(os.path.join(workdir, "teacher_regional"))
  _save_teacher(workdir, "teacher_regional", 2, diverged=True)
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *SOFT, **cache_env)
  assert result.returncode == 1
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith("error: soft_labels: soft labels train: the teachers give NaN/inf")
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(workdir, "soft_labels", "meta.json"))


def test_soft_labels_killed_mid_run_resume_to_byte_identical_arrays(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  soft_dir = os.path.join(workdir, "soft_labels")
  shutil.rmtree(soft_dir)
  args = [*SOFT, "--config.chunk_size=4"]  # a dozen chunks: room to be killed between two
  proc = helpers.start_main("configs/soft_labels.py:demo", workdir, *args, **cache_env)
  first = os.path.join(soft_dir, "chunks", "train-0000000000.npz")
  assert helpers.kill_when(proc, lambda: os.path.exists(first), timeout=300, poll_s=0.01)
  assert not os.path.exists(os.path.join(soft_dir, "meta.json")), "finished before the kill"
  kept = sorted(os.listdir(os.path.join(soft_dir, "chunks")))
  result = helpers.run_main("configs/soft_labels.py:demo", workdir, *args, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train-0000000000.npz" in kept
  done = len([k for k in kept if k.startswith("train-")])
  # A resume, not a restart: the rerun starts from the chunks the killed run finished.
  assert re.search(rf"soft labels train: resuming, {done} of \d+ chunks done", result.stderr)
  # Byte for byte what the uninterrupted run (chunks of 16) stored.
  for split in ("train", "val"):
    for name in sorted(os.listdir(os.path.join(labelled, "soft_labels", split))):
      with (
        open(os.path.join(labelled, "soft_labels", split, name), "rb") as a,
        open(os.path.join(soft_dir, split, name), "rb") as b,
      ):
        assert a.read() == b.read(), f"{split}/{name}"


def test_centre_view_soft_labels_still_join_by_record(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  shutil.rmtree(os.path.join(workdir, "soft_labels"))
  result = helpers.run_main(
    "configs/soft_labels.py:demo", workdir, *SOFT, "--config.replay_epochs=0", **cache_env
  )
  assert result.returncode == 0, result.stderr[-3000:]
  meta = json.load(open(os.path.join(workdir, "soft_labels", "meta.json")))
  assert meta["replay"] is None and meta["counts"] == {"train": TRAIN, "val": VAL}
  stored = _stored(workdir, "train")
  assert stored["sha256"].shape == (TRAIN, 32)  # N rows = N positions: one entry per record
  # Centre views describe no crop: any crops are accepted (with a warning), rows are records.
  batches = _distill_batches(workdir, 6, _student_config(crop_scale=(0.08, 1.0)))
  for batch in batches:
    np.testing.assert_array_equal(batch["teacher_classes"], stored["classes"][batch["index"]])
  assert {int(e) for b in batches for e in b["epoch"]} == {0, 1}
  # The val rows are the centre view either way.
  np.testing.assert_array_equal(
    _stored(workdir, "val")["classes"], _stored(labelled, "val")["classes"]
  )


# ---------------------------------------------------------------- distillation end to end


DISTILL = (
  COMMON
  + STUDENT
  + [
    "--config.num_train_steps=16",
    "--config.checkpoint.every_steps=4",
    "--config.eval_every_steps=8",
    "--config.log_every_steps=4",
    "--config.tensorboard=False",
  ]
)


def _latest_params(workdir, stage="student/distill"):
  return checkpointing.load_variables(os.path.join(workdir, stage), "latest")


def _kill_after_first_checkpoint(workdir, cache_env):
  proc = helpers.start_main("configs/student_distill.py:demo", workdir, *DISTILL, **cache_env)
  ckpt_dir = os.path.join(workdir, "student", "distill", "checkpoints")
  helpers.kill_when(
    proc,
    lambda: os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)),
    timeout=300,
  )
  steps_done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert steps_done and max(steps_done) < 16, f"not interrupted mid-run: {steps_done}"
  return max(steps_done)


def test_precomputed_distillation_resumes_exactly_after_sigkill_then_finetunes(
  labelled, tmp_path, cache_env
):
  straight = _copy(labelled, tmp_path, "straight")
  result = helpers.run_main("configs/student_distill.py:demo", straight, *DISTILL, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert (
    "teacher_top1_agree" in summary["metric"] and 0 <= summary["final"]["teacher_top1_agree"] <= 1
  )
  rows = [
    json.loads(line) for line in open(os.path.join(straight, "student/distill/metrics.jsonl"))
  ]
  train_rows = [r for r in rows if "train_loss" in r]
  assert train_rows and all(
    {"train_kl", "train_ce", "train_teacher_agree"} <= set(r) for r in train_rows
  )

  killed = _copy(labelled, tmp_path, "killed")
  killed_at = _kill_after_first_checkpoint(killed, cache_env)
  result = helpers.run_main("configs/student_distill.py:demo", killed, *DISTILL, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  # A resume, not a restart: it says where it resumed and trains only the remaining steps.
  assert re.findall(r"resumed \S+ at step (\d+)", result.stderr) == [str(killed_at)]
  trained = [int(s) for s in re.findall(r"\bstep (\d+)/16\b", result.stderr)]
  assert trained and min(trained) > killed_at and max(trained) == 16
  a, b = _latest_params(straight), _latest_params(killed)
  jax.tree.map(np.testing.assert_array_equal, a, b)

  # Fine-tune names no network: it trains the one student/distill/config.json recorded.
  finetune = [
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.optimizer.frozen=",
    "--config.num_train_steps=4",
    "--config.eval_every_steps=4",
    "--config.tensorboard=False",
  ]
  result = helpers.run_main(
    "configs/student_finetune.py:demo",
    straight,
    *finetune,
    '--config.model.kwargs={"width": 0.5}',
    **cache_env,
  )
  assert result.returncode == 1
  assert (
    "student/finetune starts from student/distill/, which trained another network: "
    "model.kwargs.width=0.5 (recorded: 0.35)"
  ) in result.stderr
  assert not os.path.exists(os.path.join(straight, "student/finetune/checkpoints"))
  result = helpers.run_main("configs/student_finetune.py:demo", straight, *finetune, **cache_env)
  assert result.returncode == 0, result.stderr[-3000:]
  config = json.load(open(os.path.join(straight, "student/finetune/config.json")))
  assert config["init_from_stage"] == "student/distill"
  distilled = json.load(open(os.path.join(straight, "student/distill/config.json")))
  # Whatever runs/pretrained/ holds: the pinned student, from scratch, the same in both stages.
  assert config["model"] == distilled["model"]
  assert config["input"]["image_size"] == distilled["input"]["image_size"] == SIZE
  assert (distilled["model"]["name"], distilled["model"]["kwargs"]) == STUDENT_MODEL
  assert not distilled["model"]["init_from"] and not distilled["optimizer"]["frozen"]
  assert os.path.isdir(os.path.join(straight, "student/finetune/best"))


def test_online_distillation_runs_end_to_end(labelled, tmp_path, cache_env):
  workdir = _copy(labelled, tmp_path)
  shutil.rmtree(os.path.join(workdir, "soft_labels"))  # online mode needs only the teachers
  result = helpers.run_main(
    "configs/student_distill.py:demo,mode=online",
    workdir,
    *DISTILL,
    "--config.num_train_steps=4",
    "--config.distill.top_k=2",
    **cache_env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "student/distill/metrics.jsonl"))]
  train_rows = [r for r in rows if "train_kl" in r]
  assert train_rows and all(np.isfinite(r["train_loss"]) and r["train_kl"] >= 0 for r in train_rows)
  assert os.path.isdir(os.path.join(workdir, "student/distill/best"))
