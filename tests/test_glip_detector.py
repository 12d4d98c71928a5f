"""The whole GLIP detector: parameter counts of GLIP-T/L, forward parity with a composed PyTorch
GLIP through a checkpoint under the official names, the loader's strictness, and the GLIP
fine-tuning method training on the embedded detection scenes."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_glip
from conftest import assert_only_trainable_changed, train_batches

from configs import glip_coco
from jaxprompt import optim, train
from jaxprompt.models import common
from jaxprompt.models.glip import checkpoint, detector
from jaxprompt.prompts import glip_finetune

NUM_CLASSES, T = 4, 32


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("size,expected_millions", [("T", 231.8), ("L", 430.4)])
def test_param_counts_are_glips_published_totals(size, expected_millions):
  assert detector.count_params(size) / 1e6 == pytest.approx(expected_millions, abs=0.05)


def test_level_shapes_follow_the_padding_rules():
  assert detector.level_shapes(800, 1333) == ((100, 167), (50, 84), (25, 42), (13, 21), (7, 11))
  assert detector.level_shapes(128, 128) == ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))


@pytest.fixture(scope="module")
def torch_checkpoint(tmp_path_factory):
  """A random tiny PyTorch GLIP, its official-names checkpoint on disk and its outputs."""
  torch.manual_seed(0)
  model = torch_glip.randomize_(torch_glip.GLIP("tiny", NUM_CLASSES)).eval()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 3, 96, 132)).astype(np.float32)  # not a multiple of 32 or 4*4
  ids = rng.integers(1, 100, size=(2, T)).astype(np.int32)
  mask = (np.arange(T)[None] < np.array([[20], [9]])).astype(np.int32)
  with torch.no_grad():
    out = model(torch.from_numpy(images), torch.from_numpy(ids).long(),
                torch.from_numpy(mask).long())
  state = torch_glip.official_state_dict(model)
  for level in range(5):  # maskrcnn_benchmark's AnchorGenerator buffers, in the released files
    state[f"module.rpn.anchor_generator.cell_anchors.{level}"] = torch.zeros(1, 4)
  path = tmp_path_factory.mktemp("glip") / "glip_tiny_random.pth"
  torch.save({"model": state, "iteration": 0}, path)
  return dict(path=str(path), images=images.transpose(0, 2, 3, 1), ids=ids, mask=mask,
              out={k: v.numpy() for k, v in out.items()})


def init_tiny(images, ids, mask, **kwargs):
  model = detector.Model(num_classes=NUM_CLASSES, size="tiny", **kwargs)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids, mask)
  return model, variables


def test_full_tiny_detector_matches_pytorch_through_the_official_checkpoint(torch_checkpoint):
  c = torch_checkpoint
  model, variables = init_tiny(c["images"], c["ids"], c["mask"])
  variables = checkpoint.load_glip(variables, c["path"])
  logits, aux = jax.jit(model.apply)(variables, c["images"], c["ids"], c["mask"])
  assert aux["level_shapes"] == detector.level_shapes(96, 132)
  errors = {"token_logits": rel_err(logits, c["out"]["token_logits"])}
  for key in ("box_regression", "centerness", "cls_logits"):
    errors[key] = rel_err(aux[key], c["out"][key])
  assert max(errors.values()) <= 1e-4, errors


def test_a_checkpoint_of_another_size_names_the_mismatched_keys(tmp_path, torch_checkpoint):
  bigger = torch_glip.GLIP("tiny", NUM_CLASSES, layers=3)  # one more fusion layer
  path = tmp_path / "three_layers.pth"
  torch.save({"model": torch_glip.official_state_dict(bigger)}, path)
  c = torch_checkpoint
  _, variables = init_tiny(c["images"], c["ids"], c["mask"])
  with pytest.raises(ValueError, match=r"(?s)in the checkpoint but not in the model.*"
                     r"head/dyhead_tower_6/b_attn"):
    checkpoint.load_glip(variables, str(path))
  state = {k: v.numpy() for k, v in torch_glip.official_state_dict(bigger).items()}
  state["module.roi_heads.box.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match="roi_heads.box.weight"):
    checkpoint.convert_glip(state, text_heads=2)


def test_dropout_droppath_and_dropblock_are_live_only_in_training(torch_checkpoint):
  c = torch_checkpoint
  model, variables = init_tiny(c["images"], c["ids"], c["mask"])
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(variables, c["images"], c["ids"], c["mask"], train=False)[0]
  eval_b = apply(variables, c["images"], c["ids"], c["mask"], train=False)[0]
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(variables, c["images"], c["ids"], c["mask"], train=True,
                  rngs={"dropout": jax.random.PRNGKey(1)})[0]
  train_b = apply(variables, c["images"], c["ids"], c["mask"], train=True,
                  rngs={"dropout": jax.random.PRNGKey(2)})[0]
  assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_method_trainable_set_and_freeze_switches():
  flat = common.flatten(jax.eval_shape(
      lambda: detector.Model(num_classes=3, size="tiny").init(
          jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 8), jnp.int32),
          jnp.zeros((1, 8), jnp.int32)))["params"])
  trains = lambda regex: {k for k in flat if re.fullmatch(regex, k)}
  everything = trains(glip_finetune.TRAINABLE_PARAMS)
  assert everything == {k for k in flat if not k.startswith("head/heads/cls_logits/")}
  frozen_body = trains(glip_finetune.freeze_regex(body=True, language=True))
  assert not any(k.startswith(("backbone/body/", "language_backbone/")) for k in frozen_body)
  assert any(k.startswith("backbone/fpn/") for k in frozen_body)
  odinw = trains(glip_finetune.freeze_regex(frozen_stages=2))  # FREEZE_CONV_BODY_AT 2
  assert everything - odinw == {k for k in everything
                                if k.startswith(("backbone/body/patch_embed/",
                                                 "backbone/body/layers_0/"))}
  with pytest.raises(ValueError, match=r"config.glip: unknown setting\(s\) \['anchors'\]"):
    glip_finetune.settings({"glip": {"anchors": 1}})


def demo_config(**overrides):
  config = glip_coco.get_config("runlocal")
  config.unlock()
  for key, value in overrides.items():
    config[key] = value
  return config


def test_glip_finetune_trains_the_tiny_detector_and_keeps_cls_logits_frozen():
  """On the embedded scenes: a few AdamW steps on one repeated batch lower GLIP's loss; every
  trained leaf moves and GLIP's frozen class head stays bit-identical."""
  config = demo_config(batch_size=4, eval_batch_size=4)
  # A constant lr over the few steps (GLIP's multi-step decay would cut it at 67 % of 4 steps).
  config.optim.warmup_steps, config.optim.lr, config.optim.decay = 1, 2e-3, "cosine"
  config.total_steps = 100
  exp = train.build(config)
  batch = train_batches(exp, 1)[0]
  assert batch["image"].shape == (4, 128, 128, 3) and batch["positive_map"].shape == (4, 8, 32)
  before = common.flatten(jax.device_get(exp.state["params"]))  # the step donates the state
  state, losses = exp.state, []
  for _ in range(6):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses
  labels = common.flatten(optim.param_labels(exp.state["params"], exp.method.trainable))
  assert labels["head/heads/cls_logits/kernel"] == optim.FROZEN
  assert_only_trainable_changed(before, common.flatten(jax.device_get(state["params"])), labels)


def test_glip_refuses_to_train_a_source_whose_caption_overflows():
  class Overflowing:
    name, caption_overflow = "lvis/v1", "The caption of 1203 classes is 7000 tokens"
  with pytest.raises(ValueError, match="lvis/v1.*cannot train GLIP here.*chunk_size"):
    glip_finetune.make_loss(demo_config(), Overflowing())
  glip_finetune.make_loss(demo_config(mode="eval"), Overflowing())  # evaluation is fine


@pytest.mark.slow
def test_a_full_size_glip_t_checkpoint_under_the_official_names_loads_and_runs(tmp_path):
  """GLIP-T at its real widths (231.8 M params): a random PyTorch GLIP-T saved as the released
  file is ('model' -> 'module.*'), loaded strictly and run on a small image; it gives the
  PyTorch outputs."""
  torch.manual_seed(0)
  reference = torch_glip.randomize_(torch_glip.GLIP("T", 80)).eval()
  path = tmp_path / "glip_tiny_model_o365_goldg_random.pth"
  torch.save({"model": torch_glip.official_state_dict(reference)}, path)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(1, 3, 96, 128)).astype(np.float32)
  ids = rng.integers(1, 30522, size=(1, 256)).astype(np.int32)
  mask = (np.arange(256)[None] < 40).astype(np.int32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(images), torch.from_numpy(ids).long(),
                         torch.from_numpy(mask).long())
  del reference
  model = detector.Model(num_classes=80, size="T")
  images = images.transpose(0, 2, 3, 1)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids, mask)
  variables = checkpoint.load_glip(variables, str(path))
  logits, aux = jax.jit(model.apply)(variables, images, ids, mask)
  assert rel_err(logits, expected["token_logits"].numpy()) <= 1e-4
  assert rel_err(aux["box_regression"], expected["box_regression"].numpy()) <= 1e-4
