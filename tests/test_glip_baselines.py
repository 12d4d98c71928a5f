"""SDPT's PEFT baselines in GLIP (prompts/glip_vpt.py, glip_maple.py, glip_upt.py): their small new
pieces against PyTorch computations of the release's modules, the Swin hooks they use (VPT's
prompts through GLIP's detection Swin, a vector at patch (0, 0)), the trainable counts at GLIP-T/L
size (`jax.eval_shape`), bad settings and, marked slow (a tiny GLIP's train step takes ~30 s to
compile on two cores), training only each baseline's params through `jaxprompt.train`."""
from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import assert_only_trainable_changed, train_batches

from configs import sdpt_coco
from jaxprompt import optim, train
from jaxprompt.models import common, swin
from jaxprompt.models.glip import backbone, detector
from jaxprompt.prompts import glip_maple, glip_upt, glip_vpt, vpt_swin


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_params(module, *args, seed=0, scale=0.3, **kw):
  """Random params (LayerNorm scales near 1) from the init's shapes, without compiling the init."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw)["params"])
  rng = np.random.default_rng(seed)
  return common.unflatten({
      name: (1.0 if name.endswith("scale") else 0.0) + scale * rng.normal(size=x.shape).astype(
          np.float32) for name, x in common.flatten(shapes).items()})


def torch_linear(layer) -> dict:
  out = {"kernel": layer.weight.detach().numpy().T}
  if layer.bias is not None:
    out["bias"] = layer.bias.detach().numpy()
  return out


# --- the new pieces against PyTorch ---------------------------------------------------------------

def test_maple_coupling_matches_the_release_mlp_in_pytorch():
  """maple_coupling_proj: Linear(768, H, no bias), ReLU, Linear(H, D, no bias), ReLU."""
  torch.manual_seed(0)
  fc1, fc2 = torch.nn.Linear(48, 12, bias=False), torch.nn.Linear(12, 8, bias=False)
  lang = torch.rand(48) * 2 - 1  # the release's U(-1, 1) vector
  with torch.no_grad():
    expected = torch.relu(fc2(torch.relu(fc1(lang)))).numpy()
  ours = glip_maple.CouplingMlp(12, 8).apply(
      {"params": {"fc1": torch_linear(fc1), "fc2": torch_linear(fc2)}}, lang.numpy())
  assert expected.shape == (8,) and np.any(expected > 0)
  assert rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("tokens", [1, 3])
def test_upt_block_matches_the_release_upt_in_pytorch(tokens):
  """U0 = MHA_1head(U, U, U) + ln(U); U^ = FFN(ln(U0)) + ln(U0), one LayerNorm, on (L, E) seeds
  (the release's L = 1; L = 3 makes the query and key projections count)."""
  torch.manual_seed(1)
  width, ffn = 16, 10
  attention = torch.nn.MultiheadAttention(width, num_heads=1)
  ffn_0, ffn_2, ln = torch.nn.Linear(width, ffn), torch.nn.Linear(ffn, width), torch.nn.LayerNorm(
      width)
  with torch.no_grad():
    for p in list(attention.parameters()) + list(ln.parameters()):
      p.add_(0.2 * torch.randn(p.shape))
    seeds = torch.randn(tokens, 1, width)  # (L, N, E), batch_first=False as the release
    u0 = attention(seeds, seeds, seeds)[0] + ln(seeds)
    expected = (ffn_2(torch.relu(ffn_0(ln(u0)))) + ln(u0))[:, 0].numpy()
  params = {
      "sa_in_proj": {"kernel": attention.in_proj_weight.detach().numpy().T,
                     "bias": attention.in_proj_bias.detach().numpy()},
      "sa_out_proj": torch_linear(attention.out_proj),
      "ffn_0": torch_linear(ffn_0), "ffn_2": torch_linear(ffn_2),
      "ln": {"scale": ln.weight.detach().numpy(), "bias": ln.bias.detach().numpy()}}
  ours = glip_upt.UnifiedPromptBlock(ffn).apply({"params": params}, seeds[:, 0].numpy())
  assert rel_err(ours, expected) <= 1e-4


def test_upt_init_follows_pytorch_and_its_seed_is_drawn_per_step_in_training():
  block = glip_upt.UnifiedPromptBlock(10)
  params = block.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
  bound = math.sqrt(6 / (16 + 48))  # xavier-uniform over in_proj's (48, 16)
  assert np.abs(params["sa_in_proj"]["kernel"]).max() <= bound
  assert not np.any(params["sa_in_proj"]["bias"]) and not np.any(params["sa_out_proj"]["bias"])
  assert np.abs(params["ffn_2"]["kernel"]).max() <= 1 / math.sqrt(10)
  model = glip_upt.Model(num_classes=4, size="tiny")
  seed = lambda train, key: nn.apply(lambda m: m.seed(0, 8, train), model)(
      {}, rngs={"dropout": jax.random.PRNGKey(key)})
  np.testing.assert_array_equal(seed(False, 1), seed(False, 2))  # evaluation: one fixed seed
  assert not np.allclose(seed(True, 1), seed(True, 2))


# --- the Swin hooks -----------------------------------------------------------------------------

TINY_BODY = dict(variant="pico", window_size=2)


def test_patch_delta_is_added_to_patch_00_after_the_patch_norm():
  body = backbone.SwinBody(**TINY_BODY)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 40, 3)), jnp.float32)
  params = random_params(body, images)
  delta = jnp.linspace(-1.0, 1.0, 16)

  def add_at_00(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, swin.PatchEmbed) and context.method_name == "__call__":
      out = out.at[:, 0, 0].add(delta)
    return out

  def outputs(p):  # one compile for the three runs
    with nn.intercept_methods(add_at_00):
      expected = body.apply({"params": p}, images)
    return (body.apply({"params": p}, images, patch_delta=delta), expected,
            body.apply({"params": p}, images))

  for ours, expected, plain in zip(*jax.jit(outputs)(params)):
    assert rel_err(ours, expected) <= 1e-5
    assert not np.allclose(ours, plain)


def test_vpt_prompts_in_glip_swin_are_vpt_swins():
  """GLIP's Swin body with VPT-deep prompts (`glip_vpt.expand_prompts` of the tables) gives the
  stage maps of `vpt_swin.Model` with the same weights and tables (whose prompt blocks and merging
  are checked against KMnP/vpt in test_swin_prompts.py), through GLIP's output norms."""
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 128, 128, 3)), jnp.float32)
  reference = vpt_swin.Model(num_classes=2, num_prompts=3, deep=True, **TINY_BODY)
  params = random_params(reference, images)
  body = backbone.SwinBody(**TINY_BODY)
  body_params = {**{k: v for k, v in params.items() if k.startswith(("patch_embed", "layers_"))},
                 **{k: v for k, v in random_params(body, images, seed=2).items()
                    if k.startswith("norm")}}
  depths = swin.decode_variant("pico")["depths"]
  tables = {i: params[f"deep_prompt_embeddings_{i}"] for i in range(4)}
  prompts, deep = glip_vpt.expand_prompts(params["prompt_embeddings"], tables, depths, 2)
  def outputs(p, p_body):  # one compile for the three runs
    return (body.apply({"params": p_body}, images, prompts=prompts, deep_prompts=deep,
                       prompted_stage=vpt_swin.PromptedStage),
            reference.apply({"params": p}, images)[1]["stages"],
            body.apply({"params": p_body}, images)[3])

  ours, stages, no_prompts = jax.jit(outputs)(params, body_params)

  def layer_norm(x, norm):
    x = np.asarray(x, np.float64)
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return x * norm["scale"] + norm["bias"]

  expected = [stages[0]] + [layer_norm(stages[i], body_params[f"norm{i}"]) for i in (1, 2, 3)]
  for i, (a, b) in enumerate(zip(ours, expected)):
    assert a.shape == b.shape, i
    assert rel_err(a, b) <= 1e-4, i
  assert not np.allclose(no_prompts, ours[3])


# --- sizes, counts, bad settings --------------------------------------------------------------

def param_shapes(model) -> dict:
  text = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             text, text))["params"]
  flat = common.flatten(shapes)
  return {name: x.shape for name, x in flat.items()}


@pytest.mark.parametrize("size,vpt_count,maple_count,upt_count", [
    ("T", 441_600, 83_712, 56_064), ("L", 1_804_800, 185_088, 222_720)])
def test_trainable_counts_at_glip_t_and_l(size, vpt_count, maple_count, upt_count):
  """The counts the module docstrings state; the default set is exactly the params outside GLIP's
  parts."""
  for model, regex, count in ((glip_vpt.Model, glip_vpt.PROMPTS, vpt_count),
                              (glip_maple.Model, glip_maple.MAPLE, maple_count),
                              (glip_upt.Model, glip_upt.UPT, upt_count)):
    shapes = param_shapes(model(num_classes=80, size=size))
    new = {k: v for k, v in shapes.items()
           if k.split("/")[0] not in ("backbone", "language_backbone", "head")}
    assert sorted(k for k in shapes if re.fullmatch(regex, k)) == sorted(new)
    assert sum(math.prod(v) for v in new.values()) == count, model.__module__
  width = 192 if size == "L" else 96
  assert shapes["upt_image/ffn_0/kernel"] == (width, width)


def test_text_side_adds_to_the_first_text_position_only():
  """`text_side=True`: the text vector (MaPLe) or the text UPT's output (768 -> 100 -> 768 on
  GLIP-T/L) goes to row 0 of `text_delta`; without it the text UPT is not built."""
  delta = detector.first_token_delta(jnp.arange(1.0, 4.0), 5)
  np.testing.assert_array_equal(delta, np.pad([[1.0, 2.0, 3.0]], ((0, 4), (0, 0))))
  with_text = param_shapes(glip_upt.Model(num_classes=4, size="tiny", text_side=True))
  text = detector.text_width("tiny")
  assert with_text["upt_text/ffn_0/kernel"] == (text, glip_upt.TEXT_FFN_DIM)
  assert with_text["upt_text/sa_in_proj/kernel"] == (text, 3 * text)
  assert not any(k.startswith("upt_text") for k in param_shapes(
      glip_upt.Model(num_classes=4, size="tiny")))


def test_bad_settings_are_clear_errors():
  for bad in (0, -3, 2.5):
    with pytest.raises(ValueError, match="num_prompts"):
      glip_vpt.Model(num_classes=4, size="tiny", num_prompts=bad)
  with pytest.raises(ValueError, match="prompt_dropout"):
    glip_vpt.Model(num_classes=4, size="tiny", prompt_dropout=1.0)
  with pytest.raises(ValueError, match="coupling_hidden"):
    glip_maple.Model(num_classes=4, size="tiny", coupling_hidden=0)
  model = glip_vpt.Model(num_classes=4, size="tiny", num_prompts=2)
  text = jnp.ones((1, 5), jnp.int32)
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 64, 3)), text,
                                      text))


# --- training through jaxprompt.train (slow: one tiny-GLIP train step compile each) -----------

BASELINES = {
    "vpt": (glip_vpt, glip_vpt.PROMPTS, dict(num_prompts=2)),
    "maple": (glip_maple, glip_maple.MAPLE, {}),
    "upt": (glip_upt, glip_upt.UPT, {}),
}


def neutral(name, params):
  """MaPLe with a zero vector; UPT with a zero LayerNorm and last FFN layer (module docstrings)."""
  if name == "maple":
    return {**params, "maple_lang_input": jnp.zeros_like(params["maple_lang_input"])}
  upt = dict(params["upt_image"])
  for part in ("ln", "ffn_2"):
    upt[part] = jax.tree.map(jnp.zeros_like, upt[part])
  return {**params, "upt_image": upt}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_trains_only_its_params_in_the_sdpt_recipe(name):
  _, regex, fields = BASELINES[name]
  config = sdpt_coco.get_config("runlocal,mask=full")
  config.unlock()
  config.model_name, config.trainable_params = f"prompts.glip_{name}", regex
  # Deterministic GLIP (no dropout, drop path, DropBlock), a constant lr: the loss of one batch
  # must fall (UPT's seeds still change per step).
  config.model.update(fields, drop_path_rate=0.0, drop_block_prob=0.0, dropout=0.0,
                      fusion_dropout=0.0)
  config.batch_size, config.total_steps, config.optim.milestones = 4, 100, ()
  config.optim.lr, config.optim.warmup_steps = 1e-2, 1
  config.optim.param_groups = ()  # GLIP's bias group: VPT's and MaPLe's sets have no biases
  exp = train.build(config)
  batch = train_batches(exp, 1)[0]
  args = (batch["image"], batch["text_ids"], batch["text_mask"])
  params = exp.state["params"]
  logits = jax.jit(lambda p: exp.model.apply({"params": p}, *args)[0])
  plain = detector.Model(num_classes=4, size="tiny")
  glip_params = {k: v for k, v in params.items() if k in jax.eval_shape(
      lambda: plain.init(jax.random.PRNGKey(0), *args))["params"]}
  plain_logits = jax.jit(lambda p: plain.apply({"params": p}, *args)[0])(glip_params)
  ours = logits(params)
  assert ours.shape == plain_logits.shape
  if name == "vpt":
    assert not np.allclose(ours, plain_logits)  # prompts are never neutral
  else:
    np.testing.assert_allclose(logits(neutral(name, params)), plain_logits, rtol=1e-6, atol=1e-6)
  before = common.flatten(jax.device_get(params))
  labels = common.flatten(optim.param_labels(params, regex))
  state, losses = exp.state, []
  for _ in range(4):  # the same batch: the loss must fall
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    if len(losses) == 2:
      assert_only_trainable_changed(before, common.flatten(jax.device_get(state["params"])),
                                    labels)
  assert losses[-1] < losses[0], losses
