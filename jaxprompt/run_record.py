"""The record that ties a workdir to one run: its resolved config, compared on every resume.

A rerun in the same workdir resumes from its latest checkpoint. That is only right when the rerun
would build the same state: the same model and trainable set (or restored prompts meet a
different backbone, or orbax fails on mis-shaped arrays), the same optimiser (or its state does not
fit), the same data and seed (or the resumed input stream is another run's). So the first start
writes `<workdir>/config.json` (every resolved key), and a start that finds checkpoints compares
its config with it: keys that shape the state must be equal, else the run stops before building
anything and names the differing keys and the ways out (another `--workdir`, or
`--config.overwrite=True`, which deletes the old checkpoints and starts from step 0).

Keys in `MAY_DIFFER` do not shape the state and may change on a resume: when and how often to log,
evaluate and save, how long to train (extending a run), what to evaluate, the device layout and
where the data lives.
"""
from __future__ import annotations

import json
import os
import shutil

import ml_collections

from jaxprompt import checkpointing, writers

RECORD_FILE = "config.json"
MAY_DIFFER = ("mode", "total_steps", "num_epochs", "log_every_steps", "evals", "keep_best",
              "eval_at_best", "early_stop_patience", "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size",
              "mesh", "param_sharding", "sharding_rules", "data_dir", "overwrite", "strict_resume",
              "optim.ema_for_eval")


class RunMismatchError(ValueError):
  """The workdir holds checkpoints of a run whose state-shaping settings differ from this one."""


def flat_config(config) -> dict[str, object]:
  """Dotted keys -> JSON values (tuples become lists, other objects their repr)."""
  as_dict = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)

  def walk(tree, prefix=""):
    for key, value in tree.items():
      if isinstance(value, dict) and value:
        yield from walk(value, f"{prefix}{key}.")
      else:
        yield f"{prefix}{key}", json.loads(json.dumps(value, default=repr))

  return dict(walk(as_dict))


def _shapes_state(key: str) -> bool:
  return not any(key == k or key.startswith(k + ".") for k in MAY_DIFFER)


def differences(recorded: dict, current: dict) -> list[str]:
  """'key: recorded -> current' for every state-shaping key whose value differs."""
  keys = sorted(k for k in set(recorded) | set(current) if _shapes_state(k))
  missing = "<unset>"
  return [f"{k}: {recorded.get(k, missing)!r} -> {current.get(k, missing)!r}" for k in keys
          if recorded.get(k, missing) != current.get(k, missing)]


def has_checkpoints(checkpoint_dir: str) -> bool:
  """Whether orbax step folders (plain integers) exist in `checkpoint_dir`."""
  return os.path.isdir(checkpoint_dir) and any(
      name.isdigit() for name in os.listdir(checkpoint_dir))


def prepare(workdir: str, config, checkpoint_dir: str, *, write: bool = True) -> list[str]:
  """Checks `config` against the workdir's record before a resume and (re)writes the record.

  Returns warnings to log. Raises RunMismatchError when checkpoints exist, the record differs in
  a state-shaping key and `config.overwrite` is not set; with `overwrite` the old checkpoints
  are deleted first. A run that starts from step 0 also drops an earlier run's best checkpoint
  (`keep_best`), which would otherwise be compared against. `write=False` (processes other than
  0) only checks.
  """
  path = os.path.join(workdir, RECORD_FILE)
  current = flat_config(config)
  warnings = []
  if has_checkpoints(checkpoint_dir):
    if config.get("overwrite"):
      if write:
        shutil.rmtree(checkpoint_dir)
      warnings.append(f"overwrite=True: deleted the checkpoints in {checkpoint_dir}; starting "
                      "from step 0.")
    elif os.path.isfile(path):
      with open(path) as f:
        recorded = json.load(f)
      diff = differences(recorded, current)
      if diff:
        raise RunMismatchError(
            f"{workdir} holds checkpoints of a run with other settings ({path}):\n  " +
            "\n  ".join(diff) + "\nResuming would mix the two runs. Use another --workdir, "
            "or pass --config.overwrite=True to delete those checkpoints and start from step 0.")
    else:
      warnings.append(f"{workdir} has checkpoints but no {RECORD_FILE} (written by older "
                      "versions): the settings of the run being resumed cannot be checked.")
  if write and not has_checkpoints(checkpoint_dir):  # step 0: nothing of an earlier run stays
    shutil.rmtree(os.path.join(workdir, checkpointing.BEST_DIR), ignore_errors=True)
    if os.path.isfile(os.path.join(workdir, checkpointing.BEST_RECORD)):
      os.remove(os.path.join(workdir, checkpointing.BEST_RECORD))
  if write:
    writers.write_json_atomic(path, current)
  return warnings


def check_workdir(workdir: str) -> None:
  """Fails early, naming the folder, when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); pass "
                          f"--workdir with a folder you can write to.") from e
