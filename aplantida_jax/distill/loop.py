"""Stage "distill": the student learns from the teacher ensemble with the shared train loop.

Only the `steps.Task` differs from teacher training; pipeline, sharding, orbax
checkpoints (resume included), metrics and evaluation are train/loop.py's.

  distill.mode = "precomputed"  targets are soft_labels/ rows joined to each
                                crop in the Grain workers (sha256-checked).
                                When soft_labels replayed the train split
                                (meta.json "replay"), row (e % E) * N + j is
                                the teachers' view of the very crop the
                                student draws at view position j in epoch e
                                ("consistent teaching", Beyer et al. 2022,
                                precomputed as in TinyViT); epochs ≥ E reuse
                                the crops of epoch e % E. The student's
                                config.seed, input.crop_scale/crop_ratio/
                                color_jitter and view (input.sampling,
                                region_filter) must equal the recorded ones:
                                a difference is refused, not overridden, so
                                that flags and config.json say which crops
                                the run trained on. Centre-view sets
                                (replay_epochs=0) still work, with a warning.
  distill.mode = "online"       the teachers run inside the jitted step on the
                                student's own augmented crop; costs a teacher
                                forward pass per teacher per step
Both minimise losses.kd_loss against a top-k + remaining-mass target.
"""

import json
import os

import jax
import jax.numpy as jnp
from absl import logging

from aplantida_jax import workdir as workdir_lib
from aplantida_jax.distill import losses
from aplantida_jax.distill import soft_labels
from aplantida_jax.train import augment
from aplantida_jax.train import loop as train_loop
from aplantida_jax.train import steps

MODES = ("precomputed", "online")
# (student config field, meta.json "replay" key, soft_labels config field): what the replayed
# crops depend on.
CROP_FIELDS = (
  ("seed", "seed", "seed"),
  ("input.crop_scale", "crop_scale", "replay.crop_scale"),
  ("input.crop_ratio", "crop_ratio", "replay.crop_ratio"),
  ("input.color_jitter", "color_jitter", "replay.color_jitter"),
  ("input.sampling", "sampling", "replay.sampling"),
  ("input.region_filter", "region_filter", "replay.region_filter"),
)


def kd_objective(distill_config, label_smoothing):
  """(logits, batch, target) → (mean loss, metrics) of the KD loss."""

  def objective(logits, labels, target):
    probs, classes, rest = target
    loss, kl, ce = losses.kd_loss(
      logits,
      labels,
      probs,
      classes,
      rest,
      alpha=distill_config.alpha,
      temperature=distill_config.temperature,
      label_smoothing=label_smoothing,
    )
    return loss.mean(), {
      "top1": steps.topk_correct(logits, labels, 1).mean(),
      "kl": kl.mean(),
      "ce": ce.mean(),
      "teacher_agree": steps.top1_agrees(logits, classes[:, 0]).mean(),
    }

  return objective


def precomputed_task(config, join_fn) -> steps.Task:
  """KD against soft_labels/ rows joined to each crop (see soft_labels.SoftLabelJoin)."""
  objective = kd_objective(config.distill, config.optimizer.label_smoothing)

  def loss_fn(apply_fn, variables, batch, rng, aux):
    del aux
    logits, batch_stats = steps.forward(apply_fn, variables, batch["image"], rng)
    target = (batch["teacher_probs"], batch["teacher_classes"], batch["teacher_rest"])
    loss, metrics = objective(logits, batch["label"], target)
    return loss, (batch_stats, metrics)

  return steps.Task(loss_fn=loss_fn, join_fn=join_fn)


def online_task(config, teachers) -> steps.Task:
  """KD against the teachers run on the student's augmented crop inside the step."""
  d = config.distill
  objective = kd_objective(d, config.optimizer.label_smoothing)

  def loss_fn(apply_fn, variables, batch, rng, aux):
    images = batch["image"]
    probs = []
    for teacher, teacher_vars in zip(teachers, aux):
      size = teacher.image_size
      crop = (
        images
        if images.shape[1] == size
        else jax.image.resize(
          images.astype(jnp.float32), images.shape[:1] + (size, size, 3), "bilinear"
        )
      )
      probs.append(soft_labels.teacher_probs(teacher, teacher_vars, crop, d.temperature))
    mixed = jax.lax.stop_gradient(soft_labels.mix(probs, batch["teacher_weights"]))
    logits, batch_stats = steps.forward(apply_fn, variables, images, rng)
    loss, metrics = objective(logits, batch["label"], losses.sparse_target(mixed, d.top_k))
    return loss, (batch_stats, metrics)

  return steps.Task(
    loss_fn=loss_fn,
    join_fn=soft_labels.TeacherWeights.of(teachers),
    aux=[t.variables for t in teachers],
  )


def _flag_value(like, value) -> str:
  """`value` written as a --config flag parses it for a field that holds `like`."""
  if isinstance(like, tuple):
    return repr(tuple(value))
  return value if isinstance(like, str) else json.dumps(value)


def check_crops(config, meta, soft_labels_dir):
  """Refuses a student whose crops are not the ones the soft labels' train rows describe."""
  replay = meta.get("replay")
  if not replay or replay["split"] != config.train_split:
    logging.warning(
      "soft labels in %s describe the teachers' centre view of each %s record, not the "
      "student's crops (input.crop_scale=%s): wide crops learn targets for what they do not "
      "show. Re-run soft_labels with --config.replay_epochs=16 for targets of the crops.",
      soft_labels_dir,
      config.train_split,
      tuple(config.input.crop_scale),
    )
    return
  if replay.get("recipe") != augment.VERSION:
    raise ValueError(
      f"the soft labels in {soft_labels_dir} hold the teachers' view of crops made by "
      f"augmentation recipe {replay.get('recipe', 'before recipes were recorded')!r}, this "
      f"code makes {augment.VERSION!r}: re-run soft_labels (its finished chunks are stale)."
    )
  for field, key, soft_field in CROP_FIELDS:
    value = config
    for part in field.split("."):
      value = value[part]
    if json.loads(json.dumps(value)) != replay[key]:  # tuples → lists, as meta.json holds them
      theirs = _flag_value(value, replay[key])
      raise ValueError(
        f"config.{field}={_flag_value(value, value)} but the soft labels in {soft_labels_dir} "
        f"hold the teachers' view of crops made with {key}={theirs}: set "
        f"--config.{field}='{theirs}', or re-run soft_labels with "
        f"--config.{soft_field}='{_flag_value(value, value)}'."
      )
  logging.info(
    "precomputed targets of the student's own crops: %d epochs × %d positions replayed",
    replay["epochs"],
    replay["num_positions"],
  )


def build_task(config, workdir) -> steps.Task:
  d = config.distill
  dataset_dir = os.path.join(workdir, config.dataset_dir)
  if d.mode == "precomputed":
    soft_dir = os.path.join(workdir, d.soft_labels_dir)
    join_fn, meta = soft_labels.open_split(soft_dir, dataset_dir, config.train_split)
    if meta["temperature"] != d.temperature:
      raise ValueError(
        f"config.distill.temperature={d.temperature} but the soft labels were "
        f"made at T={meta['temperature']}: set distill.temperature to it or "
        "re-run soft_labels with --config.temperature."
      )
    check_crops(config, meta, soft_dir)
    return precomputed_task(config, join_fn)
  if d.mode == "online":
    num_classes = len(workdir_lib.read_classes(dataset_dir))
    return online_task(config, soft_labels.load_teachers(d, workdir, num_classes))
  raise ValueError(f"Unknown config.distill.mode={d.mode!r}; choose one of {MODES}.")


def run(config, workdir) -> dict:
  """Stage entry for "distill": trains config.output_dir (default student/distill)."""
  return train_loop.train_and_evaluate(config, workdir, task=build_task(config, workdir))
