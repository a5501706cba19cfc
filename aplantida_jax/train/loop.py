"""The one training loop: teachers, fine-tuning and (via a Task) distillation.

`train_and_evaluate(config, workdir, task=...)` owns the pipeline, sharding,
checkpoints, metrics and evaluation; a `steps.Task` says what is minimised
and which extra per-record fields the batches carry. Rerunning the same
command resumes from the latest checkpoint, Grain iterator included, so a
killed run continues with exactly the batches it would have seen.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from aplantida_jax import errors
from aplantida_jax import fileio
from aplantida_jax import models
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.evaluation import evaluators
from aplantida_jax.models import pretrained
from aplantida_jax.train import augment as augment_lib
from aplantida_jax.train import checkpointing
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import sharding
from aplantida_jax.train import state as state_lib
from aplantida_jax.train import steps


def resolve_config(config, num_classes):
  """The config as trained: num_classes from the dataset, init_from only if it exists.

  config.json must say what really happened: the license checker judges a
  stage by the weights it started from.
  """
  resolved = ml_collections.ConfigDict(config.to_dict())
  if resolved.model.num_classes and resolved.model.num_classes != num_classes:
    raise ValueError(
      f"config.model.num_classes={resolved.model.num_classes} but the dataset has "
      f"{num_classes} classes; set it to 0 (= from dataset/classes.json)."
    )
  resolved.model.num_classes = num_classes
  if resolved.model.init_from and not os.path.isdir(resolved.model.init_from):
    logging.warning(
      "config.model.init_from=%s does not exist: training %s FROM SCRATCH. "
      "Import weights with tools/import_pretrained.py --out %s to start from "
      "ImageNet.",
      resolved.model.init_from,
      resolved.model.name,
      resolved.model.init_from,
    )
    resolved.model.init_from = ""
  return resolved


def inherit_from_stage(config, workdir):
  """The config with the upstream network filled in when it starts from a stage.

  A stage-to-stage start (config.init_from_stage: fine-tune, regional teacher) trains the
  network the upstream stage recorded in its config.json: model.name and model.kwargs come
  from there (a config value that disagrees is an error naming both), and input.image_size
  too unless the config sets one (> 0; resolution is not part of the weights).
  """
  if not config.init_from_stage:
    return config
  upstream = workdir_lib.TrainedStage(os.path.join(workdir, config.init_from_stage)).config
  c = ml_collections.ConfigDict(config.to_dict())
  given = {"name": c.model.name, **{f"kwargs.{k}": v for k, v in c.model.kwargs.items()}}
  recorded = {
    "name": upstream.model.name,
    **{f"kwargs.{k}": v for k, v in upstream.model.kwargs.items()},
  }
  differ = [
    f"model.{k}={v!r} (recorded: {recorded.get(k)!r})"
    for k, v in given.items()
    if v not in ("", None) and recorded.get(k) != v
  ]
  if differ:
    raise ValueError(
      f"{c.output_dir} starts from {c.init_from_stage}/, which trained another network: "
      f"{', '.join(differ)}. The network comes from {c.init_from_stage}/config.json; drop "
      f"these overrides, or retrain {c.init_from_stage} with them."
    )
  c.model.name = upstream.model.name
  c.model.kwargs = upstream.model.kwargs
  c.input.image_size = c.input.image_size or upstream.input.image_size
  return c


def initial_variables(config, model, workdir, rng):
  """Random init, then overwritten by the previous stage's best or imported weights.

  From a stage every tensor must fit (the head included: same classes, same head_dim);
  from ImageNet weights the head is replaced.
  """
  variables = models.init_variables(model, {"params": rng, "dropout": rng}, config.input.image_size)
  if config.init_from_stage:
    source = os.path.join(workdir, config.init_from_stage)
    every_module = tuple({name for collection in variables.values() for name in collection})
    merged, skipped = pretrained.merge_pretrained(
      variables, checkpointing.load_variables(source, "best"), replaceable=every_module
    )
    if skipped:
      raise ValueError(
        f"{source}'s best checkpoint does not fit {config.output_dir}'s network: "
        f"{len(skipped)} tensors differ (e.g. {skipped[:3]}). A stage starts from another "
        "with the same model, kwargs and classes (retrain the upstream stage on this "
        "dataset)."
      )
    logging.info("initialised from %s (every tensor)", source)
    return merged
  if not config.model.init_from:  # resolve_config kept it only if it exists
    return variables
  loaded, provenance = pretrained.load_pretrained(config.model.init_from)
  logging.info("pretrained weights: %s", json.dumps(provenance))
  merged, skipped = pretrained.merge_pretrained(variables, loaded)
  logging.info("initialised from %s; kept fresh: %s", config.model.init_from, skipped or "nothing")
  return merged


class MetricsLog:
  """<stage>/metrics.jsonl, one row per write, plus clu's TensorBoard (+ log) writer if asked."""

  def __init__(self, stage_dir, tensorboard, start_step):
    self.is_main = jax.process_index() == 0
    self.writer = None
    if tensorboard and self.is_main:
      # clu's writers import TensorFlow: only for TensorBoard, so other runs, this module's
      # steps and tools/gpu_check.sh (no TF there) skip it.
      from clu import metric_writers  # pylint: disable=g-import-not-at-top

      self.writer = metric_writers.create_default_writer(stage_dir, asynchronous=False)
    self.path = os.path.join(stage_dir, workdir_lib.METRICS_FILE)
    if self.is_main and os.path.exists(self.path):
      self._drop_rows_after(start_step)

  def _drop_rows_after(self, step):
    """A resumed run redoes the steps after its checkpoint: forget their old rows."""
    with open(self.path) as f:
      rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    fileio.write_text(self.path, "".join(rows))

  def write(self, step, scalars):
    scalars = {k: float(v) for k, v in scalars.items()}
    if self.writer is not None:
      self.writer.write_scalars(step, scalars)
    if self.is_main:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")

  def close(self):
    if self.writer is not None:
      self.writer.close()


def _check_batch_config(config, mesh):
  accum = config.optimizer.grad_accum_steps
  if config.batch_size % accum:
    raise ValueError(
      f"config.batch_size={config.batch_size} is not a multiple of "
      f"config.optimizer.grad_accum_steps={accum}."
    )
  return sharding.process_batch_size(config.batch_size // accum, mesh)


def train_and_evaluate(config, workdir, *, task=None) -> dict:
  """Trains config.output_dir under workdir (resuming if it has checkpoints); returns a summary."""
  sharding.maybe_initialize_distributed(config.mesh)
  stage_dir = os.path.join(workdir, config.output_dir)
  dataset_dir = os.path.join(workdir, config.dataset_dir)
  os.makedirs(stage_dir, exist_ok=True)
  config = resolve_config(
    inherit_from_stage(config, workdir), len(workdir_lib.read_classes(dataset_dir))
  )
  if jax.process_index() == 0:
    fileio.write_json(os.path.join(stage_dir, workdir_lib.CONFIG_FILE), config.to_dict())
  task = task or steps.classification_task(config.optimizer.label_smoothing)
  mesh = sharding.create_mesh()
  accum = config.optimizer.grad_accum_steps
  micro_batch = _check_batch_config(config, mesh)
  evals = evaluators.build(config, workdir, dataset_dir, mesh)

  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  model = models.from_config(config.model)
  variables = initial_variables(config, model, workdir, init_rng)
  state = state_lib.create_train_state(
    model, variables, config.optimizer, config.batch_size, config.num_train_steps
  )
  replicated = sharding.replicated(mesh)
  state = jax.device_put(state, replicated)
  train_rng, aux = jax.device_put((train_rng, task.aux), replicated)

  loader = input_pipeline.train_loader(
    config,
    dataset_dir,
    micro_batch,
    num_samples=config.num_train_steps * config.batch_size,
    join_fn=task.join_fn,
  )
  train_iter = input_pipeline.DevicePrefetch(
    iter(loader), functools.partial(sharding.global_batch, mesh), config.input.device_prefetch
  )
  checkpoints = checkpointing.StageCheckpoints(stage_dir, config.checkpoint)
  state, train_iter = checkpoints.restore_latest(state, train_iter)
  start_step = int(state.step) // accum
  if start_step:
    logging.info("resumed %s at step %d", stage_dir, start_step)

  train_step = jax.jit(
    functools.partial(
      steps.train_step,
      loss_fn=task.loss_fn,
      augment=augment_lib.Augment.of(config.input, config.seed),
    ),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  log = MetricsLog(stage_dir, config.tensorboard, start_step)
  try:
    eval_metrics = _train(
      config,
      state,
      train_iter,
      train_step,
      train_rng,
      aux,
      checkpoints,
      log,
      mesh,
      evals,
      start_step,
    )
  finally:  # also on errors: never leave a half-written async checkpoint behind
    checkpoints.close()
    log.close()
  best = {"metric": checkpoints.best_metric, "value": checkpoints.best_value}
  return {
    "metric": f"{headline(eval_metrics)} (best {best['metric']} {best['value']:.3f})",
    "steps": config.num_train_steps,
    "final": eval_metrics,
    "best": best,
    "stage_dir": stage_dir,
  }


def headline(eval_metrics):
  """The console's line for the final evaluation: each evaluator's top-1 and top-1 agreement."""
  return ", ".join(
    f"{k} {v:.3f}" for k, v in eval_metrics.items() if k.endswith(("top1", "top1_agree"))
  )


def _train(
  config, state, train_iter, train_step, train_rng, aux, checkpoints, log, mesh, evals, start_step
):
  """Steps start_step+1..num_train_steps with logging, eval and checkpoints; final eval metrics."""
  accum = config.optimizer.grad_accum_steps
  schedule = state_lib.learning_rate_schedule(
    config.optimizer, config.batch_size, config.num_train_steps
  )
  eval_metrics = None
  window, window_steps, timer = None, 0, None
  for step in range(start_step + 1, config.num_train_steps + 1):
    for _ in range(accum):
      state, metrics = train_step(state, next(train_iter), train_rng, aux)
      window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
    window_steps += 1
    if timer is None:  # throughput and ETA exclude compilation
      jax.block_until_ready(state)
      timer, timed_steps = time.time(), 0
    else:
      timed_steps += 1
    last = step == config.num_train_steps
    log_due = step % config.log_every_steps == 0 or last
    eval_due = any(evaluator.due(step, last) for evaluator in evals.values())
    save_due = step % config.checkpoint.every_steps == 0 or last
    if log_due or eval_due or save_due:  # never evaluate or save a diverged state
      means = {k: float(v) / (window_steps * accum) for k, v in jax.device_get(window).items()}
      check_finite(means, step, float(schedule(step - 1)), checkpoints)
    if log_due:
      elapsed = max(time.time() - timer, 1e-9)
      images_per_s = timed_steps * config.batch_size / elapsed
      eta = (
        time.strftime(
          "%H:%M:%S", time.gmtime((config.num_train_steps - step) * elapsed / timed_steps)
        )
        if timed_steps
        else "?"
      )
      logging.info(
        "step %d/%d  loss %.4f  top1 %.3f  %.1f images/s  ETA %s",
        step,
        config.num_train_steps,
        means["loss"],
        means.get("top1", float("nan")),
        images_per_s,
        eta,
      )
      log.write(
        step,
        {
          **{f"train_{k}": v for k, v in means.items()},
          "learning_rate": schedule(step - 1),
          "images_per_s": images_per_s,
        },
      )
      window, window_steps, timer, timed_steps = None, 0, time.time(), 0
    if eval_due:
      eval_metrics = evaluators.run_due(evals, state, step, last)
      logging.info("eval step %d: %s", step, eval_metrics)
      log.write(step, eval_metrics)
      if checkpoints.best_metric in eval_metrics:
        checkpoints.maybe_save_best(step, state, eval_metrics)
    if save_due:
      checkpoints.save(step, state, train_iter)
    if eval_due or save_due:
      timer, timed_steps = time.time(), 0  # keep eval and saving out of images/s
  if eval_metrics is None:  # nothing left to train: the run was already complete
    eval_metrics = evaluators.run_due(evals, state, config.num_train_steps, last=True)
  return eval_metrics


def check_finite(means, step, learning_rate, checkpoints):
  """Raises errors.DivergedError when the window's loss or norms are NaN/inf."""
  bad = {
    k: v
    for k, v in means.items()
    if k in ("loss", "grad_norm", "param_norm") and not np.isfinite(v)
  }
  if not bad:
    return
  latest = checkpoints.latest.latest_step()
  saved = (
    f"the latest checkpoint is step {latest} (the rerun resumes there)"
    if latest
    else "no checkpoint was saved"
  )
  raise errors.DivergedError(
    f"training diverged: {', '.join(f'{k} {v}' for k, v in bad.items())} in the steps up to "
    f"{step} (learning rate {learning_rate:.3g}); {saved}. Lower "
    "--config.optimizer.learning_rate (or raise warmup_steps) and rerun; delete the stage "
    "folder to start over."
  )


def run(config, workdir) -> dict:
  """Stage entry for "train" (teachers) and "finetune": hard-label classification."""
  return train_and_evaluate(config, workdir)
