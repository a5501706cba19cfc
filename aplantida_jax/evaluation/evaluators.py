"""In-loop evaluators, declared as data in `config.evals` (as big_vision's `config.evals`).

`config.evals.<name> = {"kind": ..., "split": ..., "every_steps": ..., ...}`
(configs/training.eval_config). An
evaluator runs over one split with the train state's eval variables and returns
metrics the loop logs as `<name>_<key>` (val_top1, val_spain_top1,
teacher_top1_agree); `config.checkpoint.best_metric` names one of them.
`every_steps` 0 means config.eval_every_steps; every evaluator also runs at the
last step.

Kinds (KINDS):
  classification  loss, top1, top5 and count over `split`, and for each name in
                  `regions` (keys of config.regions) <region>_top1, _top5, _count
                  (absent for a region without images in the split)
  agreement       the student against the precomputed soft labels of `split`
                  (distill/agreement.py; `soft_labels_dir`, "" = config.distill's):
                  top1_agree, top5_agree, kl, count
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from aplantida_jax.data import records
from aplantida_jax.train import input_pipeline
from aplantida_jax.train import sharding
from aplantida_jax.train import steps

KINDS = {
  "classification": "aplantida_jax.evaluation.evaluators:Classification",
  "agreement": "aplantida_jax.distill.agreement:Agreement",
}
COMMON_FIELDS = ("kind", "split", "every_steps")


def summed_pass(step_fn, state, batches, mesh):
  """Sums step_fn(state, global batch) over `batches` (dicts of per-process numpy arrays)."""
  totals = None
  for batch in batches:
    sums = step_fn(state, sharding.global_batch(mesh, batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  return {k: float(v) for k, v in jax.device_get(totals).items()}


class Evaluator:
  """Base: `spec` is the config.evals entry; `keys` the metrics run() can return."""

  FIELDS = ()  # the kind's own spec fields, beside COMMON_FIELDS

  def __init__(self, name, spec, *, config, workdir, dataset_dir, mesh):
    unknown = sorted(set(spec) - set(COMMON_FIELDS) - set(self.FIELDS))
    if unknown:
      raise ValueError(
        f"config.evals.{name} has unknown fields {unknown}; a {spec['kind']} "
        f"evaluator takes {sorted(COMMON_FIELDS + self.FIELDS)}."
      )
    self.name, self.spec, self.config, self.mesh = name, spec, config, mesh
    self.workdir, self.dataset_dir = workdir, dataset_dir
    self.every_steps = spec.get("every_steps") or config.eval_every_steps
    self.keys = ()

  def due(self, step, last):
    return last or step % self.every_steps == 0

  def batches(self, join_fn=None):
    return input_pipeline.eval_batches(
      self.config.input,
      self.dataset_dir,
      self.spec["split"],
      sharding.process_batch_size(self.config.eval_batch_size, self.mesh),
      join_fn=join_fn,
    )

  def run(self, state) -> dict:
    raise NotImplementedError


class Classification(Evaluator):
  """Top-1/top-5 and loss on a labelled split, overall and per region."""

  FIELDS = ("regions",)

  def __init__(self, name, spec, **kwargs):
    super().__init__(name, spec, **kwargs)
    regions = tuple(spec.get("regions", ()))
    unknown = sorted(set(regions) - set(self.config.regions))
    if unknown:
      raise ValueError(
        f"config.evals.{name}.regions names {unknown}, not in config.regions "
        f"({sorted(self.config.regions)})."
      )
    split_regions = (
      input_pipeline.read_metadata(self.dataset_dir, spec["split"])["regions"] if regions else []
    )
    # A record is in a region when its country (else its species' regions) is listed there,
    # as in the evaluate stage.
    self.masks = {
      r: records.region_mask(split_regions, self.config.regions[r]).astype(np.float32)
      for r in regions
    }
    self.keys = ("loss", "top1", "top5", "count") + tuple(
      f"{r}_{k}" for r, mask in self.masks.items() if mask.any() for k in ("top1", "top5")
    )
    self.step = jax.jit(steps.eval_step, out_shardings=sharding.replicated(self.mesh))

  def run(self, state):
    def local(batch):
      out = {k: batch[k] for k in ("image", "label", "mask")}
      out["regions"] = {r: mask[batch["index"]] * batch["mask"] for r, mask in self.masks.items()}
      return out

    totals = summed_pass(self.step, state, map(local, self.batches()), self.mesh)
    count = max(totals["count"], 1.0)
    out = {
      "loss": totals["loss"] / count,
      "top1": totals["top1"] / count,
      "top5": totals["top5"] / count,
      "count": totals["count"],
    }
    for region in self.masks:
      n = totals[f"{region}_count"]
      if n:
        out.update(
          {
            f"{region}_top1": totals[f"{region}_top1"] / n,
            f"{region}_top5": totals[f"{region}_top5"] / n,
            f"{region}_count": n,
          }
        )
    return out


def build(config, workdir, dataset_dir, mesh) -> dict:
  """{name: Evaluator} for config.evals, in config order; checks config.checkpoint.best_metric."""
  built = {}
  for name, spec in config.evals.items():
    spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    kind = spec.get("kind")
    if kind not in KINDS:
      raise ValueError(f"config.evals.{name}.kind={kind!r}; known kinds: {sorted(KINDS)}.")
    module_name, class_name = KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    built[name] = cls(
      name, spec, config=config, workdir=workdir, dataset_dir=dataset_dir, mesh=mesh
    )
  known = [f"{name}_{key}" for name, evaluator in built.items() for key in evaluator.keys]
  if config.checkpoint.best_metric not in known:
    raise ValueError(
      f"config.checkpoint.best_metric={config.checkpoint.best_metric!r}; choose one of "
      f"{known} (from config.evals; a region's metrics exist only when its split holds "
      "images of that region)."
    )
  return built


def run_due(evaluators, state, step, last) -> dict:
  """{<name>_<key>: value} of every evaluator due at `step`."""
  return {
    f"{name}_{key}": value
    for name, evaluator in evaluators.items()
    if evaluator.due(step, last)
    for key, value in evaluator.run(state).items()
  }
