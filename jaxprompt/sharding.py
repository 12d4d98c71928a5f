"""Device mesh, NamedSharding rules for params and batches, and global-batch assembly.

After big_vision's `sharding.py` and `train.py`: a ('data', 'model') mesh; the batch is split over
'data'; params are either replicated or FSDP-sharded (each large array split along its largest
dimension divisible by the 'data' axis size, ZeRO-3 style, the compiler inserting the all-gathers).
State is born sharded by jitting its initialiser with these shardings as `out_shardings`.

Tensor parallelism on the 'model' axis follows Megatron-LM (Shoeybi et al. 2019, §3; NVIDIA's
Megatron-LM `megatron/core/tensor_parallel/layers.py`, ColumnParallelLinear and RowParallelLinear):
in every transformer block the attention's query/key/value projections and the MLP's first Dense are
split by output (heads, hidden units), the attention's output projection and the MLP's second Dense
by input, so each device computes its heads and hidden units and one all-reduce per sub-block sums
them. As in big_vision, these are rules in the config's terms: (regex searched in the '/'-joined
param name, PartitionSpec) pairs, the first match wins (`SHARDING_RULES`, chosen by
`config.sharding_rules`); a param no rule matches is replicated or FSDP-sharded as above. The
optimizer state of a param carries its name as a suffix, so it is sharded the same way. Deviation: a
rule-matched param is split on 'model' only, not also FSDP-sharded on 'data'. GLIP's VL-DyHead tower
(Li et al. 2022, §3.2; microsoft/GLIP `maskrcnn_benchmark/modeling/rpn/vldyhead.py`) is split the
same way: the bi-directional attention of each VLFuse like a transformer's attention, its in-head
BERT layers like BERT's, and DyHead's convs by output channel (`MEGATRON_RULES` says which params,
and why the rest stays replicated).

Several processes (hosts) join one JAX runtime with `join_processes` before the mesh is built
(`jax.distributed.initialize`: auto-detected on TPU pods, SLURM and Open MPI, or an explicit
coordinator for local CPU runs, whose collectives are gloo's, JAX's default); the mesh then spans
every process's devices, or `mesh.num_devices` of them taken evenly from every process, each
process feeding its devices' rows of the global batch (`global_batch`). CPU executions then
dispatch synchronously: with asynchronous CPU dispatch, two processes' gloo collectives were seen
to deadlock within a few evaluation batches, each process blocked in a different execution. JAX
aborts a process whose peers do not all join within its initialization_timeout with a bare
DEADLINE_EXCEEDED; `join_processes` stops it first with a message that says what to check.
"""
from __future__ import annotations

import os
import re
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# The layers of a transformer block, by their names in models/vit.py (`Encoder1DBlock`: kernels
# (D, H, D/H), out (H, D/H, D), Dense_0 (D, F), Dense_1 (F, D)), models/clip.py
# (`ResidualAttentionBlock`: the same attention layout under 'attn'; mlp c_fc (D, 4D) and
# c_proj (4D, D)), models/bert.py (`Layer`: the same attention under 'attention'; intermediate
# (D, F), output (F, D); GLIP's in-head `fusion.ClampedBertLayer`, 'dyhead_tower_{3i+1}', has the
# same names) and models/swin.py (`SwinBlock`: one fused attn/qkv (C, 3C), attn/proj (C, C), mlp
# fc1 (C, 4C), fc2 (4C, C)). Swin's fused qkv is split into contiguous column blocks, not by head:
# the same numbers, but the compiler may need a collective to regroup it by head.
_BERT_LAYER = r"(layer|dyhead_tower)_\d+"
_ATTENTION = rf"(MultiHeadDotProductAttention_1|attn|{_BERT_LAYER}/attention)"
_COLUMN_SPLIT = rf"(MlpBlock_3/Dense_0|mlp/c_fc|{_BERT_LAYER}/intermediate|mlp/fc1|attn/qkv)"
_ROW_SPLIT = rf"(MlpBlock_3/Dense_1|mlp/c_proj|{_BERT_LAYER}/output|mlp/fc2|attn/proj)"
# GLIP's VL-DyHead tower (models/glip/fusion.py, dyconv.py). The bi-directional attention of each
# VLFuse ('b_attn/attn'): the query (v_proj), key (l_proj) and the two value projections (D, E)
# split by output, E being head-major so that a model axis dividing the 8 heads splits by head; the
# two output projections (E, D) by input. DyConv's three 3x3 (deformable) convs (3, 3, C, C) split
# by output channel: their outputs go through GroupNorm, the scale attention and DyReLU, each of
# which pools over all channels, so there is no row-split partner and the compiler gathers the
# channels after each conv (Megatron's ColumnParallelLinear with its output gathered).
# Replicated: the offset conv (27 outputs), AttnConv_1 (1 output), DyReLU's fc_0 / fc_2 (C x C/4,
# C/4 x 4C: 0.3 M params at C = 256), the GroupNorms and layer scales, and the prediction heads
# (1x1 convs to 4, 1 and the frozen class count, the 768 x 256 text projection): together under
# 2 % of GLIP-L's head, not worth a collective each.
_FUSION_IN = r"b_attn/attn/(v_proj|l_proj|values_v_proj|values_l_proj)"
_FUSION_OUT = r"b_attn/attn/(out_v_proj|out_l_proj)"
_DYCONV = r"dyhead_tower_\d+/DyConv_\d/conv"
MEGATRON_RULES = (
    (_ATTENTION + r"/(query|key|value)/kernel$", P(None, MODEL, None)),  # heads
    (_ATTENTION + r"/(query|key|value)/bias$", P(MODEL, None)),
    (_ATTENTION + r"/out/kernel$", P(MODEL, None, None)),  # bias (D,) replicated
    (_COLUMN_SPLIT + r"/kernel$", P(None, MODEL)),  # columns: hidden units
    (_COLUMN_SPLIT + r"/bias$", P(MODEL)),
    (_ROW_SPLIT + r"/kernel$", P(MODEL, None)),  # rows; bias (D,) replicated
    (_FUSION_IN + r"/kernel$", P(None, MODEL)),  # columns: heads
    (_FUSION_IN + r"/bias$", P(MODEL)),
    (_FUSION_OUT + r"/kernel$", P(MODEL, None)),  # rows; bias (D,) replicated
    (_DYCONV + r"/kernel$", P(None, None, None, MODEL)),  # output channels
    (_DYCONV + r"/bias$", P(MODEL)),
)
SHARDING_RULES = {"none": (), "megatron": MEGATRON_RULES}


def mesh_devices(devices, num_devices: int, model_parallel: int) -> list:
  """The devices of a ('data', 'model') mesh, grouped by process (stable: one process keeps JAX's
  order), so that process p's devices hold the p-th block of the global batch, the rows its input
  pipeline reads: `num_devices` of `devices` (0: all), the same number from every process."""
  by_process = {}
  for device in devices:
    by_process.setdefault(device.process_index, []).append(device)
  num_processes, total = len(by_process), len(devices)
  per_process = min(len(group) for group in by_process.values())
  if num_devices:
    if num_devices > total:
      raise ValueError(f"mesh.num_devices={num_devices} but only {total} devices exist.")
    if num_devices % num_processes:
      raise ValueError(f"mesh.num_devices={num_devices} is not a multiple of the {num_processes} "
                       f"processes, which each give the same number of devices; pick a multiple "
                       f"of {num_processes}.")
    per_process = num_devices // num_processes
  elif any(len(group) != per_process for group in by_process.values()):
    raise ValueError(f"The processes have different device counts "
                     f"{[len(by_process[p]) for p in sorted(by_process)]}; set mesh.num_devices.")
  if per_process % model_parallel:
    raise ValueError(f"mesh.model={model_parallel} does not divide the {per_process} devices that "
                     f"each of the {num_processes} processes gives the mesh "
                     f"({per_process * num_processes} devices): a model-axis row must lie within "
                     f"one process, which feeds it its rows of the batch.")
  return [device for process in sorted(by_process) for device in by_process[process][:per_process]]


def make_mesh(num_devices: int = 0, model_parallel: int = 1) -> Mesh:
  """A ('data', 'model') mesh over `num_devices` devices (0: all of them), taken evenly from every
  process (`mesh_devices`)."""
  devices = mesh_devices(jax.devices(), num_devices, model_parallel)
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


def path_name(path) -> str:
  """The '/'-joined name of a tree path (dict keys, sequence indices, attribute names)."""
  return "/".join(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
                  for key in path)


def rule_spec(name: str, shape, rules, mesh: Mesh) -> P | None:
  """The PartitionSpec of the first rule whose regex is found in `name` (None: no rule matches),
  checked against `shape` and the mesh's axis sizes."""
  for regex, spec in rules:
    if not re.search(regex, name):
      continue
    if len(spec) > len(shape):
      raise ValueError(f"Sharding rule {regex!r} gives {spec} to {name} of shape {tuple(shape)}: "
                       f"more dimensions than the param has.")
    for dim, axis in enumerate(spec):
      if axis is not None and shape[dim] % mesh.shape[axis]:
        raise ValueError(
            f"{name} of shape {tuple(shape)}: dimension {dim} ({shape[dim]}) is not divisible by "
            f"the mesh's {axis!r} axis of size {mesh.shape[axis]} (sharding rule {regex!r}); "
            f"pick a mesh.{axis} that divides it.")
    return spec
  return None


def tree_shardings(tree, mesh: Mesh, strategy: str, rules=()):
  """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs): the spec of the
  first of `rules` ((regex, PartitionSpec) pairs) that matches the leaf's name, else `strategy`."""
  if strategy not in ("replicate", "fsdp"):
    raise ValueError(f"param_sharding={strategy!r}: expected 'replicate' or 'fsdp'.")
  data_size = mesh.shape[DATA] if strategy == "fsdp" else 1

  def leaf_sharding(path, x):
    spec = rule_spec(path_name(path), x.shape, rules, mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, data_size) if spec is None else spec)
  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def bytes_on_device(tree, device) -> int:
  """Bytes of the array shards of `tree` that `device` holds (what model sharding shrinks)."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree) for shard in x.addressable_shards
             if shard.device == device)


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


def join_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, *, timeout_s: int = 300) -> None:
  """Joins this process to the others of the run (`jax.distributed.initialize`), all three
  arguments given (a local multi-process run) or none (detected from the TPU pod, SLURM or Open
  MPI environment). Exits with a message naming the settings when not every process has joined
  within `timeout_s` (a coordinator that never answers, fewer processes than `num_processes`), and
  raises a ValueError when the processes disagree on `num_processes`."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit) and any(x is None for x in explicit):
    raise ValueError(f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
                     f"process_id={process_id}: give all three (a local multi-process run) or "
                     f"none (auto-detected on TPU pods, SLURM and Open MPI).")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes}).")
  if coordinator_address is not None and not coordinator_address.rpartition(":")[2].isdigit():
    raise ValueError(f"coordinator_address={coordinator_address!r}: expected 'host:port'.")
  if timeout_s < 1:
    raise ValueError(f"timeout_s={timeout_s}: expected a positive number of seconds.")
  settings = (f"coordinator_address={coordinator_address}, num_processes={num_processes}, "
              f"process_id={process_id}" if num_processes is not None else
              "settings detected from the cluster environment")

  def give_up():
    sys.stderr.write(
        f"jaxprompt: the processes did not all join within {timeout_s} s ({settings}). Check that "
        f"process 0, which hosts the coordinator, is running and reachable at that address, that "
        f"every process was started with the same coordinator address and process count, and "
        f"that each has its own process id.\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access  (JAX's own timeout aborts without a message)

  jax.config.update("jax_cpu_enable_async_dispatch", False)  # see the module docstring
  watchdog = threading.Timer(timeout_s, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # JAX's timeout a minute later than ours, so that the message above comes first.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s + 60)
  finally:
    watchdog.cancel()
  if num_processes is not None:
    counts = multihost_utils.process_allgather(np.asarray(num_processes)).reshape(-1).tolist()
    if len(set(counts + [jax.process_count()])) > 1:
      raise ValueError(f"The processes disagree on num_processes: {counts} (by process id), and "
                       f"{jax.process_count()} joined; start every process with the same "
                       f"--num_processes.")
