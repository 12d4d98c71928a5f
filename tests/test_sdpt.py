"""SDPT: the prototype operation in one fusion layer against a PyTorch computation of the release's
equations, the consequences the spec derives (image side unchanged, P_l without effect, U's
gradient only through P_v), the two trainable sets at GLIP-T/L size, bad settings, and training
only the chosen set on the embedded scenes."""
from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_glip_backbone
import torch_glip_fusion_heads as ref
from conftest import assert_only_trainable_changed, train_batches

from configs import sdpt_coco, sdpt_odinw
from jaxprompt import method, optim, train
from jaxprompt.models import common
from jaxprompt.models.glip import detector, fusion
from jaxprompt.prompts import glip_finetune, sdpt

V_DIM, L_DIM, EMBED, HEADS, K, T = 32, 48, 64, 2, 5, 12
LEVELS = ((6, 7), (3, 4), (2, 2), (1, 1), (1, 1))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def layer():
  """A random torch VLFuse, our block with its weights, inputs and prototypes U."""
  torch.manual_seed(0)
  reference = torch_glip_backbone.randomize_(
      ref.VLFuse(V_DIM, L_DIM, EMBED, HEADS, init_values=0.5)).eval()
  rng = np.random.default_rng(0)
  levels = [rng.normal(size=(2, h, w, V_DIM)).astype(np.float32) for h, w in LEVELS]
  hidden = rng.normal(size=(2, T, L_DIM)).astype(np.float32)
  mask = (np.arange(T)[None] < np.array([[9], [5]])).astype(np.int32)
  prototypes = rng.uniform(-1, 1, size=(K, EMBED)).astype(np.float32)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  params = fusion.convert_fusion(state)
  block = fusion.BiAttentionBlock(V_DIM, L_DIM, EMBED, HEADS, init_values=0.5)
  return dict(reference=reference, block=block, params=params, levels=levels, hidden=hidden,
              mask=mask, prototypes=prototypes)


def tokens_of(params, prototypes):
  attn = params["b_attn"]["attn"]
  return (sdpt.to_input_space(prototypes, attn["v_proj"])[None],
          sdpt.to_input_space(prototypes, attn["l_proj"])[None])


def run(layer, extra_tokens=None, visible=False, params=None):
  return layer["block"].apply({"params": params or layer["params"]}, layer["levels"],
                              layer["hidden"], layer["mask"], extra_tokens=extra_tokens,
                              extra_text_visible=visible)


def test_prototype_layer_matches_the_release_equations_in_pytorch(layer):
  """P_v = (U - b_q) pinv(W_q), P_l = (U - b_k) pinv(W_k) appended after the LayerNorms, K masked
  text columns, last K rows dropped before the layer-scale residual (torch.pinverse)."""
  levels, new_hidden = run(layer, tokens_of(layer["params"], layer["prototypes"]))
  b_attn = layer["reference"].b_attn
  with torch.no_grad():
    u = torch.from_numpy(layer["prototypes"])
    p_v = (u - b_attn.attn.v_proj.bias) @ torch.pinverse(b_attn.attn.v_proj.weight.t())
    p_l = (u - b_attn.attn.l_proj.bias) @ torch.pinverse(b_attn.attn.l_proj.weight.t())
    v = torch.cat([torch.from_numpy(x).flatten(1, 2) for x in layer["levels"]], 1)
    v, l = b_attn.layer_norm_v(v), b_attn.layer_norm_l(torch.from_numpy(layer["hidden"]))
    n, batch = v.shape[1], v.shape[0]
    v_aug = torch.cat([v, p_v[None].expand(batch, -1, -1)], 1)
    l_aug = torch.cat([l, p_l[None].expand(batch, -1, -1)], 1)
    mask = torch.cat([torch.from_numpy(layer["mask"]), torch.zeros(batch, K, dtype=torch.int32)],
                     1)
    dv, dl = b_attn.attn(v_aug, l_aug, mask)
    expected_v = v + b_attn.gamma_v * dv[:, :n]
    expected_l = l + b_attn.gamma_l * dl[:, :T]
  ours_v = np.concatenate([x.reshape(2, -1, V_DIM) for x in levels], 1)
  assert rel_err(ours_v, expected_v.numpy()) <= 1e-4
  assert rel_err(new_hidden, expected_l.numpy()) <= 1e-4


def test_image_side_is_plain_glip_and_p_l_has_no_effect(layer):
  plain_levels, plain_hidden = run(layer)
  tokens = tokens_of(layer["params"], layer["prototypes"])
  levels, hidden = run(layer, tokens)
  for a, b in zip(levels, plain_levels):  # (a): image tokens never see the masked P_l
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert not np.allclose(hidden, plain_hidden, atol=1e-4)  # (b): text attends to P_v
  other = (tokens[0], jnp.asarray(np.random.default_rng(1).normal(size=tokens[1].shape)))
  levels_other, hidden_other = run(layer, other)  # (c): any P_l gives the same kept outputs
  np.testing.assert_array_equal(hidden_other, hidden)
  for a, b in zip(levels_other, levels):
    np.testing.assert_array_equal(a, b)
  visible_levels, _ = run(layer, tokens, visible=True)  # the paper's reading: images see P_l
  assert not np.allclose(visible_levels[0], plain_levels[0], atol=1e-4)


def test_the_gradient_reaches_the_prototypes_through_p_v_only(layer):
  def loss(p_v, p_l):
    levels, hidden = run(layer, (p_v, p_l))
    return sum(jnp.sum(x ** 2) for x in levels) + jnp.sum(hidden ** 2)
  p_v, p_l = tokens_of(layer["params"], layer["prototypes"])
  grad_v, grad_l = jax.grad(loss, argnums=(0, 1))(p_v, p_l)
  assert np.abs(grad_v).max() > 0 and np.abs(grad_l).max() == 0
  # ... and nothing flows into the frozen projections through the pseudo-inverse.
  kernel_grad = jax.grad(lambda w: jnp.sum(sdpt.to_input_space(
      jnp.asarray(layer["prototypes"]), {"kernel": w, "bias": jnp.zeros(EMBED)})))(
          jnp.ones((V_DIM, EMBED)))
  assert not np.abs(kernel_grad).any()


def count(tree, regex) -> int:
  flat = common.flatten(tree)
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if re.fullmatch(regex, k))


@pytest.mark.parametrize("size,paper,release", [("T", 8.60, 62.8), ("L", 11.47, 83.7)])
def test_trainable_counts_of_both_masks(size, paper, release):
  model = sdpt.Model(num_classes=80, size=size)
  text = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             text, text))["params"]
  assert count(shapes, sdpt.SDPT_PAPER) / 1e6 == pytest.approx(paper, abs=0.005)
  assert count(shapes, sdpt.SDPT_RELEASE) / 1e6 == pytest.approx(release, abs=0.05)
  flat = common.flatten(shapes)
  release_names = {k for k in flat if re.fullmatch(sdpt.SDPT_RELEASE, k)}
  assert not any("/b_attn/" in k or k.startswith(("backbone/", "language_backbone/"))
                 or "cls_logits" in k for k in release_names)


def test_bad_settings_are_clear_errors():
  x, ids = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 8), jnp.int32)
  init = lambda **kw: jax.eval_shape(lambda: sdpt.Model(num_classes=4, size="tiny", **kw).init(
      jax.random.PRNGKey(0), x, ids, ids))
  with pytest.raises(ValueError, match="num_tokens=0; expected an integer >= 1"):
    init(num_tokens=0)
  with pytest.raises(ValueError, match=r"cpt_layers=\(5,\).*among 0..1.*has 2"):
    init(num_tokens=4, cpt_layers=(5,))
  model = sdpt.Model(num_classes=4, size="tiny", num_tokens=4)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, ids, ids)
  variables["params"]["prototypes_0"] = jnp.zeros((4, 32))  # e.g. prototypes of another GLIP
  with pytest.raises(flax.errors.ScopeParamShapeError,
                     match=r"prototypes_0.*shape \(4, 64\).*shape \(4, 32\)"):
    model.apply(variables, x, ids, ids)


def test_sdpt_trains_only_the_chosen_set_on_the_embedded_scenes():
  for name, mask in (("paper", sdpt.SDPT_PAPER), ("release", sdpt.SDPT_RELEASE)):
    config = sdpt_coco.get_config(f"runlocal,mask={name}")
    config.unlock()
    assert config.trainable_params == mask
    config.batch_size, config.total_steps = 4, 100
    config.optim.warmup_steps, config.optim.lr, config.optim.decay = 1, 2e-3, "cosine"
    exp = train.build(config)
    batch = train_batches(exp, 1)[0]
    before = common.flatten(jax.device_get(exp.state["params"]))
    state, losses = exp.state, []
    for _ in range(4):
      state, metrics = exp.train_step(state, batch)
      losses.append(float(metrics["loss"]))
    labels = common.flatten(optim.param_labels(exp.state["params"], mask))
    assert_only_trainable_changed(before, common.flatten(jax.device_get(state["params"])), labels)
    if mask == sdpt.SDPT_RELEASE:
      assert losses[-1] < 0.9 * losses[0], losses


def test_baselines_train_their_sets_in_the_same_detector():
  """GLIP's language prompt (a zero table: plain GLIP at the start), linear probe and BitFit."""
  config = sdpt_coco.get_config("runlocal,mask=language_prompt")
  config.unlock()
  config.batch_size = 4
  exp = train.build(config)
  batch = train_batches(exp, 1)[0]
  before = common.flatten(jax.device_get(exp.state["params"]))
  plain = detector.Model(num_classes=4, size="tiny", **{
      k: v for k, v in config.model.items() if k != "size"})
  glip_params = {k: v for k, v in exp.state["params"].items() if k != "tunable_linear"}
  args = (batch["image"], batch["text_ids"], batch["text_mask"])
  np.testing.assert_array_equal(exp.model.apply({"params": exp.state["params"]}, *args)[0],
                                plain.apply({"params": glip_params}, *args)[0])
  state, _ = exp.train_step(exp.state, batch)
  labels = common.flatten(optim.param_labels(exp.state["params"], exp.config.trainable_params))
  assert [k for k, v in labels.items() if v == optim.TRAIN] == ["tunable_linear"]
  assert_only_trainable_changed(before, common.flatten(jax.device_get(state["params"])), labels)
  names = list(before)
  probe = [k for k in names if re.fullmatch(glip_finetune.LINEAR_PROBE, k)]
  assert sorted(probe) == sorted(
      [f"head/heads/{m}/{p}" for m in ("bbox_pred", "centerness", "dot_product_projection_text")
       for p in ("bias", "kernel")] + ["head/heads/bias0", "head/heads/bias_lang",
                                       "head/heads/log_scale"])
  bitfit = [k for k in names if re.fullmatch(glip_finetune.BITFIT, k)]
  assert bitfit and all(k.endswith("/bias") and "cls_logits" not in k for k in bitfit)
  assert len(bitfit) == sum(k.endswith("/bias") for k in names) - 1  # all but cls_logits'


@pytest.mark.parametrize("mask", sorted(sdpt_coco.MASKS))
def test_every_mask_of_both_configs_resolves_to_its_method_and_set(mask):
  for config in (sdpt_coco.get_config(f"mask={mask}"), sdpt_odinw.get_config(f"mask={mask}"),
                 sdpt_coco.get_config(f"data=/coco,size=L,mask={mask}")):
    assert (config.model_name, config.trainable_params) == sdpt_coco.MASKS[mask]
    groups = [name for name, _ in config.optim.param_groups]
    assert "language" not in groups  # one lr for every trained set, as the release
    if mask == "language_prompt":
      assert (config.optim.lr, config.optim.weight_decay, config.model.dropout) == (0.05, 0.25, 0)
  # The set trains something, and AdamW's bias group (lr x2, no decay) exists exactly when the set
  # has biases (an empty named group is an error of optim.group_labels).
  config = sdpt_coco.get_config(f"mask={mask}")
  model = method.load_method(config.model_name).model(num_classes=4, **config.model)
  x, ids = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, ids, ids)["params"]
  trainable = optim.trainable_subset(params, optim.param_labels(params, config.trainable_params))
  names = common.flatten(trainable)
  assert names and ("bias" in dict(config.optim.param_groups)) == any(
      k.endswith("/bias") for k in names)
  optim.group_labels(config.optim, trainable)
  if mask in ("release", "paper", "vpt"):
    key = "num_prompts" if mask == "vpt" else "num_tokens"
    real = sdpt_coco.get_config(f"data=/coco,mask={mask}")
    assert (config.model[key], real.model[key]) == (8, 100 if mask == "vpt" else 700)
  real = sdpt_coco.get_config(f"data=/coco,size=L,mask={mask}")
  optim.make_optimizer(real.optim, trainable, total_steps=real.total_steps,  # builds, as training
                       warmup_steps=real.optim.warmup_steps)
  assert (real.total_steps, real.batch_size, real.model.frozen_stages) == (2000, 1, 1)
  assert real.optim.warmup_steps == 2000 and tuple(real.optim.milestones) == (0.67, 0.89)
  with pytest.raises(ValueError, match="mask='prompt'"):
    sdpt_coco.get_config("mask=prompt")


def test_pseudo_inverses_are_computed_once_and_follow_loaded_weights(tmp_path):
  """The model reads pinv(W_q), pinv(W_k) from its frozen collection (not an SVD per step); the
  SDPT loader recomputes them from the weights it loads; training W_q / W_k is refused."""
  x, ids = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 8), jnp.int32)
  model = sdpt.Model(num_classes=4, size="tiny", num_tokens=4)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x, ids, ids)
  attn = sdpt.fusion_attention(variables["params"], 1)
  np.testing.assert_allclose(variables[sdpt.INVERSES]["layer_1"]["l_proj"],
                             np.linalg.pinv(np.asarray(attn["l_proj"]["kernel"])), atol=1e-5)
  moved = jax.tree.map(lambda v: v * 2.0, variables["params"]["head"])  # e.g. loaded weights
  stale = {**variables, "params": {**variables["params"], "head": moved}}
  fresh = sdpt.with_inverses(stale)
  np.testing.assert_allclose(fresh[sdpt.INVERSES]["layer_0"]["v_proj"],
                             variables[sdpt.INVERSES]["layer_0"]["v_proj"] / 2.0, rtol=1e-4)
  without = {k: v for k, v in variables.items() if k != sdpt.INVERSES}
  with pytest.raises(ValueError, match="lack the 'sdpt_inverses' collection"):
    model.apply(without, x, ids, ids)
  config = sdpt_coco.get_config("runlocal")
  config.unlock()
  config.trainable_params = r"prototypes_\d+|head/dyhead_tower_0/b_attn/.*"
  with pytest.raises(ValueError, match="must stay frozen"):
    sdpt.make_loss(config, None)
