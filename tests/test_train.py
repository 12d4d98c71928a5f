"""Trainer spine: prompt-only updates, resume, NaN stop, bad input, and the loss really falls."""
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from input_pipeline import pipeline
from jaxprompt import optim, train
from jaxprompt.models import common
from conftest import assert_only_trainable_changed, tiny_config, train_batches  # pylint: disable=import-error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_frozen_params_bit_identical_and_without_optimizer_state():
  exp = train.build(tiny_config())
  before = jax.device_get(exp.state["params"])
  state = exp.state
  for batch in train_batches(exp, 3):
    state, _ = exp.train_step(state, batch)
  after = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  before = traverse_util.flatten_dict(before, sep="/")
  trained = {k for k, v in labels.items() if v == optim.TRAIN}
  assert trained == {"prompt_embeddings", "deep_prompt_embeddings", "head/kernel", "head/bias"}
  assert_only_trainable_changed(before, after, labels)
  # Optimizer state exists for trained leaves only: its size is the trainable size (momentum).
  state_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert state_size == sum(after[k].size for k in trained)


def test_tiny_training_lowers_the_loss(tmp_path):
  config = tiny_config(total_steps=60, batch_size=32, log_every_steps=20,
                       checkpoint_every_steps=1000, **{"optim.lr": 0.5})
  exp = train.build(config)
  batches = train_batches(exp, 1) * 60  # fit one batch: the loss must fall clearly
  state, losses = exp.state, []
  for batch in batches:
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def _final_trainable(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    restored = manager.restore(manager.latest_step())
  return manager.latest_step(), traverse_util.flatten_dict(restored["params"], sep="/")


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, monkeypatch):
  config = tiny_config(total_steps=6, checkpoint_every_steps=3, log_every_steps=3)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

  real = pipeline.make_train_dataset

  class Interrupted(Exception):
    pass

  def crashing_dataset(*args, **kwargs):  # dies when asked for the 5th batch of the first run
    batches = real(*args, **kwargs).as_numpy_iterator()

    class It:
      def as_numpy_iterator(self):
        for i, b in enumerate(batches):
          if i == 4 and kwargs["start_step"] == 0:
            raise Interrupted()
          yield b
    return It()

  monkeypatch.setattr(pipeline, "make_train_dataset", crashing_dataset)
  with pytest.raises(Interrupted):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _final_trainable(str(tmp_path / "resumed"))[0] == 3
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  step_a, params_a = _final_trainable(str(tmp_path / "straight"))
  step_b, params_b = _final_trainable(str(tmp_path / "resumed"))
  assert step_a == step_b == 6
  for name in params_a:
    np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)
  assert resumed["test/accuracy"] == straight["test/accuracy"]
  assert os.path.exists(tmp_path / "resumed" / "metrics.json")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(total_steps=8, checkpoint_every_steps=1, log_every_steps=1,
                       **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.warmup_epochs": 0})
  with pytest.raises(FloatingPointError, match="non-finite") as error:
    train.train_and_evaluate(config, str(tmp_path))
  step, params = _final_trainable(str(tmp_path))
  assert f"The last finite checkpoint is step {step}," in str(error.value)
  assert all(np.isfinite(v).all() for v in params.values())


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match="not writable"):
    train.train_and_evaluate(tiny_config(), str(blocker / "workdir"))


def test_trainable_regex_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    train.build(tiny_config(trainable_params="nothing/.*"))


def _run(args, env=None, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})})


def test_cli_unknown_config_key_is_an_error(tmp_path):
  result = _run(["-m", "jaxprompt.main", "--config", "configs/vpt_vtab.py:runlocal",
                 "--config.no_such_key=1", f"--workdir={tmp_path}"])
  assert result.returncode != 0
  assert "no_such_key" in result.stderr


def test_cli_unknown_config_argument_is_an_error(tmp_path):
  result = _run(["-m", "jaxprompt.main", "--config", "configs/vpt_vtab.py:no_such_arg=1",
                 f"--workdir={tmp_path}"])
  assert result.returncode != 0
  assert "no_such_arg" in result.stderr


def test_cli_runlocal_trains_and_writes_metrics(tmp_path):
  result = _run(["-m", "jaxprompt.main", "--config", "configs/vpt_vtab.py:runlocal",
                 f"--workdir={tmp_path}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test/accuracy" in result.stdout and "steps/s" in result.stdout
  assert "trainable:" in result.stdout
  assert (tmp_path / "metrics.json").exists()
  eval_only = _run(["-m", "jaxprompt.main", "--config", "configs/vpt_vtab.py:runlocal",
                    "--config.mode=eval", f"--workdir={tmp_path}"])
  assert eval_only.returncode == 0, eval_only.stderr[-3000:]
  assert "resumed from" in eval_only.stdout


def test_ema_for_eval_evaluates_the_moving_average_of_the_trained_params():
  exp = train.build(tiny_config(**{"optim.ema_decay": 0.5, "optim.ema_for_eval": True}))
  state = exp.state
  for batch in train_batches(exp, 2):
    state, _ = exp.train_step(state, batch)
  ema = common.flatten(jax.device_get(optim.ema_of(state["opt_state"])))
  params = common.flatten(jax.device_get(state["params"]))
  seen = common.flatten(jax.device_get(exp.evaluated(state)["params"]))
  labels = common.flatten(exp.labels)
  assert ema and set(ema) == {k for k, v in labels.items() if v == optim.TRAIN}
  for name, value in seen.items():
    np.testing.assert_array_equal(value, ema[name] if name in ema else params[name])
  assert any(not np.array_equal(ema[k], params[k]) for k in ema)
  with pytest.raises(ValueError, match="optim.ema_for_eval=True: expected False unless"):
    train.build(tiny_config(**{"optim.ema_for_eval": True}))
