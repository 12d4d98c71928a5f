"""Orbax checkpoints of the train state: keep N, save every K steps and at the end, resume.

Only what training changes is saved: the trainable params, the optimizer state and the step (which
is also the input position: the train pipeline is deterministic and resumes at that step). The
frozen backbone comes back from `model_init` (or the seeded init), so a prompt-tuning checkpoint of
ViT-B is a few MB, not 350. Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it); `close()` waits for the last one.

The train loop decides when to save (every `checkpoint_every_steps` and at the end) and checks
that the state is finite first, so every checkpoint written is one a run can resume from; orbax's
own interval logic is not used (it always saves the first step it is offered, NaN or not).

A checkpoint that cannot be read back (truncated or garbage files, a deleted manifest) or that
holds non-finite values is never a reason to restart from step 0: `restore_latest` warns, moves
it aside to `<workdir>/corrupt_checkpoints/<step>` and falls back to the newest readable one, or
raises naming the step with `strict=True` (`config.strict_resume`) or when none is readable.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxprompt import writers


class ResumeError(RuntimeError):
  """A checkpoint of this workdir cannot be used to resume; the message names its step."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` keyed by train step."""

  def __init__(self, directory: str, *, keep: int):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep}: expected at least 1.")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> bool:
    """Saves `step` (asynchronously); the caller has checked that `state` is finite."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, like):
    """Restores `step` with the shapes, dtypes and shardings of the arrays in `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest(self, like, *, strict: bool = False,
                     warn: Callable[[str], None] = print) -> tuple[int, object] | None:
    """(step, state) of the newest checkpoint that reads back finite, or None when there is none.

    An unreadable or non-finite checkpoint is moved aside with a warning and the next older one
    is tried; with `strict` the first such checkpoint raises ResumeError instead.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        state = self.restore(step, like)
        # Not the optimizer state: it may hold inf by design (the plateau rule's best-so-far).
        checked = {k: v for k, v in state.items() if k != "opt_state"}
        problem = None if _all_finite(checked) else "it holds non-finite (NaN/inf) values"
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        problem = f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
      if problem is None:
        return step, state
      where = os.path.join(self.directory, str(step))
      if strict:
        raise ResumeError(f"The checkpoint of step {step} ({where}) is unusable: {problem}. "
                              "strict_resume=True refuses to fall back to an older one.")
      older = steps[i + 1] if i + 1 < len(steps) else None
      aside = self._move_aside(step)
      warn(f"WARNING: the checkpoint of step {step} is unusable: {problem}. Moved it to {aside}; "
           + (f"falling back to step {older}." if older is not None else "no older one is left."))
    if steps:
      raise ResumeError(f"No checkpoint in {self.directory} can be resumed from (tried steps "
                            f"{steps}; they are in {self._aside_root()}). Not restarting from "
                            "step 0 silently: pass --config.overwrite=True to start a new run.")
    return None

  def _aside_root(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

  def _move_aside(self, step: int) -> str:
    target = os.path.join(self._aside_root(), str(step))
    if jax.process_index() == 0:
      os.makedirs(self._aside_root(), exist_ok=True)
      if os.path.exists(target):
        shutil.rmtree(target)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def read_run(directory: str) -> tuple[int, dict]:
  """(step, checkpointed state) of the newest checkpoint of another run of this library, read as it
  was saved (no target: {'params': the trainable params, 'opt_state', 'step', ...}), e.g. a CoOp
  run's prompt context for TPT. `directory`: the run's workdir or its `checkpoints` folder."""
  folder = os.path.abspath(directory)
  if os.path.isdir(os.path.join(folder, "checkpoints")):
    folder = os.path.join(folder, "checkpoints")
  manager = ocp.CheckpointManager(folder) if os.path.isdir(folder) else None
  try:
    step = manager.latest_step() if manager else None
    if step is None:
      raise FileNotFoundError(f"{directory!r} holds no checkpoint of a jaxprompt run (expected "
                              f"<workdir>/checkpoints/<step>/ as training writes them).")
    return step, manager.restore(step)
  finally:
    if manager:
      manager.close()


def _all_finite(tree) -> bool:
  """Whether every float array of `tree` is finite (one jitted reduction; works on sharded and
  multi-host arrays)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(
      leaves))


BEST_DIR, BEST_RECORD = "best_checkpoint", "best.json"  # in the workdir


class BestCheckpoint:
  """The checkpoint with the best value of one evaluation metric (`config.keep_best`), kept in
  `<workdir>/best_checkpoint` beside the latest ones, with `<workdir>/best.json` = {'metric',
  'mode', 'step', 'value', 'bad_evals'} so that a resumed run keeps comparing against the same
  best. This is the FGVC protocol of VPT and SA2VP (select the epoch on val, report test there)
  and LMPT's best-mAP report. `bad_evals` counts the evaluations in a row whose value was worse
  than the best (a tie resets it, as GLIP's AUTO_TERMINATE_PATIENCE counter,
  microsoft/GLIP `maskrcnn_benchmark/engine/trainer.py`); `config.early_stop_patience` stops on
  it."""

  def __init__(self, workdir: str, metric: str, mode: str):
    if mode not in ("max", "min"):
      raise ValueError(f"config.keep_best mode {mode!r}: expected 'max' or 'min'.")
    self.metric, self.mode = metric, mode
    self._record = os.path.join(workdir, BEST_RECORD)
    self._checkpointer = Checkpointer(os.path.join(workdir, BEST_DIR), keep=1)
    self.best = None
    if os.path.isfile(self._record) and self._checkpointer.latest_step() is not None:
      with open(self._record) as f:
        record = json.load(f)
      if (record.get("metric"), record.get("mode")) == (metric, mode):
        self.best = record

  def update(self, step: int, metrics: dict, state) -> bool:
    """Saves `state` when `metrics[self.metric]` beats the best so far; True when it did."""
    if self.metric not in metrics:
      raise KeyError(f"config.keep_best metric {self.metric!r} is not among the evaluation "
                     f"metrics {sorted(metrics)}.")
    value = float(metrics[self.metric])
    if self.best is not None and not (value > self.best["value"] if self.mode == "max"
                                      else value < self.best["value"]):
      self.best["bad_evals"] = 0 if value == self.best["value"] else self.bad_evals + 1
      writers.write_json_atomic(self._record, self.best)
      return False
    self._checkpointer.save(step, state)
    self._checkpointer.wait()
    self.best = {"metric": self.metric, "mode": self.mode, "step": step, "value": value,
                 "bad_evals": 0}
    writers.write_json_atomic(self._record, self.best)
    return True

  @property
  def bad_evals(self) -> int:
    """Evaluations in a row since the last one at least as good as the best (0 before any)."""
    return (self.best or {}).get("bad_evals", 0)

  def restore(self, like):
    return self._checkpointer.restore(self.best["step"], like)

  def close(self):
    self._checkpointer.close()
