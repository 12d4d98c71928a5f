"""Tests for jaxprompt/models/glip/fusion.py and heads.py (GLIP's VLFuse, in-head BERT layer and
prediction heads), against the PyTorch reference in tests/torch_glip_fusion_heads.py with random
weights loaded through our converters, at a tiny size."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_glip_fusion_heads as ref
from jaxprompt.models import common
from jaxprompt.models.glip import fusion
from jaxprompt.models.glip import heads

V_DIM, L_DIM, EMBED, HEADS, LENGTH, BATCH = 32, 32, 64, 2, 32, 2
MLP_DIM, NUM_CLASSES = 64, 5
VALID = (20, 9)  # valid text tokens per row; the rest is padding
LEVEL_SETS = {
    "square": ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1)),
    "non_square": ((12, 20), (6, 10), (3, 5), (2, 3), (1, 2)),
}


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def inputs(sizes, seed=0):
  """(NHWC levels, text hidden, 0/1 text mask) as numpy float32 / int32."""
  rng = np.random.default_rng(seed)
  levels = [rng.normal(size=(BATCH, h, w, V_DIM)).astype(np.float32) for h, w in sizes]
  hidden = rng.normal(size=(BATCH, LENGTH, L_DIM)).astype(np.float32)
  mask = (np.arange(LENGTH)[None] < np.array(VALID)[:, None]).astype(np.int32)
  return levels, hidden, mask


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def perturb_(module, seed=0):
  """Random LayerNorm affines, biases and scalars so that every mapped parameter counts."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "LayerNorm.weight" in name or "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith("bias") or "gamma" in name or name.endswith(("scale", "bias0")):
        p.add_(0.1 * noise)
  return module


def state_dict_numpy(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def load(converted, init_params, what):
  """Strict merge: the converter must produce exactly the model's names and shapes."""
  return common.merge_params(converted, init_params, source=what)


# ---------------------------------------------------------------------------------------------
# Fusion block.
# ---------------------------------------------------------------------------------------------

def fusion_model(**kwargs):
  return fusion.BiAttentionBlock(V_DIM, L_DIM, EMBED, HEADS, init_values=0.5, **kwargs)


@functools.cache
def fusion_setup(level_set, projection_gain=1.0):
  """(torch VLFuse in eval mode, our model, our params converted from it, inputs)."""
  torch.manual_seed(0)
  reference = perturb_(ref.VLFuse(V_DIM, L_DIM, EMBED, HEADS, init_values=0.5)).eval()
  with torch.no_grad():  # a large gain on the score projections makes the +-5e4 clamps bind
    reference.b_attn.attn.v_proj.weight.mul_(projection_gain)
    reference.b_attn.attn.l_proj.weight.mul_(projection_gain)
  levels, hidden, mask = inputs(LEVEL_SETS[level_set])
  model = fusion_model()
  init = jax.jit(functools.partial(model.init, deterministic=True))(
      jax.random.PRNGKey(0), levels, hidden, mask)["params"]
  params = load(fusion.convert_fusion(state_dict_numpy(reference)), init, "VLFuse")
  return reference, model, params, (levels, hidden, mask)


@functools.cache
def fusion_apply(clamp=True):
  model = fusion_model(clamp_min=clamp, clamp_max=clamp)

  def apply(params, levels, hidden, mask, rng=None, extra_tokens=None):
    kwargs = dict(deterministic=rng is None, extra_tokens=extra_tokens)
    if rng is not None:
      kwargs["rngs"] = {"dropout": rng}
    return model.apply({"params": params}, levels, hidden, mask, **kwargs)
  return jax.jit(apply)


@pytest.mark.parametrize("level_set", sorted(LEVEL_SETS))
def test_fusion_parity(level_set):
  reference, _, params, (levels, hidden, mask) = fusion_setup(level_set)
  new_levels, new_hidden = fusion_apply()(params, levels, hidden, mask)
  with torch.no_grad():
    ref_levels, ref_hidden = reference([nchw(x) for x in levels], torch.from_numpy(hidden),
                                       torch.from_numpy(mask).long())
  assert [x.shape for x in new_levels] == [x.shape for x in levels]
  for ours, theirs in zip(new_levels, ref_levels):
    assert rel_err(ours, theirs.numpy().transpose(0, 2, 3, 1)) < 1e-4
  assert rel_err(new_hidden, ref_hidden.numpy()) < 1e-4


def test_fusion_parity_when_the_clamps_bind():
  reference, _, params, (levels, hidden, mask) = fusion_setup("square", projection_gain=400.0)
  new_levels, new_hidden = fusion_apply()(params, levels, hidden, mask)
  with torch.no_grad():
    t_levels, t_hidden = reference([nchw(x) for x in levels], torch.from_numpy(hidden),
                                   torch.from_numpy(mask).long())
    scores = reference.b_attn.attn.v_proj(reference.b_attn.layer_norm_v(
        torch.from_numpy(levels[0].reshape(BATCH, -1, V_DIM))))
  assert float(scores.abs().max()) > 1.0  # the gain reached the scores ...
  for ours, theirs in zip(new_levels, t_levels):
    assert rel_err(ours, theirs.numpy().transpose(0, 2, 3, 1)) < 1e-4
  assert rel_err(new_hidden, t_hidden.numpy()) < 1e-4
  # ... and the clamps change the result: without them the image side is one-hot, not tied.
  unclamped_levels, _ = fusion_apply(clamp=False)(params, levels, hidden, mask)
  assert rel_err(unclamped_levels[0], new_levels[0]) > 1e-3


def test_fusion_gradients():
  reference, _, params, (levels, hidden, mask) = fusion_setup("non_square")
  rng = np.random.default_rng(1)
  level_weights = [rng.normal(size=x.shape).astype(np.float32) for x in levels]
  hidden_weights = rng.normal(size=hidden.shape).astype(np.float32)
  apply = fusion_apply()

  def scalar(levels, hidden):
    new_levels, new_hidden = apply(params, levels, hidden, mask)
    return (sum(jnp.sum(x * w) for x, w in zip(new_levels, level_weights))
            + jnp.sum(new_hidden * hidden_weights))

  grad_levels, grad_hidden = jax.grad(scalar, argnums=(0, 1))(levels, hidden)
  t_levels = [nchw(x).requires_grad_() for x in levels]
  t_hidden = torch.from_numpy(hidden).requires_grad_()
  out_levels, out_hidden = reference(t_levels, t_hidden, torch.from_numpy(mask).long())
  total = (sum((x * nchw(w)).sum() for x, w in zip(out_levels, level_weights))
           + (out_hidden * torch.from_numpy(hidden_weights)).sum())
  total.backward()
  for ours, theirs in zip(grad_levels, t_levels):
    assert rel_err(ours, theirs.grad.numpy().transpose(0, 2, 3, 1)) < 1e-4
  assert rel_err(grad_hidden, t_hidden.grad.numpy()) < 1e-4


@pytest.mark.parametrize("extra", [(0, 0), (3, 2)])
def test_bi_attention_backward_equals_autodiff_with_dropout_and_binding_clamps(extra):
  """`fusion.bi_attention`'s written-out backward against autodiff of the plain steps (clamp,
  text-side max subtraction, two softmaxes, dropout's keep masks, SDPT's extra rows/columns),
  with scores large enough that the +-5e4 clamps bind."""
  extra_rows, extra_cols = extra
  batch, heads, n, t, d = 2, 2, 12, 7, 4
  rng = np.random.default_rng(3)
  normal = lambda *shape, scale=1.0: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  query, key = normal(batch, heads, n + extra_rows, d), normal(batch, heads, t + extra_cols, d)
  query = query.at[:, :, :2].multiply(4e4)  # two image rows whose scores hit the clamps
  value_v, value_l = normal(batch, heads, n + extra_rows, d), normal(batch, heads, t + extra_cols, d)
  mask = (rng.random((batch, t + extra_cols)) > 0.3).astype(np.float32)
  image_bias = jnp.where(mask == 0, fusion.IMAGE_SIDE_MASK_VALUE, mask)[:, None, None, :]
  keep = lambda *shape: jnp.asarray((rng.random(shape) > 0.25) / 0.75, jnp.float32)
  keep_v, keep_l = keep(batch, heads, n, t + extra_cols), keep(batch, heads, n + extra_rows, t)
  weights = normal(batch, heads, n, d), normal(batch, heads, t, d)

  def plain(query, key, value_v, value_l):
    scores = fusion.clamp(jnp.einsum("bhnd,bhtd->bhnt", query, key))
    scores_l = scores[..., :t].swapaxes(-1, -2)
    scores_l = scores_l - scores_l.max(-1, keepdims=True)
    weights_l = jax.nn.softmax(fusion.clamp(scores_l), axis=-1) * keep_l.swapaxes(-1, -2)
    weights_v = jax.nn.softmax(scores[:, :, :n] + image_bias, axis=-1) * keep_v
    return weights_v @ value_l, weights_l @ value_v

  def written(query, key, value_v, value_l):
    return fusion.bi_attention(query, key, value_v, value_l, image_bias, keep_v, keep_l, n, t,
                               True, True)

  def loss(fn):
    return lambda *args: sum(jnp.sum(o * w) for o, w in zip(fn(*args), weights))

  args = (query, key, value_v, value_l)
  scores = jnp.einsum("bhnd,bhtd->bhnt", query, key)
  assert float(scores.min()) < -fusion.CLAMP_VALUE and float(scores.max()) > fusion.CLAMP_VALUE
  for ours, theirs in zip(written(*args), plain(*args)):
    assert rel_err(ours, theirs) < 1e-5
  grads = jax.grad(loss(written), argnums=(0, 1, 2, 3))(*args)
  expected = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args)
  for ours, theirs in zip(grads, expected):
    assert rel_err(ours, theirs) < 1e-4


def test_fusion_dropout_only_in_training():
  _, _, params, (levels, hidden, mask) = fusion_setup("square")
  apply = fusion_apply()
  eval_levels, eval_hidden = apply(params, levels, hidden, mask)
  train_a = apply(params, levels, hidden, mask, rng=jax.random.PRNGKey(1))
  train_b = apply(params, levels, hidden, mask, rng=jax.random.PRNGKey(2))
  assert rel_err(train_a[0][0], eval_levels[0]) > 1e-3
  assert rel_err(train_a[1], eval_hidden) > 1e-3
  assert rel_err(train_a[1], train_b[1]) > 1e-3
  # Deterministic application ignores any dropout RNG.
  model = fusion_model()
  apply_with_rng = lambda rng: model.apply({"params": params}, levels, hidden, mask,
                                           deterministic=True, rngs={"dropout": rng})[1]
  np.testing.assert_array_equal(apply_with_rng(jax.random.PRNGKey(3)),
                                apply_with_rng(jax.random.PRNGKey(4)))


def test_fusion_ignores_padded_text_values():
  _, _, params, (levels, hidden, mask) = fusion_setup("square")
  apply = fusion_apply()
  noisy = hidden.copy()
  noisy[mask == 0] = 100.0 * np.random.default_rng(5).normal(size=noisy[mask == 0].shape)
  base_levels, base_hidden = apply(params, levels, hidden, mask)
  new_levels, new_hidden = apply(params, levels, noisy, mask)
  for ours, theirs in zip(new_levels, base_levels):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  valid = mask.astype(bool)  # valid text rows attend to visual tokens only
  np.testing.assert_allclose(np.asarray(new_hidden)[valid], np.asarray(base_hidden)[valid],
                             atol=1e-5, rtol=0)


def test_fusion_extra_tokens():
  _, _, params, (levels, hidden, mask) = fusion_setup("non_square")
  apply = fusion_apply()
  base_levels, base_hidden = apply(params, levels, hidden, mask)
  empty = (np.zeros((1, 0, V_DIM), np.float32), np.zeros((1, 0, L_DIM), np.float32))
  for extra in (None, empty):
    new_levels, new_hidden = apply(params, levels, hidden, mask, extra_tokens=extra)
    for ours, theirs in zip(new_levels, base_levels):
      np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(new_hidden, base_hidden)

  rng = np.random.default_rng(7)
  p_v = rng.normal(size=(1, 3, V_DIM)).astype(np.float32)
  p_l = rng.normal(size=(1, 3, L_DIM)).astype(np.float32)
  new_levels, new_hidden = apply(params, levels, hidden, mask, extra_tokens=(p_v, p_l))
  assert new_hidden.shape == hidden.shape
  # Image queries never see the (masked) text-side extras; text queries do see P_v.
  for ours, theirs in zip(new_levels, base_levels):
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
  assert rel_err(new_hidden, base_hidden) > 1e-3
  # P_l feeds only masked columns and dropped rows: it has no effect; a per-sample P_v works.
  other_l = np.broadcast_to(rng.normal(size=(BATCH, 3, L_DIM)), (BATCH, 3, L_DIM))
  again = apply(params, levels, hidden, mask,
                extra_tokens=(np.repeat(p_v, BATCH, 0), other_l.astype(np.float32)))
  np.testing.assert_allclose(again[1], new_hidden, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="extra_tokens P_l"):
    fusion_model().apply({"params": params}, levels, hidden, mask,
                         extra_tokens=(p_v, p_l[:, :2]))


def test_fusion_bad_inputs():
  _, model, params, (levels, hidden, mask) = fusion_setup("square")
  with pytest.raises(ValueError, match="visual level 2"):
    model.apply({"params": params}, levels[:2] + [levels[2][..., :8]] + levels[3:], hidden, mask)
  with pytest.raises(ValueError, match="lang_mask"):
    model.apply({"params": params}, levels, hidden, mask[:, :5])


def test_convert_fusion_rejects_unknown_and_missing_names():
  reference, *_ = fusion_setup("square")
  state = state_dict_numpy(reference)
  state["b_attn.attn.q_proj.weight"] = state.pop("b_attn.attn.v_proj.weight")
  with pytest.raises(ValueError, match=r"(?s)unknown.*q_proj.*missing.*b_attn\.attn\.v_proj"):
    fusion.convert_fusion(state)


# ---------------------------------------------------------------------------------------------
# In-head BERT layer.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extreme", [False, True])
def test_bert_layer_parity(extreme):
  torch.manual_seed(1)
  reference = perturb_(ref.BertEncoderLayer(L_DIM, HEADS, MLP_DIM), seed=1).eval()
  if extreme:  # the attention-logit and intermediate clamps bind
    with torch.no_grad():
      reference.attention.self.query.weight.mul_(1e5)
      reference.intermediate.dense.weight.mul_(1e6)
  _, hidden, mask = inputs(LEVEL_SETS["square"], seed=2)
  with torch.no_grad():
    expected = reference(torch.from_numpy(hidden), torch.from_numpy(mask).long()).numpy()
    if extreme:
      raw = reference.intermediate.dense(torch.from_numpy(hidden))
      assert float(raw.abs().max()) > 2 * fusion.CLAMP_VALUE
  model = fusion.ClampedBertLayer(MLP_DIM, HEADS)
  init = model.init(jax.random.PRNGKey(0), hidden, mask)["params"]
  params = load(fusion.convert_bert_layer(state_dict_numpy(reference), num_heads=HEADS), init,
                "BertEncoderLayer")
  out = jax.jit(model.apply)({"params": params}, hidden, mask)
  assert rel_err(out, expected) < 1e-4
  # Dropout is live only in training.
  trained = model.apply({"params": params}, hidden, mask, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(1)})
  assert rel_err(trained, out) > 1e-3


def test_convert_bert_layer_names():
  reference = ref.BertEncoderLayer(L_DIM, HEADS, MLP_DIM)
  state = state_dict_numpy(reference)
  assert set(state) == set(fusion.BERT_LAYER_NAMES)
  params = fusion.convert_bert_layer(state, num_heads=HEADS)
  assert params["attention"]["query"]["kernel"].shape == (L_DIM, HEADS, L_DIM // HEADS)
  assert params["attention"]["out"]["kernel"].shape == (HEADS, L_DIM // HEADS, L_DIM)
  del state["output.LayerNorm.bias"]
  state["layer.output.LayerNorm.bias"] = np.zeros(L_DIM, np.float32)
  with pytest.raises(ValueError, match=r"layer\.output\.LayerNorm\.bias.*missing.*output"):
    fusion.convert_bert_layer(state, num_heads=HEADS)


# ---------------------------------------------------------------------------------------------
# Prediction heads.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("level_set,log_scale", [("square", None), ("non_square", None),
                                                 ("square", -15.0)])
def test_heads_parity(level_set, log_scale):
  torch.manual_seed(2)
  reference = perturb_(ref.PredictionHeads(V_DIM, L_DIM, NUM_CLASSES), seed=2).eval()
  if log_scale is not None:  # logits / exp(-15) reach the +-5e4 clamp
    with torch.no_grad():
      reference.log_scale.fill_(log_scale)
  levels, hidden, _ = inputs(LEVEL_SETS[level_set], seed=3)
  with torch.no_grad():
    expected = {k: v.numpy() for k, v in
                reference.predict([nchw(x) for x in levels], torch.from_numpy(hidden)).items()}
  model = heads.PredictionHeads(NUM_CLASSES)
  init = model.init(jax.random.PRNGKey(0), levels, hidden)["params"]
  params = load(heads.convert_heads(state_dict_numpy(reference)), init, "VLDyHead heads")
  out = jax.jit(model.apply)({"params": params}, levels, hidden)
  num_tokens = sum(h * w for h, w in LEVEL_SETS[level_set])
  assert out["token_logits"].shape == (BATCH, num_tokens, LENGTH)
  assert out["box_regression"].shape == (BATCH, num_tokens, 4)
  assert out["centerness"].shape == (BATCH, num_tokens)
  assert out["cls_logits"].shape == (BATCH, num_tokens, NUM_CLASSES)
  for key, value in expected.items():
    assert rel_err(out[key], value) < 1e-4, key
  if log_scale is not None:
    assert np.max(np.abs(expected["token_logits"])) == fusion.CLAMP_VALUE


def test_heads_init_and_converter_names():
  levels, hidden, _ = inputs(LEVEL_SETS["square"])
  params = heads.PredictionHeads(NUM_CLASSES).init(jax.random.PRNGKey(0), levels, hidden)["params"]
  np.testing.assert_allclose(params["bias0"], [-np.log(99.0)], rtol=1e-6)
  np.testing.assert_allclose(params["cls_logits"]["bias"], -np.log(99.0), rtol=1e-6)
  np.testing.assert_array_equal(params["log_scale"], [0.0])
  np.testing.assert_array_equal(params["bias_lang"], np.zeros(L_DIM))
  assert [float(params[f"scales_{i}"]["scale"][0]) for i in range(5)] == [1.0] * 5
  assert 0.005 < float(np.std(params["bbox_pred"]["kernel"])) < 0.015
  reference = ref.PredictionHeads(V_DIM, L_DIM, NUM_CLASSES)
  assert set(state_dict_numpy(reference)) == set(heads.head_names())
  with pytest.raises(ValueError, match=r"(?s)unknown.*dyhead_tower\.0\.x.*missing.*scales\.4"):
    state = state_dict_numpy(reference)
    del state["scales.4.scale"]
    state["dyhead_tower.0.x"] = np.zeros(1, np.float32)
    heads.convert_heads(state)


# ---------------------------------------------------------------------------------------------
# Full-size parameter counts (GLIP-T: v 256, l 768, E 2048, 8 heads; BERT-base layer).
# ---------------------------------------------------------------------------------------------

def test_full_size_param_counts():
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  levels = [jax.ShapeDtypeStruct((1, s, s, 256), jnp.float32) for s in (4, 2, 1, 1, 1)]
  hidden = jax.ShapeDtypeStruct((1, 256, 768), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 256), jnp.int32)
  key = jax.random.PRNGKey(0)
  fuse = fusion.BiAttentionBlock(256, 768, 2048, 8, init_values=1 / 6)
  assert count(jax.eval_shape(fuse.init, key, levels, hidden, mask)) == 6_303_744  # ~6.30 M
  layer = fusion.ClampedBertLayer(3072, 12)
  assert count(jax.eval_shape(layer.init, key, hidden, mask)) == 7_087_872  # ~7.09 M
  head = heads.PredictionHeads(80)
  shapes = jax.eval_shape(head.init, key, levels, hidden)["params"]
  assert shapes["dot_product_projection_text"]["kernel"].shape == (768, 256)
  assert shapes["cls_logits"]["kernel"].shape == (1, 1, 256, 80)
