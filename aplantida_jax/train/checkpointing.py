"""orbax checkpoints of a stage folder: latest (to resume) and best (to use).

  <stage>/checkpoints/<step>/{state,data}  full train state + Grain iterator
                                           state; last `keep`, async, for resuming
  <stage>/best/<step>/state                eval variables of the best val top-1

orbax writes each step into a temporary folder and renames it when complete,
so a kill at any moment leaves the previous checkpoints intact; leftovers are
cleaned up when the manager opens again.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from flax import serialization

# orbax 0.12.8 slices replicated arrays per replica under `jax.sharding.set_mesh`,
# a context manager only from jax 0.7 on; with jax 0.6.2 (our pin) a multi-device
# save crashes there. Replica 0 writes each replicated array instead.
ocp.type_handlers.register_type_handler(
  jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


def _manager(directory, *, keep, async_save, best_metric=None):
  best = best_metric is not None
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    cleanup_tmp_directories=True,
    enable_async_checkpointing=async_save,
    best_fn=(lambda metrics: metrics[best_metric]) if best else None,
    best_mode="max",
  )
  item_names = ("state",) if best else ("state", "data")
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=item_names)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpoints:
  """The latest and best checkpoint managers of one stage folder.

  `best/` keeps the eval variables of the highest `checkpoint_config.best_metric` (an
  evaluator's metric, evaluation/evaluators.py: "val_top1", "val_spain_top1", ...),
  recorded under that name.
  """

  def __init__(self, stage_dir, checkpoint_config):
    self.latest = _manager(
      os.path.join(stage_dir, "checkpoints"),
      keep=checkpoint_config.keep,
      async_save=checkpoint_config.async_save,
    )
    self.best_metric = checkpoint_config.best_metric
    self.best = _manager(
      os.path.join(stage_dir, "best"),
      keep=1,
      async_save=checkpoint_config.async_save,
      best_metric=self.best_metric,
    )
    # Held in memory: an async save's metrics are not readable until it commits.
    step = self.best.best_step()
    self.best_value = (
      None if step is None else (self.best.metrics(step) or {}).get(self.best_metric)
    )

  def restore_latest(self, state, data_iterator):
    """(state, data_iterator) of the latest checkpoint, or the inputs when there is none."""
    step = self.latest.latest_step()
    if step is None:
      return state, data_iterator
    restored = self.latest.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(serialization.to_state_dict(state))),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    return serialization.from_state_dict(state, restored.state), restored.data

  def save(self, step, state, data_iterator):
    self.latest.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(serialization.to_state_dict(state)),
        data=grain.checkpoint.CheckpointSave(data_iterator),
      ),
    )

  def maybe_save_best(self, step, state, eval_metrics) -> bool:
    """Keeps the eval variables when eval_metrics[best_metric] beats every earlier one."""
    value = float(eval_metrics[self.best_metric])
    if self.best_value is not None and value <= self.best_value:
      return False
    self.best.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state.eval_variables())),
      metrics={self.best_metric: value},
    )
    self.best_value = value
    return True

  def close(self):
    """Waits for background writes; call before exiting."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()
    self.latest.close()
    self.best.close()


def load_variables(stage_dir, which="best"):
  """{"params", "batch_stats"} of a stage's best or latest checkpoint, as numpy."""
  if which not in ("best", "latest"):
    raise ValueError(f"which={which!r}: use 'best' or 'latest'.")
  directory = os.path.abspath(
    os.path.join(stage_dir, "checkpoints" if which == "latest" else "best")
  )
  manager = ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(create=False), item_names=("state",)
  )
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(
      f"No {which} checkpoint under {directory}; train the stage first "
      f"(or resume it: rerun its command)."
    )
  # A checkpoint saved on other devices (8 GPUs, 2 hosts) restores onto this process's first one.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  state = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=device))
  ).state
  manager.close()
  params = state.get("ema_params") or state["params"]
  return {"params": params, "batch_stats": state.get("batch_stats") or {}}
