"""Runs and workdirs: no silent resume of another run, spine keys checked at start, evaluation
settings checked before the first step, a NaN guard that never saves NaN, corrupt checkpoints,
one TensorBoard value per metric and step, and the command line's own errors."""
import glob
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from configs import common
from jaxprompt import checkpointing, config_checks, main, method, run_record, train

from conftest import tiny_config  # pylint: disable=import-error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def checkpoint_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


# --- 2. A workdir belongs to one run --------------------------------------------------------------

def test_resume_refuses_other_settings_and_accepts_schedule_only_changes(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2), workdir)
  assert checkpoint_steps(workdir) == [2]
  for key, value in (("optim.lr", 0.3), ("seed", 7), ("model.num_prompts", 3),
                     ("dataset", "embedded/named_shapes")):
    with pytest.raises(run_record.RunMismatchError, match="--config.overwrite=True") as error:
      train.train_and_evaluate(tiny_config(total_steps=4, **{key: value}), workdir)
    assert key in str(error.value)
  assert checkpoint_steps(workdir) == [2]  # nothing was touched
  # Logging, evaluation and checkpoint intervals and the length of the run may change.
  final = train.train_and_evaluate(
      tiny_config(total_steps=4, checkpoint_every_steps=4, log_every_steps=1,
                  **{"evals.test.every_steps": 3}), workdir)
  assert final["step"] == 4 and checkpoint_steps(workdir) == [2, 4]
  # overwrite=True starts a new run from step 0 with the new settings.
  train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=1, seed=7,
                                       overwrite=True), workdir)
  assert checkpoint_steps(workdir) == [1, 2]
  assert run_record.flat_config(tiny_config(seed=7))["seed"] == 7


def test_default_workdir_includes_the_config_arguments():
  assert main.default_workdir("configs/vpt_vtab.py") == os.path.join("workdirs", "vpt_vtab")
  assert main.default_workdir("configs/vpt_vtab.py:task=dtd,num_prompts=10") == os.path.join(
      "workdirs", "vpt_vtab_task=dtd,num_prompts=10")
  assert main.default_workdir("c/x.py:root=/a b") == os.path.join("workdirs", "x_root=_a_b")


# --- 3. Spine keys and method sizes are checked at start -----------------------------------------

@pytest.mark.parametrize("key,value", [
    ("log_every_steps", 0), ("checkpoint_every_steps", 0), ("keep_checkpoints", 0),
    ("batch_size", 0), ("total_steps", -1), ("eval_batch_size", -8), ("mode", "fit"),
    ("optim.lr", float("nan")), ("optim.lr", -1.0), ("optim.grad_accum_steps", 0),
    ("optim.name", "lamb"), ("label_smoothing", 1.0), ("compute_dtype", "int8"),
    ("keep_best", ("val/accuracy", "max")), ("keep_best", ("test/accuracy", "best")),
    ("mesh.model", 0)])
def test_bad_spine_values_are_refused_before_building(key, value):
  with pytest.raises(config_checks.ConfigError, match=f"config.{key}="):
    train.build(tiny_config(**{key: value}))


@pytest.mark.parametrize("key,value", [("model.num_prompts", 0), ("model.prompt_dropout", 1.0)])
def test_bad_method_sizes_are_refused_before_training(key, value):
  with pytest.raises(ValueError, match=f"config.{key}={value}; expected"):
    train.build(tiny_config(**{key: value}))


def test_sa2vp_inter_dim_is_checked():
  from jaxprompt.prompts import sa2vp, sa2vp_swin  # pylint: disable=import-outside-toplevel
  for model in (sa2vp.Model, sa2vp_swin.Model):
    with pytest.raises(ValueError, match="config.model.inter_dim=0; expected an integer >= 1"):
      model(num_classes=3, inter_dim=0)


# --- 4. Evaluation settings are checked before the first step -----------------------------------

def test_unknown_eval_split_fails_before_training(tmp_path, monkeypatch):
  steps = []
  real_loop = train._train_loop  # pylint: disable=protected-access
  monkeypatch.setattr(train, "_train_loop", lambda *a, **k: steps.append(1) or real_loop(*a, **k))
  with pytest.raises(ValueError, match="Unknown split 'validation'.*valid splits"):
    train.train_and_evaluate(tiny_config(evals=common.evals("test", "validation")),
                             str(tmp_path))
  assert not steps and checkpoint_steps(str(tmp_path)) == []


EIGHT_DEVICES = r"""
import json
from configs import vpt_vtab
from jaxprompt import train
config = vpt_vtab.get_config()  # the demo: eval_batch_size 250 on 8 devices
config.total_steps = 2
config.optim.warmup_epochs = 0
final = train.train_and_evaluate(config, WORKDIR)
print("RESULT" + json.dumps(final))
"""


def test_demo_eval_batch_is_padded_for_eight_devices(tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES.replace("WORKDIR", repr(str(
      tmp_path)))], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = __import__("json").loads(proc.stdout.split("RESULT")[-1])
  assert final["test/examples"] == 1000  # every example once, the padding masked out
  assert "eval_batch_size 250 -> 256" in proc.stdout


# --- 5. The README's own-images command; unknown keys are one line -------------------------------

def _run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "jaxprompt.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_cli_dataset_kwargs_root_trains_on_an_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c, name in enumerate(("cats", "dogs")):
      os.makedirs(tmp_path / "data" / split / name)
      for i in range(4):
        pixels = np.full((20, 24, 3), 60 + 120 * c, np.uint8) + rng.integers(0, 20, (20, 24, 3),
                                                                             dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / split / name / f"{i}.png")
  result = _run_cli("--config", "configs/vpt_vtab.py:runlocal", "--config.dataset=folder",
                    f"--config.dataset_kwargs.root={tmp_path / 'data'}",
                    f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test/examples" in open(tmp_path / "run" / "metrics.json").read()


def test_cli_unknown_key_is_one_line(tmp_path):
  result = _run_cli("--config", "configs/vpt_vtab.py:runlocal", "--config.foo=1",
                    "--config.optim.lrr=2", f"--workdir={tmp_path}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      "jaxprompt: Unknown config key --config.foo; valid keys: batch_size,")
  result = _run_cli("--config", "configs/vpt_vtab.py:runlocal", "--config.optim.lrr=2",
                    f"--workdir={tmp_path}")
  assert "Unknown config key --config.optim.lrr; valid keys of optim:" in result.stderr


def test_overrides_may_add_keys_only_under_dataset_kwargs():
  file_config = tiny_config()
  config = tiny_config()
  config.dataset_kwargs.root = "/data"
  config_checks.check_overrides(config, file_config)
  config.model.num_promts = 3
  with pytest.raises(config_checks.ConfigError, match="--config.model.num_promts; valid keys of "
                     "model: deep, num_prompts, prompt_dropout, variant"):
    config_checks.check_overrides(config, file_config)


# --- 6. The NaN guard never saves NaN -------------------------------------------------------------

def test_nan_from_the_first_step_saves_no_checkpoint(tmp_path, monkeypatch):
  # Default intervals: the first check is at step log_every_steps, long after step 1 (which orbax
  # used to save unasked, NaN included).
  monkeypatch.setattr(method, "cross_entropy_loss", lambda config, source: (
      lambda logits, aux, batch: jnp.full(logits.shape[:1], jnp.nan)))
  config = tiny_config(total_steps=8, log_every_steps=4, checkpoint_every_steps=500)
  with pytest.raises(FloatingPointError, match="by step 4.*No checkpoint was saved"):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint_steps(str(tmp_path)) == []


# --- 9. Corrupt checkpoints: fall back with a warning, or refuse; never restart from 0 -----------

def _small_checkpoints(directory, steps=(1, 2, 3)):
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  like = {"a": jnp.arange(64.0), "step": jnp.zeros((), jnp.int32)}
  for step in steps:
    ckpt.save(step, {"a": like["a"] + step, "step": jnp.asarray(step, jnp.int32)})
  ckpt.close()
  return like


def _truncate(folder):
  for path in glob.glob(os.path.join(folder, "**"), recursive=True):
    if os.path.isfile(path) and os.path.getsize(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(folder):
  for path in glob.glob(os.path.join(folder, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(os.urandom(64))


def _delete_manifests(folder):
  for path in glob.glob(os.path.join(folder, "**", "manifest.ocdbt"), recursive=True):
    os.remove(path)
  for path in glob.glob(os.path.join(folder, "**", "_sharding"), recursive=True):
    os.remove(path)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _delete_manifests])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
  directory = str(tmp_path / "checkpoints")
  like = _small_checkpoints(directory)
  damage(os.path.join(directory, "3"))
  warnings = []
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  step, state = ckpt.restore_latest(like, warn=warnings.append)
  assert step == 2 and float(state["a"][0]) == 2.0
  assert len(warnings) == 1 and "step 3 is unusable" in warnings[0]
  assert "falling back to step 2" in warnings[0]
  assert os.path.isdir(tmp_path / "corrupt_checkpoints" / "3")
  ckpt.save(3, {"a": like["a"], "step": jnp.asarray(3, jnp.int32)})  # the step can be saved again
  ckpt.close()


def test_corrupt_checkpoint_with_strict_resume_is_refused(tmp_path):
  directory = str(tmp_path / "checkpoints")
  like = _small_checkpoints(directory)
  _truncate(os.path.join(directory, "3"))
  with pytest.raises(checkpointing.ResumeError, match="step 3 .*strict_resume=True"):
    checkpointing.Checkpointer(directory, keep=5).restore_latest(like, strict=True)
  assert os.path.isdir(os.path.join(directory, "3"))  # left where it was


def test_no_readable_checkpoint_is_an_error_not_a_restart(tmp_path):
  directory = str(tmp_path / "checkpoints")
  like = _small_checkpoints(directory, steps=(1, 2))
  for step in ("1", "2"):
    _garbage(os.path.join(directory, step))
  with pytest.raises(checkpointing.ResumeError, match="Not restarting from step 0"):
    checkpointing.Checkpointer(directory, keep=5).restore_latest(like, warn=lambda _: None)


def test_non_finite_checkpoint_is_not_resumed(tmp_path):
  directory = str(tmp_path / "checkpoints")
  like = _small_checkpoints(directory, steps=(1,))
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  ckpt.save(2, {"a": like["a"] * jnp.nan, "step": jnp.asarray(2, jnp.int32)})
  ckpt.wait()
  warnings = []
  step, _ = ckpt.restore_latest(like, warn=warnings.append)
  assert step == 1 and "non-finite" in warnings[0]
  ckpt.close()


def test_training_resumes_from_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=2), workdir)
  _truncate(os.path.join(workdir, "checkpoints", "4"))
  final = train.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=2), workdir)
  assert final["step"] == 4 and checkpoint_steps(workdir) == [2, 4]


# --- 12. TensorBoard: each metric once per step --------------------------------------------------

def test_tensorboard_has_each_metric_once_per_step(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=4, log_every_steps=2), str(tmp_path))
  events = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert len(events) == 1
  accumulator = event_accumulator.EventAccumulator(events[0], size_guidance={"tensors": 0})
  accumulator.Reload()
  tags = accumulator.Tags()["tensors"]
  assert {"train/loss", "train/lr", "test/accuracy"} <= set(tags)
  for tag in tags:
    steps = [event.step for event in accumulator.Tensors(tag)]
    assert len(steps) == len(set(steps)), (tag, steps)
  assert [e.step for e in accumulator.Tensors("train/loss")] == [2, 4]
  assert [e.step for e in accumulator.Tensors("test/accuracy")] == [4]


def test_clip_prompt_methods_check_n_ctx():
  from jaxprompt.prompts import coop, lmpt, rpl  # pylint: disable=import-outside-toplevel
  for model in (coop.Model, lmpt.Model, rpl.Model):
    with pytest.raises(ValueError, match="config.model.n_ctx=0; expected an integer >= 1"):
      model(num_classes=3, n_ctx=0)
  with pytest.raises(ValueError, match="class_token_position='back'; expected 'end', 'middle'"):
    coop.Model(num_classes=3, class_token_position="back")


def test_infinite_optimizer_state_is_not_a_corrupt_checkpoint(tmp_path):
  # The plateau rule starts its best-so-far at -inf; such a checkpoint resumes normally.
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=5)
  like = {"params": jnp.ones(3), "opt_state": jnp.full((), -jnp.inf)}
  ckpt.save(1, like)
  ckpt.wait()
  assert ckpt.restore_latest(like, strict=True)[0] == 1
  ckpt.close()


def test_eval_mode_needs_an_evaluator():
  config = tiny_config(mode="eval")
  config.evals = ml_collections.ConfigDict()
  with pytest.raises(config_checks.ConfigError, match="config.evals=.*at least one evaluator"):
    train.build(config)
