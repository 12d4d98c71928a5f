"""Command line: `python -m jaxprompt.main --config configs/<file>.py[:args] [--workdir DIR]`.

`--config.key=value` overrides any config entry; an unknown key is a one-line error, except under
`dataset_kwargs`, whose keys are the data source's own (`--config.dataset_kwargs.root=DIR`).
A config with `variants` (e.g. the SDPT demos: SDPT and two baselines) runs once per variant and
prints their metrics side by side (`jaxprompt/variants.py`). `--config.mode=eval` only evaluates the latest checkpoint in the workdir (or `config.model_init`).
Several processes join one JAX runtime with `--jax_distributed` (or JAXPROMPT_DISTRIBUTED=1):
the settings are detected on TPU pods, SLURM and Open MPI; a local multi-process run names them
(`--coordinator_address=localhost:PORT --num_processes=N --process_id=I`, which imply
`--jax_distributed`). Processes that have not all joined within `--distributed_timeout` seconds
stop with a message (`sharding.join_processes`). The input order and so the run's results do not
depend on the process count (`input_pipeline/pipeline.py`).

The default workdir is `workdirs/<config file name>` plus the config arguments
(`configs/vpt_vtab.py:task=dtd` -> `workdirs/vpt_vtab_task=dtd`). A rerun there resumes the run,
and refuses to when the settings that shape its state differ (see `jaxprompt/run_record.py`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':args'.", lock_config=False,
    accept_new_attributes=True)  # new keys: only under dataset_kwargs (config_checks)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, TensorBoard, metrics.json). "
    "Default: workdirs/<config file name>_<config arguments>.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", os.environ.get("JAXPROMPT_DISTRIBUTED") == "1",
    "Join the run's other processes first (jax.distributed.initialize: TPU pods, SLURM, Open "
    "MPI, or the explicit flags below).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (local multi-process runs; "
    "implies --jax_distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with "
                                      "--coordinator_address).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) "
                                   "(with --coordinator_address).", lower_bound=0)
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join.", lower_bound=1)
_REUSE_HOST_MEMORY = flags.DEFINE_bool(
    "reuse_host_memory", True, "Keep freed host memory for reuse (glibc malloc settings, "
    "jaxprompt/host_memory.py): on CPU, spares XLA's per-step temporaries their page faults.")


def _quiet_library_info(record: logging.LogRecord) -> bool:
  """Keeps warnings and errors from everywhere but drops the INFO chatter of orbax and JAX
  internals (a few dozen lines per checkpoint), so the progress and metric lines stay readable."""
  noisy = ("/orbax/", "/jax/_src/")
  return record.levelno > logging.INFO or not any(part in record.pathname for part in noisy)


def default_workdir(config_argument: str) -> str:
  """workdirs/<file name>[_<args>] for `--config path.py[:args]`, args made path-safe."""
  path, _, args = config_argument.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if args:
    name += "_" + re.sub(r"[^A-Za-z0-9=,.+-]", "_", args)
  return os.path.join("workdirs", name)


def file_config(config_argument: str):
  """The config exactly as the file builds it (no command-line overrides)."""
  path, has_args, args = config_argument.partition(":")
  spec = importlib.util.spec_from_file_location("_jaxprompt_config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(args) if has_args else module.get_config()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_quiet_library_info)
  if _REUSE_HOST_MEMORY.value:  # before any JAX computation: see host_memory
    from jaxprompt import host_memory
    host_memory.reuse_freed_memory()
  # jax only after flag parsing, so that XLA_FLAGS and friends are already in place, and the
  # processes joined before any module can touch a backend
  from jaxprompt import sharding
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DISTRIBUTED.value or any(x is not None for x in explicit):
    try:
      sharding.join_processes(*explicit, timeout_s=_DISTRIBUTED_TIMEOUT.value)
    except ValueError as e:
      sys.exit(f"jaxprompt: {e}")
  from jaxprompt import checkpointing, config_checks, run_record, train, variants
  config_argument = flags.FLAGS["config"].config_filename
  config = _CONFIG.value
  try:
    config_checks.check_overrides(config, file_config(config_argument))
    config_checks.check_spine(config)
    config.lock()
    workdir = _WORKDIR.value or default_workdir(config_argument)
    train.log(f"workdir: {os.path.abspath(workdir)}")
    if config.get("variants"):
      variants.run(config_argument, config, workdir, file_config)
    else:
      train.train_and_evaluate(config, workdir)
  except (config_checks.ConfigError, run_record.RunMismatchError,
          checkpointing.ResumeError) as e:
    sys.exit(f"jaxprompt: {e}")  # the message says it all; no traceback


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
