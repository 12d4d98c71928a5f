"""SA2VP and VPT on Swin: the local cross-attention, the prompt-map streams, prompts in windows and
merging, what trains, the parameter counts of the originals, the configs.

Tiny sizes throughout ('mu' Swin, patch 2, window 2 on 32 px: 16 -> 8 -> 4 -> 2 maps); Swin-B only
through `jax.eval_shape`.
"""
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from configs import sa2vp_swin_vtab, sa2vp_vtab, vpt_swin_vtab
from jaxprompt import optim, train
from jaxprompt.models import common, swin
from jaxprompt.prompts import sa2vp_swin, vpt_swin
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error

TINY = dict(variant="mu", patch_size=2, window_size=2)
ALL_TASKS = sa2vp_vtab.NATURAL + sa2vp_vtab.SPECIALIZED + sa2vp_vtab.STRUCTURED


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def images(batch, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 32, 32, 3)), jnp.float32)


def random_params(module, *args, seed=0, scale=0.3, **kw):
  """Random params (LayerNorm scales near 1) from the init's shapes: compiling a Swin's init costs
  more than everything a test does with it."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kw)["params"])
  rng = np.random.default_rng(seed)
  return common.unflatten({
      name: (1.0 if name.endswith("scale") else 0.0) + scale * rng.normal(size=x.shape).astype(
          np.float32) for name, x in common.flatten(shapes).items()})


@functools.cache
def jit_apply(model, **kw):
  return jax.jit(functools.partial(model.apply, **kw))


# --- SA2VP-Swin ---------------------------------------------------------------------------------

def per_position_cross_attention(params, query, key_value, heads, eps):
  """The original's CrossAttention loop on one (H, W, C) map pair: LayerNorm(eps) with norm1's
  scale/bias, Q from qkv(LN(query)), K and V from qkv(LN(key_value)), each query over its clipped
  3x3 neighbourhood, then proj."""
  grid_h, grid_w, channels = query.shape
  head_dim = channels // heads
  ln = lambda x: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
                  * params["norm1"]["scale"] + params["norm1"]["bias"])
  qkv = lambda x: (ln(x.reshape(-1, channels)) @ params["attn"]["qkv"]["kernel"]
                   + params["attn"]["qkv"]["bias"]).reshape(-1, 3, heads, head_dim)
  q, k, v = qkv(query)[:, 0], qkv(key_value)[:, 1], qkv(key_value)[:, 2]
  out = np.zeros((grid_h * grid_w, heads, head_dim))
  for r, c in itertools.product(range(grid_h), range(grid_w)):
    near = [rr * grid_w + cc for rr in range(max(r - 1, 0), min(r + 2, grid_h))
            for cc in range(max(c - 1, 0), min(c + 2, grid_w))]
    for h in range(heads):
      logits = k[near, h] @ q[r * grid_w + c, h] / np.sqrt(head_dim)
      weights = np.exp(logits - logits.max())
      out[r * grid_w + c, h] = weights / weights.sum() @ v[near, h]
  out = out.reshape(-1, channels) @ params["attn"]["proj"]["kernel"] + params["attn"]["proj"]["bias"]
  return out.reshape(grid_h, grid_w, channels)


def test_local_cross_attention_equals_per_position_loop():
  """With inputs of tiny variance, LayerNorm's eps shows: the original's 1e-6, not Swin's 1e-5."""
  grid_h, grid_w, channels, heads = 4, 5, 16, 2
  rng = np.random.default_rng(0)
  params = {"norm1": {"scale": 1 + 0.1 * rng.normal(size=channels), "bias": rng.normal(size=channels)},
            "attn": {"qkv": {"kernel": rng.normal(size=(channels, 3 * channels)) * 0.3,
                             "bias": rng.normal(size=3 * channels) * 0.3},
                     "proj": {"kernel": rng.normal(size=(channels, channels)) * 0.3,
                              "bias": rng.normal(size=channels) * 0.3}}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  query, key_value = (1e-3 * rng.normal(size=(grid_h, grid_w, channels)).astype(np.float32)
                      for _ in range(2))
  got = sa2vp_swin.local_cross_attention(params, query[None], key_value[None], num_heads=heads)[0]
  expected = per_position_cross_attention(params, query, key_value, heads, eps=1e-6)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  swin_eps = per_position_cross_attention(params, query, key_value, heads, eps=1e-5)
  assert np.abs(swin_eps - expected).max() > 1e-2


def tiny_sa2vp(**kw):
  return sa2vp_swin.Model(num_classes=5, **TINY, **kw)


@pytest.fixture(scope="module")
def sa2vp_params():
  return random_params(tiny_sa2vp(), images(1), scale=0.1)


def test_sa2vp_shapes_and_parameter_tree(sa2vp_params):
  logits, aux = jit_apply(tiny_sa2vp())({"params": sa2vp_params}, images(2))
  assert logits.shape == aux["prompt_logits"].shape == (2, 5)
  assert aux["pre_logits"].shape == (2, 128)
  embed = sa2vp_params["patch_embed"]
  assert embed["deep_ppt"].shape == (1, 16 * 16, 8) and embed["proj_ppt"]["kernel"].shape == (8, 16)
  # Adapters only for the cross stage (stage 2: 2 blocks of width 64); the attention is the block's.
  assert sorted(k for k in sa2vp_params if k.startswith("cross")) == ["cross_block_0",
                                                                      "cross_block_1"]
  assert set(sa2vp_params["cross_block_0"]) == {"ffn_norm", "ffn"}
  assert sa2vp_params["cross_block_1"]["ffn"]["Dense_0"]["kernel"].shape == (64, 8)


def test_with_zero_inter_weight_the_image_branch_is_the_plain_swin(sa2vp_params):
  x = images(2, seed=1)
  logits, uncoupled = jit_apply(tiny_sa2vp(inter_weight=0.0))({"params": sa2vp_params}, x)
  backbone = {k: v for k, v in flat(sa2vp_params).items()
              if not k.startswith("cross") and "ppt" not in k}
  plain, _ = jit_apply(swin.Model(num_classes=5, **TINY))({"params": common.unflatten(backbone)}, x)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
  # Uncoupled, the prompt branch sees no image: the same logits for every sample.
  np.testing.assert_allclose(uncoupled["prompt_logits"][0], uncoupled["prompt_logits"][1],
                             rtol=1e-5, atol=1e-5)
  coupled, aux = jit_apply(tiny_sa2vp())({"params": sa2vp_params}, x)  # alpha = 0.5
  assert np.abs(coupled - plain).max() > 1e-3
  assert np.abs(aux["prompt_logits"] - plain).max() > 1e-3


def test_no_backward_through_the_image_maps_before_the_adapters(sa2vp_params, monkeypatch):
  """Before the adapter stage the image maps run under stop_gradient: the input gets no gradient,
  and every trainable gets the gradient it gets without the stop (which `monkeypatch` removes)."""
  trainable = re.compile(sa2vp_swin.TRAINABLE_PARAMS)

  def gradients():
    def loss(params, x):
      logits, aux = tiny_sa2vp().apply({"params": params}, x)
      return jnp.sum(logits ** 2) + jnp.sum(jnp.sin(aux["prompt_logits"]))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(sa2vp_params, images(2))

  params_grad, images_grad = gradients()
  monkeypatch.setattr(jax.lax, "stop_gradient", lambda x: x)
  params_grad_unstopped, images_grad_unstopped = gradients()
  assert float(jnp.abs(images_grad).max()) == 0.0
  assert float(jnp.abs(images_grad_unstopped).max()) > 1e-3
  unstopped = flat(params_grad_unstopped)
  names = [name for name in flat(params_grad) if trainable.fullmatch(name)]
  assert len(names) == 3 + 2 * 6 + 2  # prompt map and its projection, 2 adapters, head
  for name in names:
    np.testing.assert_allclose(flat(params_grad)[name], unstopped[name], rtol=1e-5, atol=1e-6)


def test_block_zero_adapts_the_prompt_and_block_one_the_image(sa2vp_params):
  """j % 6 == 0: the prompt queries the image and only the prompt map gets alpha F; other blocks
  add to the image map. With block 1's adapter output zeroed the image branch is the plain Swin's
  (as at alpha = 0) while the prompt branch still depends on the image."""
  x = images(2, seed=1)
  silenced = dict(sa2vp_params, cross_block_1=jax.tree.map(np.array, sa2vp_params["cross_block_1"]))
  silenced["cross_block_1"]["ffn"]["Dense_1"] = jax.tree.map(
      np.zeros_like, sa2vp_params["cross_block_1"]["ffn"]["Dense_1"])
  logits, aux = jit_apply(tiny_sa2vp())({"params": silenced}, x)
  plain, uncoupled = jit_apply(tiny_sa2vp(inter_weight=0.0))({"params": sa2vp_params}, x)
  np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
  assert np.abs(aux["prompt_logits"] - uncoupled["prompt_logits"]).max() > 1e-3
  assert np.abs(aux["prompt_logits"][0] - aux["prompt_logits"][1]).max() > 1e-4


@pytest.mark.parametrize("inter_dim,expected", [(8, 201_488), (16, 375_200)])
def test_sa2vp_swin_b_trainable_count_matches_the_original(inter_dim, expected):
  """3136 d + (128 d + 128) + 18 (1024 + 1025 d + 512), plus 1025 C for the head (spec §2.4);
  the frozen backbone is Swin-B without head, 86,743,224 (the original's denominator)."""
  model = sa2vp_swin.Model(num_classes=100, variant="B", inter_dim=inter_dim)
  trainable, frozen = count(model, sa2vp_swin.TRAINABLE_PARAMS)
  assert trainable == expected + 1025 * 100
  assert frozen == 86_743_224


def count(model, regex):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3)))["params"])
  labels = flat(optim.param_labels(shapes, regex))
  sizes = {k: int(np.prod(v.shape)) for k, v in flat(shapes).items()}
  trainable = sum(n for k, n in sizes.items() if labels[k] == optim.TRAIN)
  return trainable, sum(sizes.values()) - trainable


def test_sa2vp_init_trainable_split_frozen_params_and_falling_loss():
  config = sa2vp_swin_vtab.get_config("runlocal")
  config.batch_size, config.total_steps, config.optim.lr = 16, 30, 0.03
  exp = train.build(config)
  before = flat(exp.state["params"])
  # The new Linears start N(0, 0.02^2) with zero biases (the original's init override).
  kernels = np.concatenate([before["patch_embed/proj_ppt/kernel"].ravel()] + [
      before[f"cross_block_{j}/ffn/Dense_{k}/kernel"].ravel() for j in range(2) for k in range(2)])
  assert abs(kernels.std() - 0.02) < 0.002
  assert not any(before[f"cross_block_{j}/ffn/Dense_{k}/bias"].any()
                 for j in range(2) for k in range(2))
  assert not before["patch_embed/proj_ppt/bias"].any()
  np.testing.assert_array_equal(before["cross_block_0/ffn_norm/scale"], 1.0)
  labels = flat(exp.labels)
  assert sorted(k for k, v in labels.items() if v == optim.TRAIN) == sorted(
      ["patch_embed/deep_ppt", "patch_embed/proj_ppt/kernel", "patch_embed/proj_ppt/bias",
       "head/kernel", "head/bias"]
      + [f"cross_block_{j}/{p}" for j in range(2)
         for p in ("ffn_norm/scale", "ffn_norm/bias", "ffn/Dense_0/kernel", "ffn/Dense_0/bias",
                   "ffn/Dense_1/kernel", "ffn/Dense_1/bias")])
  state, losses = run_steps(exp, config.total_steps)
  assert_only_trainable_changed(before, flat(state["params"]), labels)
  assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses


# --- VPT-Swin -----------------------------------------------------------------------------------

def test_window_attention_pads_bias_and_mask_for_leading_tokens():
  """Prompts in front of each window: zero relative position bias and no shift mask for their rows
  and columns (the original's PromptedWindowAttention)."""
  heads, window, prompts, channels = 2, 2, 3, 8
  attention = swin.WindowAttention(heads, window)
  rng = np.random.default_rng(0)
  windows = rng.normal(size=(1, 2, prompts + window ** 2, channels)).astype(np.float32)
  mask = np.where(rng.random((2, 4, 4)) < 0.3, swin.MASKED, 0.0).astype(np.float32)
  params = random_params(attention, windows, mask)
  got = jax.jit(attention.apply)({"params": params}, windows, mask)

  qkv = (windows @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(
      1, 2, -1, 3, heads, channels // heads)
  q, k, v = (np.moveaxis(qkv[:, :, :, i], 3, 2) for i in range(3))  # (1, nW, H, N, d)
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(channels // heads)
  bias = np.asarray(params["relative_position_bias_table"])[swin.relative_position_index(window)]
  logits[..., prompts:, prompts:] += bias.transpose(2, 0, 1) + mask[None, :, None]
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  out = np.moveaxis((weights / weights.sum(-1, keepdims=True)) @ v, 2, 3).reshape(
      1, 2, -1, channels)
  np.testing.assert_allclose(got, out @ params["proj"]["kernel"] + params["proj"]["bias"],
                             rtol=1e-4, atol=1e-4)


def test_prompts_join_every_window_and_their_outputs_are_the_window_average():
  """A 2x4 map is two 2x2 windows A | B. Each window's tokens come out as when the window is the
  whole map (the same prompts lead every window), and with the MLP zeroed the prompt output is
  the average of the two one-window runs."""
  block = swin.SwinBlock(num_heads=2, window_size=2, shifted=False)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 2, 4, 8)), jnp.float32)
  prompts = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  params = random_params(block, x, prompts=prompts)
  params["mlp"]["fc2"] = jax.tree.map(jnp.zeros_like, params["mlp"]["fc2"])
  run = lambda m: jax.jit(block.apply)({"params": params}, m, prompts=prompts)
  (x_both, p_both), (x_a, p_a), (x_b, p_b) = run(x), run(x[:, :, :2]), run(x[:, :, 2:])
  np.testing.assert_allclose(x_both, jnp.concatenate([x_a, x_b], axis=2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p_both, (p_a + p_b) / 2, rtol=1e-5, atol=1e-5)
  assert np.abs(p_a - p_b).max() > 1e-2


def test_patch_merging_upsamples_prompts_by_four_copies():
  """A prompt merges as a 2x2 neighbourhood of four copies of itself would."""
  merge = swin.PatchMerging()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 8)), jnp.float32)
  prompts = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  params = random_params(merge, x, prompts=prompts)
  apply = jax.jit(merge.apply)
  merged, merged_prompts = apply({"params": params}, x, prompts=prompts)
  np.testing.assert_array_equal(merged, apply({"params": params}, x))
  as_maps = jnp.broadcast_to(prompts[:, :, None, None], (2, 3, 2, 2, 8)).reshape(6, 2, 2, 8)
  np.testing.assert_allclose(merged_prompts.reshape(6, 1, 1, 16),
                             apply({"params": params}, as_maps), rtol=1e-5, atol=1e-6)


def tiny_vpt(**kw):
  return vpt_swin.Model(num_classes=5, num_prompts=3, **TINY, **kw)


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_prompts_per_stage_shallow_and_deep(deep):
  model = tiny_vpt(deep=deep)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1))["params"])
  shapes = {k: v.shape for k, v in flat(params).items() if "prompt" in k}
  expected = {"prompt_embeddings": (1, 3, 16)}
  if deep:  # stage 0's first block keeps the shallow prompts
    expected.update({"deep_prompt_embeddings_0": (1, 3, 16), "deep_prompt_embeddings_1": (2, 3, 32),
                     "deep_prompt_embeddings_2": (2, 3, 64), "deep_prompt_embeddings_3": (2, 3, 128)})
  assert shapes == expected
  logits, aux = jax.eval_shape(model.apply, {"params": params}, images(2))
  assert logits.shape == (2, 5) and aux["pre_logits"].shape == (2, 128)
  assert [p.shape for p in aux["prompts"]] == [(2, 3, 16 * 2 ** i) for i in range(4)]
  assert [s.shape[1:3] for s in aux["stages"]] == [(16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.fixture(scope="module")
def vpt_params():
  return random_params(tiny_vpt(), images(1), scale=0.1)


def test_vpt_each_sample_is_independent_of_the_batch(vpt_params):
  """Our deliberate fix of the original's window/prompt pairing (see vpt_swin's docstring)."""
  apply = jit_apply(tiny_vpt())
  first, _ = apply({"params": vpt_params}, images(3, seed=2))
  second, _ = apply({"params": vpt_params}, images(3, seed=2).at[1:].set(images(2, seed=3)))
  np.testing.assert_allclose(first[0], second[0], rtol=1e-5, atol=1e-6)
  assert np.abs(first[1:] - second[1:]).max() > 1e-3


def test_vpt_deep_prompts_replace_the_carried_ones_before_every_block(vpt_params):
  """Every row of every deep table reaches the output; the prompts carried out of a stage's last
  block (and its merging) are replaced before the next stage, so they do not."""
  apply = jit_apply(tiny_vpt())
  x = images(3, seed=2)
  base, aux = apply({"params": vpt_params}, x)
  for name in [f"deep_prompt_embeddings_{i}" for i in range(4)]:
    for row in range(vpt_params[name].shape[0]):
      moved = dict(vpt_params, **{name: vpt_params[name].copy()})
      moved[name][row] += np.random.default_rng(row).normal(size=moved[name][row].shape)
      assert np.abs(apply({"params": moved}, x)[0] - base).max() > 1e-4, (name, row)
  # Stage 1 from stage 0's merged map: whatever prompts come in, its table's rows replace them.
  merged = jax.jit(swin.PatchMerging().apply)(
      {"params": vpt_params["layers_0"]["downsample"]}, aux["stages"][0])
  stage = vpt_swin.PromptedStage(depth=2, num_heads=2, window_size=2, drop_path_rates=(0.0, 0.0),
                                 downsample=True)
  rows = vpt_params["deep_prompt_embeddings_1"]
  _, (x_1, prompts_1) = jax.jit(stage.apply)(
      {"params": vpt_params["layers_1"]}, merged, jnp.full((3, 3, 32), 7.0),
      deep_prompts={j: jnp.broadcast_to(rows[j], (3, 3, 32)) for j in range(2)})
  np.testing.assert_allclose(x_1, aux["stages"][1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(prompts_1, aux["prompts"][1], rtol=1e-4, atol=1e-4)


def test_vpt_trains_only_prompts_and_head(vpt_params):
  """The exact trainable set, and one update of the configured optimizer (with unit gradients,
  since the SA2VP test above already runs real steps through the spine) moves only it."""
  config = vpt_swin_vtab.get_config("runlocal")
  labels = optim.param_labels(vpt_params, vpt_swin.TRAINABLE_PARAMS)
  assert sorted(k for k, v in flat(labels).items() if v == optim.TRAIN) == sorted(
      ["prompt_embeddings", "head/kernel", "head/bias"]
      + [f"deep_prompt_embeddings_{i}" for i in range(4)])
  trainable = optim.trainable_subset(vpt_params, labels)
  tx, _ = optim.make_optimizer(config.optim, trainable, total_steps=4, warmup_steps=1)
  grads = jax.tree.map(np.ones_like, trainable)
  opt_state = tx.init(trainable)
  for _ in range(2):  # the first step runs at lr 0 (warmup)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  params = optim.with_trainable(vpt_params, trainable)
  assert_only_trainable_changed(flat(vpt_params), flat(params), flat(labels))


# --- checkpoints and configs --------------------------------------------------------------------

def microsoft_names(params):
  """Our Swin backbone params -> a Microsoft-named state dict (numpy), the inverse of
  `swin.convert_microsoft_swin`."""
  state = {}
  for name, value in common.flatten(params).items():
    value = np.asarray(value)
    name = name.replace("/", ".").replace("layers_", "layers.").replace("blocks_", "blocks.")
    if name.endswith(".kernel"):
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      name = name[:-len("kernel")] + "weight"
    state[name.replace(".scale", ".weight")] = np.ascontiguousarray(value)
  return state


@pytest.mark.parametrize("module,model", [(sa2vp_swin, tiny_sa2vp), (vpt_swin, tiny_vpt)])
def test_load_fills_the_backbone_and_keeps_the_prompt_params(tmp_path, module, model):
  initial = random_params(model(), images(1))
  pattern = re.compile(module.TRAINABLE_PARAMS)
  backbone = {k: v for k, v in common.flatten(initial).items() if not pattern.fullmatch(k)}
  path = str(tmp_path / "swin.safetensors")
  save_file(microsoft_names({k: np.asarray(v) + 1.0 for k, v in backbone.items()}), path)
  loaded = common.flatten(module.load(initial, path))
  for name, value in common.flatten(initial).items():
    expected = value if pattern.fullmatch(name) else np.asarray(value) + 1.0
    np.testing.assert_allclose(loaded[name], expected, err_msg=name)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_vtab_configs(task):
  group = sa2vp_vtab.task_group(task)
  config = sa2vp_swin_vtab.get_config(f"task={task}")
  assert config.model_name == "prompts.sa2vp_swin" and config.model.variant == "B"
  weight = {"svhn": 0.5, "resisc45": 0.5}.get(task, 0.1 if group == "natural" else 1.5)
  assert (config.model.inter_dim, config.model.inter_weight) == (8, weight)
  assert config.model.drop_path_rate == 0.2
  assert config.batch_size == (64 if group == "natural" else 40)
  assert config.optim.lr == 1e-3 and config.optim.name == "adamw"
  assert config.pp.image_size == 224 and config.pp.eval.endswith("normalize('inception')")
  assert config.dataset == f"vtab/{task}" and list(config.evals) == ["test"]

  vpt = vpt_swin_vtab.get_config(f"task={task},shallow")
  assert vpt.model_name == "prompts.vpt_swin" and vpt.model.variant == "B"
  assert (vpt.model.deep, vpt.model.prompt_dropout, vpt.model.num_prompts) == (False, 0.0, 10)
  assert vpt.dataset == f"vtab/{task}" and vpt.pp.image_size == 224
  assert vpt.optim.name == "sgd"


def test_demo_configs_and_overrides():
  for config in (sa2vp_swin_vtab.get_config(), vpt_swin_vtab.get_config()):
    assert config.dataset == "embedded/shapes" and config.pp.image_size == 32
    assert (config.model.variant, config.model.patch_size, config.model.window_size) == ("mu", 2, 2)
    swin.check_image_size(32, 32, patch_size=2, num_stages=4, window_size=2)
  assert sa2vp_swin_vtab.get_config("task=dtd,inter_weight=0.5").model.inter_weight == 0.5
  assert vpt_swin_vtab.get_config("task=dtd").model.deep
