"""Device mesh, NamedSharding rules for params and batches, and global-batch assembly.

After big_vision's `sharding.py` and `train.py`: a mesh with a 'data' axis (and a 'model' axis
reserved for tensor parallelism, size 1 today); the batch is split over 'data'; params are either
replicated or FSDP-sharded (each large array split along its largest dimension divisible by the
'data' axis size, ZeRO-3 style, the compiler inserting the all-gathers). State is born sharded by
jitting its initialiser with these shardings as `out_shardings`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
  """A ('data', 'model') mesh over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices exist.")
    devices = devices[:num_devices]
  if len(devices) % model_parallel:
    raise ValueError(f"mesh.model={model_parallel} does not divide {len(devices)} devices.")
  grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, data_size: int, min_size: int = 2 ** 14) -> P:
  """Shards the largest dimension divisible by `data_size`; small or indivisible arrays replicate."""
  if data_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % data_size == 0:
      return P(*([None] * dim + [DATA]))
  return P()


def tree_shardings(tree, mesh: Mesh, strategy: str):
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
  if strategy == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  if strategy == "fsdp":
    data_size = mesh.shape[DATA]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, data_size)), tree)
  raise ValueError(f"param_sharding={strategy!r}: expected 'replicate' or 'fsdp'.")


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  data_size = mesh.shape[DATA]
  if global_batch_size % data_size or global_batch_size % jax.process_count():
    raise ValueError(
        f"batch_size={global_batch_size} is not divisible by the {data_size} devices of the "
        f"mesh's data axis (and {jax.process_count()} processes); pick a multiple of {data_size}.")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This host's numpy batch -> global jax.Arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def padded_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """`global_batch_size` rounded up to a multiple of the data axis and the process count, so that
  evaluation runs on any device count (the extra examples are masked padding)."""
  multiple = int(np.lcm(mesh.shape[DATA], jax.process_count()))
  return -(-global_batch_size // multiple) * multiple
