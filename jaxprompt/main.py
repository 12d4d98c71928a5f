"""Command line: `python -m jaxprompt.main --config configs/<file>.py[:args] [--workdir DIR]`.

`--config.key=value` overrides any config entry; an unknown key is a one-line error, except under
`dataset_kwargs`, whose keys are the data source's own (`--config.dataset_kwargs.root=DIR`).
A config with `variants` (e.g. the SDPT demos: SDPT and two baselines) runs once per variant and
prints their metrics side by side (`jaxprompt/variants.py`). `--config.mode=eval` only evaluates the latest checkpoint in the workdir (or `config.model_init`).
On a multi-host TPU pod pass `--jax_distributed` (or set JAXPROMPT_DISTRIBUTED=1) so every host
joins one JAX runtime.

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
    "Call jax.distributed.initialize() first (multi-host pods).")


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
  import jax  # after flag parsing, so that XLA_FLAGS and friends are already in place
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
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
