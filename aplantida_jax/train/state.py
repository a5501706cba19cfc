"""Train state and the optax optimiser built from config.optimizer.

One small struct instead of flax.training's TrainState: it also carries batch
statistics and optional EMA params, and stays stable across Flax versions.
"""

import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train_step calls (micro-batches)
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any | None  # None when config.optimizer.ema_decay == 0
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)
  accum_steps: int = flax.struct.field(pytree_node=False, default=1)
  frozen: str = flax.struct.field(pytree_node=False, default="")  # config.optimizer.frozen

  def apply_gradients(self, grads, batch_stats):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    step = self.step + 1
    ema_params = self.ema_params
    if ema_params is not None:
      # Average only when MultiSteps really updated the params (every accum_steps calls).
      decay = jnp.where(step % self.accum_steps == 0, self.ema_decay, 1.0)
      ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
    return self.replace(
      step=step, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
    )

  def trained_leaves(self, tree):
    """The leaves of a params-shaped tree that the optimizer trains (all when none is frozen).

    Norms over these keep frozen layers' gradients unused, so XLA still drops their backward.
    """
    if not self.frozen:
      return jax.tree.leaves(tree)
    labels = jax.tree.leaves(frozen_labels(self.params, self.frozen))
    return [leaf for leaf, label in zip(jax.tree.leaves(tree), labels) if label == "trained"]

  def eval_variables(self):
    """Variables for evaluation: EMA params when kept, else the live ones."""
    params = self.params if self.ema_params is None else self.ema_params
    return {"params": params, "batch_stats": self.batch_stats}


def learning_rate_schedule(opt_config, batch_size, num_train_steps):
  """Linear warmup to the (batch-scaled) peak, then cosine decay, per optimizer update."""
  peak = opt_config.learning_rate
  if opt_config.scale_learning_rate:
    peak *= batch_size / 256
  warmup = min(opt_config.warmup_steps, max(num_train_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(num_train_steps, warmup + 1),
    end_value=peak * opt_config.end_learning_rate_factor,
  )


def decay_mask(params):
  """Weight decay on kernels only; biases and batch-norm scales/offsets are 1-D."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def frozen_labels(params, pattern):
  """ "frozen"/"trained" per parameter: frozen when `pattern` matches its "/"-joined path.

  A frozen parameter's gradient is never used, so under jit XLA drops the backward
  pass below the lowest trained layer: fine-tuning only the top of a pretrained
  backbone costs little more than inference on a CPU.
  """
  regex = re.compile(pattern)
  labels = traverse_util.path_aware_map(
    lambda path, _: "frozen" if regex.search("/".join(path)) else "trained", params
  )
  kinds = set(jax.tree.leaves(labels))
  if kinds != {"frozen", "trained"}:
    what = "every" if kinds == {"frozen"} else "no"
    raise ValueError(
      f"config.optimizer.frozen={pattern!r} matches {what} parameter; it is a regex "
      f"over paths like 'block3/depthwise/conv/kernel' (top level: "
      f"{', '.join(params)})."
    )
  return labels


def create_optimizer(opt_config, batch_size, num_train_steps, params=None):
  """sgd-momentum or adamw with warmup+cosine, masked decay, clipping, frozen layers, accumulation.

  `params` (any pytree of their shape) is needed only when `opt_config.frozen` is set.
  """
  schedule = learning_rate_schedule(opt_config, batch_size, num_train_steps)
  if opt_config.name == "sgd":
    tx = optax.chain(
      optax.add_decayed_weights(opt_config.weight_decay, decay_mask),
      optax.sgd(schedule, momentum=opt_config.momentum, nesterov=opt_config.nesterov),
    )
  elif opt_config.name == "adamw":
    tx = optax.adamw(
      schedule,
      b1=opt_config.b1,
      b2=opt_config.b2,
      weight_decay=opt_config.weight_decay,
      mask=decay_mask,
    )
  else:
    raise ValueError(f"Unknown config.optimizer.name={opt_config.name!r}; use 'sgd' or 'adamw'.")
  if opt_config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt_config.grad_clip_norm), tx)
  if opt_config.frozen:
    tx = optax.multi_transform(
      {"trained": tx, "frozen": optax.set_to_zero()}, frozen_labels(params, opt_config.frozen)
    )
  if opt_config.grad_accum_steps > 1:
    tx = optax.MultiSteps(
      tx, every_k_schedule=opt_config.grad_accum_steps
    ).gradient_transformation()
  return tx, schedule


def create_train_state(model, variables, opt_config, batch_size, num_train_steps):
  """TrainState around initial `variables` ({"params", optional "batch_stats"})."""
  params = variables["params"]
  tx, _ = create_optimizer(opt_config, batch_size, num_train_steps, params)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    ema_params=jax.tree.map(jnp.copy, params) if opt_config.ema_decay > 0 else None,
    apply_fn=model.apply,
    tx=tx,
    ema_decay=opt_config.ema_decay,
    accum_steps=opt_config.grad_accum_steps,
    frozen=opt_config.frozen,
  )
