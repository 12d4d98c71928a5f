"""Command line: `python -m jaxprompt.main --config configs/<file>.py[:args] [--workdir DIR]`.

`--config.key=value` overrides any config entry (unknown keys are an error); `--config.mode=eval`
only evaluates the latest checkpoint in the workdir (or `config.model_init`). On a multi-host TPU
pod pass `--jax_distributed` (or set JAXPROMPT_DISTRIBUTED=1) so every host joins one JAX runtime.
"""
from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':args'.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, TensorBoard, metrics.json). "
    "Default: workdirs/<config file name>.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", os.environ.get("JAXPROMPT_DISTRIBUTED") == "1",
    "Call jax.distributed.initialize() first (multi-host pods).")


def _quiet_library_info(record: logging.LogRecord) -> bool:
  """Keeps warnings and errors from everywhere but drops the INFO chatter of orbax and JAX
  internals (a few dozen lines per checkpoint), so the progress and metric lines stay readable."""
  noisy = ("/orbax/", "/jax/_src/")
  return record.levelno > logging.INFO or not any(part in record.pathname for part in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_quiet_library_info)
  import jax  # after flag parsing, so that XLA_FLAGS and friends are already in place
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from jaxprompt import train
  config_path = flags.FLAGS["config"].config_filename.split(":")[0]
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(config_path))[0])
  train.log(f"workdir: {os.path.abspath(workdir)}")
  train.train_and_evaluate(_CONFIG.value, workdir)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
