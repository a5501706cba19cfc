"""Data parallelism: one "data" mesh axis over every device of every process.

Batches are split along that axis, the train state is replicated. Each
process loads only its share of a global batch; `global_batch` stitches the
shares into one global jax.Array without moving data between hosts.
"""

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import aplantida_jax

DATA_AXIS = "data"


def maybe_initialize_distributed(mesh_config) -> None:
  """jax.distributed.initialize when the config names a coordinator (multi-host)."""
  if not mesh_config.coordinator_address:
    return
  aplantida_jax.allow_cpu_collectives()
  jax.distributed.initialize(
    coordinator_address=mesh_config.coordinator_address,
    num_processes=mesh_config.num_processes,
    process_id=mesh_config.process_id,
  )
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def create_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share; the global batch must split evenly over devices."""
  if global_batch_size % mesh.size:
    raise ValueError(
      f"Batch size {global_batch_size} does not split over {mesh.size} devices; "
      f"set config.batch_size / eval_batch_size to a multiple of {mesh.size}."
    )
  return global_batch_size // jax.process_count()


def global_batch(mesh: Mesh, local_batch: dict) -> dict:
  """Per-process numpy batch → global arrays sharded along the batch axis."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
