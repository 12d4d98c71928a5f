"""SA2VP on ViT: the local attention, the layer schedule, what trains, the loss, the recipe.

The full ViT-B/16 forward was also checked once against the original `vit_tinypara.py`
(tommy-xq/SA2VP at 35674e7, eval mode, shared random weights): max relative error 1.5e-6 for the
image logits and 8.2e-7 for the prompt logits. That code cannot ship here (not ours), so the tests
below pin each part of it instead.
"""
import itertools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import sa2vp_vtab
from jaxprompt import optim, train
from jaxprompt.models import common, vit
from jaxprompt.prompts import sa2vp
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error


def per_position_local_attention(q, k, v, grid_h, grid_w):
  """The reference's loop: CLS query over all keys; patch (r, c) over its clipped 3x3 patches.

  q, k, v: (H, 1 + N, Dh) numpy. Returns (H, 1 + N, Dh).
  """
  def attend(query, keys, values):
    logits = keys @ query / np.sqrt(query.shape[-1])
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()) @ values

  out = np.zeros_like(q)
  for h in range(q.shape[0]):
    out[h, 0] = attend(q[h, 0], k[h], v[h])
    for r, c in itertools.product(range(grid_h), range(grid_w)):
      neighbours = [1 + rr * grid_w + cc
                    for rr in range(max(r - 1, 0), min(r + 2, grid_h))
                    for cc in range(max(c - 1, 0), min(c + 2, grid_w))]
      t = 1 + r * grid_w + c
      out[h, t] = attend(q[h, t], k[h, neighbours], v[h, neighbours])
  return out


def test_local_mask_neighbourhood_sizes():
  mask = sa2vp.local_attention_mask(14, 14)
  assert mask.shape == (197, 197)
  assert mask[0].all() and not mask[1:, 0].any()
  counts = mask[1:, 1:].sum(1).reshape(14, 14)
  assert counts[0, 0] == counts[0, -1] == counts[-1, 0] == counts[-1, -1] == 4
  assert (counts[0, 1:-1] == 6).all() and (counts[1:-1, 0] == 6).all()
  assert (counts[1:-1, 1:-1] == 9).all()
  assert (sa2vp.local_attention_mask(3, 5, cls_token=False) == mask_without_cls(3, 5)).all()


def mask_without_cls(h, w):
  return sa2vp.local_attention_mask(h, w)[1:, 1:]


def test_vectorised_local_cross_attention_equals_per_position_loop():
  grid_h, grid_w, width, heads = 4, 5, 16, 2
  attention = vit.MultiHeadAttention(num_heads=heads)
  rng = np.random.default_rng(0)
  query = rng.normal(size=(1, 1 + grid_h * grid_w, width)).astype(np.float32)
  key_value = rng.normal(size=(1, 1 + grid_h * grid_w, width)).astype(np.float32)
  params = attention.init(jax.random.PRNGKey(0), query, key_value)["params"]
  params = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.3, params)
  got = attention.apply({"params": params}, query, key_value,
                        mask=sa2vp.local_attention_mask(grid_h, grid_w))

  def project(x, name):  # (L, D) -> (H, L, Dh)
    kernel, bias = (np.asarray(params[name][n]) for n in ("kernel", "bias"))
    return (np.einsum("ld,dhk->hlk", x, kernel) + bias[:, None])

  heads_out = per_position_local_attention(project(query[0], "query"), project(key_value[0], "key"),
                                           project(key_value[0], "value"), grid_h, grid_w)
  expected = np.einsum("hlk,hkd->ld", heads_out, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(got[0], expected, rtol=1e-5, atol=1e-5)


def test_shifted_view_local_attention_equals_per_position_loop():
  grid_h, grid_w, heads, head_dim = 4, 5, 2, 8
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, heads, 1 + grid_h * grid_w, head_dim)).astype(np.float32)
             for _ in range(3))
  got = sa2vp.local_cross_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                    (grid_h, grid_w))
  for b in range(2):
    expected = per_position_local_attention(q[b], k[b], v[b], grid_h, grid_w)
    np.testing.assert_allclose(got[b], expected.transpose(1, 0, 2).reshape(1 + grid_h * grid_w, -1),
                               rtol=1e-5, atol=1e-6)


def test_acc_variant_cross_attention_is_single_head_with_zero_padded_neighbours():
  """`vit_tinypara_acc.py`'s rule, per position: one head over all channels (scale D^-0.5); the
  CLS query over every key; patch (r, c) over 9 neighbours, the out-of-grid ones zero vectors."""
  grid_h, grid_w, heads, head_dim = 3, 4, 2, 4
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(1, heads, 1 + grid_h * grid_w, head_dim)).astype(np.float32)
             for _ in range(3))
  single = lambda x: jnp.asarray(x).transpose(0, 2, 1, 3).reshape(1, 1, -1, heads * head_dim)
  got = np.asarray(sa2vp.local_cross_attention(*(sa2vp._single_head(jnp.asarray(x))
                                                 for x in (q, k, v)),
                                               (grid_h, grid_w), zero_padded=True))[0]
  qs, ks, vs = (np.asarray(single(x))[0, 0] for x in (q, k, v))  # (L, D)

  def attend(query, keys, values):
    logits = keys @ query / np.sqrt(query.shape[-1])
    weights = np.exp(logits - logits.max())
    return (weights / weights.sum()) @ values

  np.testing.assert_allclose(got[0], attend(qs[0], ks, vs), rtol=1e-5, atol=1e-6)
  zero = np.zeros_like(ks[0])
  for r, c in itertools.product(range(grid_h), range(grid_w)):
    cells = [(r + dr, c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    inside = lambda rr, cc: 0 <= rr < grid_h and 0 <= cc < grid_w
    keys = np.stack([ks[1 + rr * grid_w + cc] if inside(rr, cc) else zero for rr, cc in cells])
    values = np.stack([vs[1 + rr * grid_w + cc] if inside(rr, cc) else zero for rr, cc in cells])
    np.testing.assert_allclose(got[1 + r * grid_w + c], attend(qs[1 + r * grid_w + c], keys, values),
                               rtol=1e-5, atol=1e-6)


def test_acc_variant_changes_only_the_cross_attention(tiny_params):
  images = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 16, 3)), jnp.float32)
  reference, _ = tiny_model().apply({"params": tiny_params}, images)
  acc, _ = tiny_model(cross_attention="acc").apply({"params": tiny_params}, images)
  assert np.abs(acc - reference).max() > 1e-6  # same params load, the rule differs
  plain, _ = tiny_model(inter_weight=0.0).apply({"params": tiny_params}, images)
  np.testing.assert_allclose(
      tiny_model(cross_attention="acc", inter_weight=0.0).apply({"params": tiny_params}, images)[0],
      plain, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="cross_attention='fast'"):
    tiny_model(cross_attention="fast")


class UnfusedSa2vpEncoder(vit.Encoder):
  """The reference's structure, step by step: a cross-attention of its own (LN_0 and Q/K/V again,
  the local neighbourhood as a masked full attention) before each block, the deep prompt map
  through the whole block at batch B. Same module names, so the same params and dropout draws."""
  inter_dim: int = 16
  inter_weight: float = 0.1
  prompt_queries_image_layers: tuple = (0, 4, 8)
  deep_prompt_layers: tuple = (4, 8)

  @nn.compact
  def __call__(self, tokens, *, grid, deterministic=True):
    batch, length, width = tokens.shape
    dropout = vit.Dropout(self.dropout)
    add_position = vit.AddPositionEmbs(name="posembed_input")
    ppt = self.param("ppt", nn.initializers.zeros, (1, length, self.inter_dim))
    deep_layers = [i for i in self.deep_prompt_layers if i < self.depth]
    deep_ppt = self.param("deep_ppt", nn.initializers.zeros,
                          (len(deep_layers), 1, length, self.inter_dim))
    cross_conv = self.param("cross_conv", nn.initializers.zeros, (len(deep_layers), width))
    image = dropout(add_position(tokens), deterministic=deterministic)
    prompt = nn.Dense(width, name="ppt_proj")(ppt)
    prompt = dropout(add_position(jnp.broadcast_to(prompt, (batch, length, width))),
                     deterministic=deterministic)
    for i in range(self.depth):
      block = self.make_block(i)
      prompt_is_query = i in self.prompt_queries_image_layers
      query, key_value = (prompt, image) if prompt_is_query else (image, prompt)
      attended = block.cross_attention(query, key_value, mask=sa2vp.local_attention_mask(*grid))
      fusion = sa2vp.CrossAdapter(self.inter_dim, self.dropout, name=f"cross_block_{i}")(
          query, attended, deterministic=deterministic)
      streams = [image, prompt]
      if i in deep_layers:
        k = deep_layers.index(i)
        deep = nn.Dense(width, name=f"deep_proj_{k}")(deep_ppt[k])
        streams.append(jnp.broadcast_to(deep, (batch, length, width)))
      out = block(jnp.concatenate(streams), deterministic=deterministic)
      image, prompt = out[:batch], out[batch:2 * batch]
      if i in deep_layers:
        prompt = prompt + out[2 * batch:] * cross_conv[k]
      if prompt_is_query:
        prompt = prompt + self.inter_weight * fusion
      else:
        image = image + self.inter_weight * fusion
    norm = nn.LayerNorm(epsilon=self.layer_norm_eps, name="encoder_norm")
    return norm(image)[:, 0], norm(prompt)[:, 0]


@pytest.mark.parametrize("train_mode", [False, True])
def test_fused_encoder_equals_the_unfused_reference_structure(train_mode):
  """Shared Q/K/V, the shifted-view local attention and the batch-1 deep prompt block change no
  number: eval and train mode (same dropout draws) match the step-by-step structure."""
  kwargs = dict(depth=3, mlp_dim=64, num_heads=2, dropout=0.1, inter_dim=4,
                prompt_queries_image_layers=(0, 2), deep_prompt_layers=(1, 2))
  grid = (3, 4)
  tokens = jnp.asarray(np.random.default_rng(2).normal(size=(3, 13, 32)), jnp.float32)
  fused = sa2vp.Sa2vpEncoder(**kwargs)
  params = fused.init(jax.random.PRNGKey(0), tokens, grid=grid)["params"]
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda p: p + 0.2 * rng.normal(size=p.shape).astype(np.float32), params)
  apply = lambda module: module.apply({"params": params}, tokens, grid=grid,
                                      deterministic=not train_mode,
                                      rngs={"dropout": jax.random.PRNGKey(7)})
  got, expected = apply(fused), apply(UnfusedSa2vpEncoder(**kwargs))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inter_dim,expected", [(8, 202_200), (16, 372_912), (32, 714_336),
                                                (64, 1_397_184)])
def test_trainable_parameter_count_matches_the_reference(inter_dim, expected):
  """21339 d + 31488 for ViT-B/16 (spec §1.3), plus 769 C for the head; backbone 85,798,656."""
  model = sa2vp.Model(num_classes=100, variant="B/16", inter_dim=inter_dim)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3)))["params"])
  labels = traverse_util.flatten_dict(optim.param_labels(shapes, sa2vp.TRAINABLE_PARAMS), sep="/")
  sizes = {k: int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}
  trainable = sum(n for k, n in sizes.items() if labels[k] == optim.TRAIN)
  assert trainable == expected + 769 * 100
  assert sum(sizes.values()) - trainable == 85_798_656


def tiny_model(**kw):
  """Two blocks: block 0 has the prompt query the image, block 1 the reverse plus a deep prompt."""
  return sa2vp.Model(num_classes=5, variant="mu/4", dropout=0.1, deep_prompt_layers=(1,), **kw)


@pytest.fixture(scope="module")
def tiny_params():
  params = tiny_model().init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
  return params


def test_shapes_and_parameter_tree(tiny_params):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 3)), jnp.float32)
  logits, aux = tiny_model().apply({"params": tiny_params}, images)
  assert logits.shape == aux["prompt_logits"].shape == (3, 5)
  assert aux["pre_logits"].shape == (3, 32)
  t = tiny_params["Transformer"]
  assert t["ppt"].shape == (1, 17, 16) and t["deep_ppt"].shape == (1, 1, 17, 16)
  assert t["cross_conv"].shape == (1, 32) and t["deep_proj_0"]["kernel"].shape == (16, 32)
  assert sorted(k for k in t if k.startswith("cross_block")) == ["cross_block_0", "cross_block_1"]
  assert set(t["cross_block_0"]) == {"ffn_norm", "ffn"}  # the attention is block 0's own


def test_with_zero_inter_weight_the_image_branch_is_the_plain_vit(tiny_params):
  """alpha = 0 cuts every cross term: image logits = vit.Model with the same backbone and head."""
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 3)), jnp.float32)
  logits, _ = tiny_model(inter_weight=0.0).apply({"params": tiny_params}, images)
  backbone = {k: v for k, v in tiny_params.items()}
  vit_params = dict(backbone, Transformer={k: v for k, v in tiny_params["Transformer"].items()
                                           if k.startswith(("encoderblock", "encoder_norm",
                                                            "posembed"))})
  plain, _ = vit.Model(num_classes=5, variant="mu/4").apply({"params": vit_params}, images)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-6)
  coupled, _ = tiny_model(inter_weight=1.5).apply({"params": tiny_params}, images)
  assert np.abs(coupled - plain).max() > 1e-3


def test_dropout_is_live_in_training_and_off_in_eval(tiny_params):
  images = jnp.ones((2, 16, 16, 3))
  run = lambda seed: tiny_model().apply({"params": tiny_params}, images, train=True,
                                        rngs={"dropout": jax.random.PRNGKey(seed)})[0]
  assert np.abs(run(0) - run(1)).max() > 0
  eval_a = tiny_model().apply({"params": tiny_params}, images)[0]
  np.testing.assert_array_equal(eval_a, tiny_model().apply({"params": tiny_params}, images)[0])


def test_training_loss_weights_the_two_branches():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  prompt_logits = jnp.array([[0.0, 1.0, 0.0]])
  labels = jnp.array([0])
  loss_fn = sa2vp.make_loss(ml_collections.ConfigDict(), types.SimpleNamespace(num_classes=3))
  got = loss_fn(logits, {"prompt_logits": prompt_logits}, {"label": labels})
  ce = lambda z: -jax.nn.log_softmax(z)[0, 0]
  np.testing.assert_allclose(got, [0.8 * ce(logits) + 0.2 * ce(prompt_logits)], rtol=1e-6)


def test_trainable_split_and_frozen_params_unchanged_after_steps():
  config = sa2vp_vtab.get_config("runlocal")
  config.model.deep_prompt_layers = (1,)
  exp = train.build(config)
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  trained = sorted(k for k, v in labels.items() if v == optim.TRAIN)
  assert trained == sorted(
      ["Transformer/ppt", "Transformer/ppt_proj/kernel", "Transformer/ppt_proj/bias",
       "Transformer/deep_ppt", "Transformer/cross_conv", "head/kernel", "head/bias"]
      + [f"Transformer/deep_proj_0/{n}" for n in ("kernel", "bias")]
      + [f"Transformer/cross_block_{i}/{p}" for i in range(2)
         for p in ("ffn_norm/scale", "ffn_norm/bias", "ffn/Dense_0/kernel", "ffn/Dense_0/bias",
                   "ffn/Dense_1/kernel", "ffn/Dense_1/bias")])
  before = traverse_util.flatten_dict(jax.device_get(exp.state["params"]), sep="/")
  state, _ = run_steps(exp, 2)
  after = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  assert_only_trainable_changed(before, after, labels)


def test_loss_falls_on_the_embedded_data():
  config = sa2vp_vtab.get_config("runlocal")
  config.batch_size, config.total_steps, config.optim.lr = 32, 40, 0.03
  _, losses = run_steps(train.build(config), config.total_steps)
  assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_load_keeps_sa2vp_params_and_requires_the_backbone(tmp_path, tiny_params):
  backbone = {k: v for k, v in common.flatten(tiny_params).items()
              if not k.startswith("head") and not any(
                  s in k for s in ("ppt", "cross_", "deep_proj"))}
  path = tmp_path / "vit.npz"
  np.savez(path, **{k: np.asarray(v) + 1.0 for k, v in backbone.items()})
  loaded = sa2vp.load(tiny_params, str(path))
  flat = common.flatten(loaded)
  np.testing.assert_array_equal(flat["embedding/kernel"], np.asarray(backbone["embedding/kernel"]) + 1)
  np.testing.assert_array_equal(flat["Transformer/ppt"], tiny_params["Transformer"]["ppt"])
  del backbone["Transformer/encoder_norm/scale"]
  np.savez(path, **{k: np.asarray(v) for k, v in backbone.items()})
  with pytest.raises(ValueError, match="Transformer/encoder_norm/scale"):
    sa2vp.load(tiny_params, str(path))


@pytest.mark.parametrize("task", sa2vp_vtab.NATURAL + sa2vp_vtab.SPECIALIZED + sa2vp_vtab.STRUCTURED)
def test_vtab_config_tables(task):
  config = sa2vp_vtab.get_config(f"task={task}")
  group = sa2vp_vtab.task_group(task)
  expected = {"svhn": (16, 0.5), "resisc45": (16, 0.5), "dsprites_ori": (16, 0.1),
              "smallnorb_ele": (32, 0.5)}.get(
                  task, {"natural": (8, 0.1), "specialized": (16, 1.5), "structured": (32, 1.5)}[group])
  assert (config.model.inter_dim, config.model.inter_weight) == expected
  assert config.batch_size == (64 if group == "natural" else 40)
  assert config.optim.lr == (5e-4 if task in ("oxford_iiit_pet", "clevr_count") else 1e-3)
  assert (config.optim.name, config.optim.weight_decay, config.optim.min_lr) == ("adamw", 1e-4, 1e-7)
  assert config.pp.train == config.pp.eval == (
      "resize(224, antialias=False)|value_range(0, 1)|normalize('inception')")
  assert config.dataset == f"vtab/{task}" and list(config.evals) == ["test"]


def test_weight_decay_mask_follows_the_seed():
  """wd on every tensor except biases and LayerNorm params (ppt, deep_ppt, cross_conv included)."""
  import re
  pattern = re.compile(sa2vp_vtab.get_config().optim.no_weight_decay)
  decayed = lambda name: not pattern.fullmatch(name)
  assert decayed("Transformer/ppt") and decayed("Transformer/deep_ppt")
  assert decayed("Transformer/cross_conv") and decayed("head/kernel")
  assert decayed("Transformer/cross_block_3/ffn/Dense_0/kernel")
  assert not decayed("head/bias") and not decayed("Transformer/cross_block_3/ffn_norm/scale")
  assert not decayed("Transformer/ppt_proj/bias")
