"""ResNet CLIP towers through the spine: their BatchNorm statistics ride in `model_state`.

CoOp keeps the whole CLIP in eval mode (frozen statistics, bit-identical after training); LMPT
follows its seed's `model.train()` on the whole model (statistics drift and are checkpointed);
zero-shot runs on a ResNet tower too. The tower's own parity against PyTorch is in test_clip.py
(`test_resnet_parity_from_torchscript_archive`).
"""
import jax
import numpy as np
from flax import traverse_util

from configs import coop as coop_config
from configs import lmpt_voc_lt
from jaxprompt import evaluators, train, zeroshot
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error


def resnet_config(get_config, steps: int):
  config = get_config("variant=RN-mu")
  config.pp.image_size = 64  # RN-mu's input size
  config.pp.train = "resize(64)|flip_lr|value_range(0, 1)|normalize('clip')"
  config.pp.eval = "resize(64)|value_range(0, 1)|normalize('clip')"
  config.total_steps = steps
  config.batch_size = 32
  return config


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_coop_on_a_resnet_tower_trains_the_context_with_frozen_batch_norm():
  exp = train.build(resnet_config(coop_config.get_config, 40))
  stats_before = flat(exp.state["model_state"]["batch_stats"])
  assert any(k.startswith("clip/visual/bn1/") for k in stats_before)
  params_before = flat(exp.state["params"])
  zero_shot = zeroshot.evaluate(exp, ["a photo of a {}."], "test")["test/accuracy"]
  state, losses = run_steps(exp, exp.total_steps, seed=0)
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.05, losses
  assert_only_trainable_changed(params_before, flat(state["params"]), flat(exp.labels))
  for name, value in flat(state["model_state"]["batch_stats"]).items():
    np.testing.assert_array_equal(value, stats_before[name], err_msg=name)
  assert exp.checkpointed(state)["model_state"] == {}  # nothing but the context to save
  metrics = evaluators.run_all(exp.evaluators, train.variables(state))
  assert 0.0 <= zero_shot <= 1.0 and 0.0 <= metrics["test/accuracy"] <= 1.0
  assert metrics["test/examples"] == 1000


def test_lmpt_on_a_resnet_tower_moves_batch_norm_statistics_as_its_seed(tmp_path):
  config = resnet_config(lmpt_voc_lt.get_config, 4)
  config.checkpoint_every_steps = 2
  exp = train.build(config)
  stats_before = flat(exp.state["model_state"]["batch_stats"])
  state, _ = run_steps(exp, 2, seed=0)
  stats_after = flat(state["model_state"]["batch_stats"])
  assert any(not np.array_equal(stats_after[k], stats_before[k]) for k in stats_before)
  saved = exp.checkpointed(state)["model_state"]["batch_stats"]
  assert set(flat(saved)) == set(stats_before)
  # Through the trainer: a resumed run restores the drifted statistics with the context.
  first = train.train_and_evaluate(config, str(tmp_path))
  config.total_steps = 6
  resumed = train.train_and_evaluate(config, str(tmp_path))
  assert first["step"] == 4 and resumed["step"] == 6 and np.isfinite(resumed["test/mAP"])
