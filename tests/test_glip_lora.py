"""GLIP LoRA (the SDPT release's baseline): one LoRA linear and its gradients against loralib's
semantics in PyTorch, the whole tiny detector against a PyTorch GLIP whose targeted nn.Linear layers
get loralib's forward (through the official checkpoint, loaded around the LoRA params), plain GLIP
while B = 0, the trainable counts at GLIP-T/L size, bad settings, and (slow) training only LoRA
through the trainer."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_glip
from conftest import assert_only_trainable_changed, train_batches

from configs import sdpt_coco
from jaxprompt import optim, train
from jaxprompt.models import common
from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_lora

NUM_CLASSES, T = 4, 16
ALL_TARGETS = ("visual", "cross", "text")
# PyTorch module names (microsoft/GLIP's, as in the released checkpoints) -> our module paths.
TORCH_TO_OURS = (
    (r"backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv",
     r"backbone/body/layers_\1/blocks_\2/attn/qkv"),
    (r"rpn\.head\.dyhead_tower\.(\d+)\.b_attn\.attn\.(\w+)",
     r"head/dyhead_tower_\1/b_attn/attn/\2"),
    (r"language_backbone\.body\.model\.encoder\.layer\.(\d+)\.attention\.self\."
     r"(query|key|value)", r"language_backbone/encoder/layer_\1/attention/\2"),
)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def loralib_linear(x, weight, bias, lora_a, lora_b, scaling):
  """loralib.Linear's training forward (microsoft/LoRA loralib/layers.py, lora_dropout 0):
  weight (out, in), lora_A (r, in), lora_B (out, r)."""
  return F.linear(x, weight, bias) + (x @ lora_a.transpose(0, 1) @ lora_b.transpose(0, 1)) * scaling


def test_one_lora_linear_and_its_gradients_match_loralib_in_pytorch():
  rng = np.random.default_rng(0)
  fan_in, fan_out, rank, alpha = 24, 40, 4, 3.0
  x = rng.normal(size=(5, 7, fan_in)).astype(np.float32)
  weight, bias = rng.normal(size=(fan_out, fan_in)), rng.normal(size=fan_out)
  lora_a, lora_b = rng.normal(size=(rank, fan_in)), rng.normal(size=(fan_out, rank))
  cotangent = rng.normal(size=(5, 7, fan_out)).astype(np.float32)
  tensors = [torch.tensor(v, dtype=torch.float32, requires_grad=True)
             for v in (weight, bias, lora_a, lora_b)]
  out = loralib_linear(torch.from_numpy(x), *tensors, alpha / rank)
  (out * torch.from_numpy(cotangent)).sum().backward()

  def ours(a, b):  # our layout: kernel (in, out), lora_a (in, r), lora_b (r, out)
    kernel = glip_lora.lora_kernel(jnp.asarray(weight.T, jnp.float32), a, b, alpha / rank)
    return x @ kernel + jnp.asarray(bias, jnp.float32)

  a, b = jnp.asarray(lora_a.T, jnp.float32), jnp.asarray(lora_b.T, jnp.float32)
  assert rel_err(ours(a, b), out.detach().numpy()) <= 1e-4
  grad_a, grad_b = jax.grad(lambda a, b: jnp.sum(ours(a, b) * cotangent), argnums=(0, 1))(a, b)
  assert rel_err(grad_a, tensors[2].grad.numpy().T) <= 1e-4
  assert rel_err(grad_b, tensors[3].grad.numpy().T) <= 1e-4
  # loralib's init: lora_A kaiming_uniform_(a=sqrt(5)) over fan_in, lora_B zeros.
  bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3 / 256)
  pair = glip_lora.init_pair(jax.random.PRNGKey(0), 256, 64, 16)
  assert pair["lora_a"].shape == (256, 16) and pair["lora_b"].shape == (16, 64)
  assert 0.95 * bound < np.abs(pair["lora_a"]).max() <= bound
  assert not np.asarray(pair["lora_b"]).any()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """A random tiny PyTorch GLIP, its official-names checkpoint, and our LoRA GLIP (every target)
  with those weights loaded by the method's loader around freshly initialised pairs."""
  torch.manual_seed(0)
  reference = torch_glip.randomize_(torch_glip.GLIP("tiny", NUM_CLASSES)).eval()
  path = tmp_path_factory.mktemp("glip_lora") / "glip_tiny_random.pth"
  torch.save({"model": torch_glip.official_state_dict(reference)}, path)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 64, 96, 3)).astype(np.float32)
  ids = rng.integers(1, 100, size=(2, T)).astype(np.int32)
  mask = (np.arange(T)[None] < np.array([[12], [7]])).astype(np.int32)
  model = glip_lora.Model(num_classes=NUM_CLASSES, size="tiny", lora_targets=ALL_TARGETS)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids, mask))["params"]
  glip_shapes = {k: v for k, v in shapes.items() if k != glip_lora.LORA}
  lora = glip_lora.init_lora(jax.random.PRNGKey(1), glip_shapes, ALL_TARGETS, glip_lora.RANK)
  variables = glip_lora.METHOD.loaders["model"](
      {"params": {**glip_shapes, glip_lora.LORA: lora}}, str(path))
  plain = detector.Model(num_classes=NUM_CLASSES, size="tiny")
  return dict(reference=reference, model=model, variables=variables, shapes=shapes,
              args=(images, ids, mask), apply=jax.jit(model.apply), plain=plain,
              apply_plain=jax.jit(plain.apply))  # each compiled once for both tests


def test_glip_names_are_unchanged_and_b_zero_is_plain_glip_bit_for_bit(loaded):
  variables, args = loaded["variables"], loaded["args"]
  plain_shapes = jax.eval_shape(lambda: loaded["plain"].init(jax.random.PRNGKey(0), *args))[
      "params"]
  names = set(common.flatten(loaded["shapes"]))
  assert {n for n in names if not n.startswith("lora/")} == set(common.flatten(plain_shapes))
  labels = common.flatten(optim.param_labels(loaded["shapes"], glip_lora.TRAINABLE_PARAMS))
  assert {n for n, label in labels.items() if label == optim.TRAIN} == {
      n for n in names if re.fullmatch(r"lora/.+/lora_[ab]", n)}
  lora = common.flatten(variables["params"][glip_lora.LORA])
  assert not any(np.asarray(v).any() for n, v in lora.items() if n.endswith("lora_b"))
  glip_params = {k: v for k, v in variables["params"].items() if k != glip_lora.LORA}
  out, aux = loaded["apply"](variables, *args)
  plain_out, plain_aux = loaded["apply_plain"]({"params": glip_params}, *args)
  np.testing.assert_array_equal(out, plain_out)
  np.testing.assert_array_equal(aux["box_regression"], plain_aux["box_regression"])


def test_every_target_matches_loralib_layers_in_a_pytorch_glip(loaded):
  """Non-zero pairs on every targeted layer: the PyTorch GLIP with loralib's forward added to
  exactly those nn.Linear layers (hooks) gives our outputs; no other layer carries a pair."""
  variables, args = loaded["variables"], loaded["args"]
  rng = np.random.default_rng(2)
  lora = {n: (v if n.endswith("lora_a") else rng.normal(size=v.shape).astype(np.float32) * 0.5)
          for n, v in common.flatten(variables["params"][glip_lora.LORA]).items()}
  variables = {"params": {**variables["params"], glip_lora.LORA: common.unflatten(lora)}}
  scaling = glip_lora.ALPHA / glip_lora.RANK
  hooks, hooked = [], set()
  for name, module in loaded["reference"].named_modules():
    ours = next((re.sub(p, r, name) for p, r in TORCH_TO_OURS if re.fullmatch(p, name)), None)
    if ours is None or f"{ours}/lora_a" not in lora:
      continue
    lora_a = torch.tensor(np.asarray(lora[f"{ours}/lora_a"]).T)  # loralib's (r, in)
    lora_b = torch.tensor(np.asarray(lora[f"{ours}/lora_b"]).T)  # loralib's (out, r)
    hooks.append(module.register_forward_hook(
        lambda m, inputs, out, a=lora_a, b=lora_b: loralib_linear(
            inputs[0], m.weight, m.bias, a, b, scaling)))
    hooked.add(ours)
  assert hooked == {n.removesuffix("/lora_a") for n in lora if n.endswith("/lora_a")}
  images, ids, mask = args
  with torch.no_grad():
    expected = loaded["reference"](torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                   torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  for hook in hooks:
    hook.remove()
  logits, aux = loaded["apply"](variables, *args)
  assert rel_err(logits, expected["token_logits"].numpy()) <= 1e-4
  assert rel_err(aux["box_regression"], expected["box_regression"].numpy()) <= 1e-4
  glip_params = {k: v for k, v in variables["params"].items() if k != glip_lora.LORA}
  plain = loaded["apply_plain"]({"params": glip_params}, *args)[0]
  assert rel_err(logits, plain) > 1e-2  # the pairs do act


def count(names: dict, regex: str) -> float:
  return sum(math.prod(v.shape) for k, v in names.items() if re.fullmatch(regex, k)) / 1e6


@pytest.mark.parametrize("size,visual,cross,text,qkv_bias,glip", [
    ("T", 0.283, 1.475, 0.885, 0.013, 231.8), ("L", 1.155, 1.966, 0.885, 0.054, 430.4)])
def test_trainable_counts_at_glip_t_and_l(size, visual, cross, text, qkv_bias, glip):
  """The module docstring's counts at r = 16, from shapes only."""
  model = glip_lora.Model(num_classes=80, size=size, lora_targets=ALL_TARGETS)
  ids = jnp.zeros((1, 8), jnp.int32)
  flat = common.flatten(jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), ids, ids))["params"])
  for target, millions in (("visual", visual), ("cross", cross), ("text", text)):
    assert count(flat, f"lora/{glip_lora.TARGETS[target]}/lora_[ab]") == pytest.approx(
        millions, abs=5e-4)
  assert count(flat, glip_lora.LORA_PARAMS) == pytest.approx(visual + cross + text, abs=2e-3)
  assert count(flat, glip_lora.LORA_RELEASE) - count(flat, glip_lora.LORA_PARAMS) == \
      pytest.approx(qkv_bias, abs=5e-4)
  assert count(flat, r"(?!lora/).*") == pytest.approx(glip, abs=0.05)  # GLIP itself unchanged


def test_bad_settings_are_clear_errors():
  x, ids = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 8), jnp.int32)
  init = lambda **kw: jax.eval_shape(lambda: glip_lora.Model(num_classes=4, size="tiny", **kw)
                                     .init(jax.random.PRNGKey(0), x, ids, ids))
  with pytest.raises(ValueError, match=r"lora_rank=0; expected an integer >= 1"):
    init(lora_rank=0)
  with pytest.raises(ValueError, match=r"lora_rank=True; expected an integer"):
    init(lora_rank=True)
  with pytest.raises(ValueError, match=r"lora_alpha=-1.0; expected a number > 0"):
    init(lora_alpha=-1.0)
  with pytest.raises(ValueError, match=r"lora_targets=\('visual', 'mlp'\); expected distinct "
                                       r"names among \['cross', 'text', 'visual'\]"):
    init(lora_targets=("visual", "mlp"))
  with pytest.raises(ValueError, match=r"lora_targets=\(\)"):
    init(lora_targets=())
  with pytest.raises(ValueError, match=r"target 'visual' .* matches no Dense kernel"):
    glip_lora.targeted_kernels({"head": {"proj": {"kernel": jnp.zeros((2, 2))}}}, ["visual"])
  # Pairs of another target set (e.g. a checkpoint of a 'cross' run) are named, not misapplied.
  variables = jax.eval_shape(lambda: glip_lora.Model(num_classes=4, size="tiny", lora_targets=(
      "cross",)).init(jax.random.PRNGKey(0), x, ids, ids))
  with pytest.raises(ValueError, match=r"do not match lora_targets=\('visual', 'cross'\).*"
                                       r"backbone/body/layers_0/blocks_0/attn/qkv/lora_a: given "
                                       r"None, expected \(16, 16\)"):
    jax.eval_shape(lambda: glip_lora.Model(num_classes=4, size="tiny").apply(
        variables, x, ids, ids))


@pytest.mark.slow  # two GLIP compilations (init, train step): about a minute on two idle cores
def test_only_the_lora_params_train_and_the_loss_falls():
  config = sdpt_coco.get_config("runlocal,mask=paper")  # the tiny demo with SDPT's recipe
  config.unlock()
  config.model_name, config.trainable_params = "prompts.glip_lora", glip_lora.LORA_PARAMS
  config.model = dict(size="tiny", lora_targets=("visual", "cross"))
  config.batch_size, config.optim.lr, config.optim.warmup_steps = 4, 1e-2, 0
  exp = train.build(config)
  batch = train_batches(exp, 1)[0]
  before = common.flatten(jax.device_get(exp.state["params"]))
  labels = common.flatten(optim.param_labels(exp.state["params"], config.trainable_params))
  assert {k for k, v in labels.items() if v == optim.TRAIN} == {
      k for k in before if k.startswith("lora/")}
  state, losses = exp.state, []
  for step in range(3):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    if step == 1:  # step 1 moves B (A's gradient is 0 while B = 0), step 2 then moves A too
      assert_only_trainable_changed(before, common.flatten(jax.device_get(state["params"])),
                                    labels)
  assert losses[2] < losses[0], losses
  release = {k for k in before if re.fullmatch(glip_lora.LORA_RELEASE, k)}
  assert release - {k for k in before if k.startswith("lora/")} == {
      k for k in before if re.fullmatch(r"backbone/body/layers_\d/blocks_\d/attn/qkv/bias", k)}
