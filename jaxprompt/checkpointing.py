"""Orbax checkpoints of the train state: keep N, save every K steps and at the end, resume.

Only what training changes is saved: the trainable params, the optimizer state and the step (which
is also the input position: the train pipeline is deterministic and resumes at that step). The
frozen backbone comes back from `model_init` (or the seeded init), so a prompt-tuning checkpoint of
ViT-B is a few MB, not 350. Saves are asynchronous and atomic (orbax writes to a temporary folder
and renames it); `close()` waits for the last one.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` keyed by train step."""

  def __init__(self, directory: str, *, keep: int, every_steps: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step: int, like):
    """Restores `step` with the shapes, dtypes and shardings of the arrays in `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
