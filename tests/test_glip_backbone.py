"""Tests for jaxprompt/models/glip/backbone.py (GLIP's Swin + FPN backbone).

References: `torch_glip_backbone` (a PyTorch reference with GLIP's names) and, for the trunk,
transformers' `SwinBackbone`, which pads and partitions as GLIP's detection Swin
(`always_partition=True`: windows never shrink) and has per-stage output LayerNorms. Images whose
sides are not multiples of the patch, whose stage maps are not multiples of the window and whose
last stage map is smaller than the window exercise every padding path.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import torch_glip_backbone
from jaxprompt.models import common
from jaxprompt.models import swin
from jaxprompt.models.glip import backbone

# Stochastic depth off, so that train-mode differences come from DropBlock alone.
TINY = {**backbone.decode_variant("tiny"), "drop_path_rate": 0.0}
TINY_SWIN = swin.decode_variant(TINY["swin_variant"])
# 50x70 -> patch-padded 52x72 -> stage maps 13x18, 7x9, 4x5, 2x3 (window 4: none tiles, the last
# is smaller than the window) -> P3..P7 7x9, 4x5, 2x3, 1x2, 1x1.
IMAGE_SIZE = (50, 70)


def rel_err(actual, expected):
  return np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()


def nchw_to_nhwc(x):
  return np.asarray(x.detach().numpy() if isinstance(x, torch.Tensor) else x).transpose(0, 2, 3, 1)


def torch_reference(seed=0, drop_path_rate=0.0):
  model = torch_glip_backbone.Backbone(
      TINY_SWIN["embed_dim"], TINY_SWIN["depths"], TINY_SWIN["num_heads"], TINY["window_size"],
      TINY["fpn_channels"], drop_path_rate=drop_path_rate)
  return torch_glip_backbone.randomize_(model, seed)


def numpy_state(module):
  return {name: value.detach().numpy() for name, value in module.state_dict().items()}


def images(batch=2, size=IMAGE_SIZE, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 3, *size)).astype(np.float32)


@functools.cache
def jit_apply(model, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))


def random_params(model, image_shape, seed=0):
  """Random params from numpy (compiling `model.init` costs more than the forward)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(image_shape, jnp.float32))["params"]
  rng = np.random.default_rng(seed)
  return common.unflatten({
      name: (1.0 if name.endswith("scale") else 0.0) + rng.normal(0, 0.2, x.shape).astype(x.dtype)
      for name, x in common.flatten(shapes).items()})


def test_eval_parity_with_torch_reference():
  reference = torch_reference().eval()
  params = backbone.convert_backbone(numpy_state(reference))
  size = IMAGE_SIZE
  x = images(size=size)
  model = backbone.SwinFPN(**TINY)
  pyramid = jit_apply(model, train=False)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    expected = reference(torch.from_numpy(x))
  assert len(pyramid) == 5
  for level, (ours, theirs) in enumerate(zip(pyramid, expected), 3):
    theirs = nchw_to_nhwc(theirs)
    assert ours.shape == theirs.shape, level
    assert rel_err(ours, theirs) <= 1e-4, (level, rel_err(ours, theirs))
  side = lambda n, level: -(-n // 2 ** level)  # ceil(n / 2^level)
  assert [p.shape[1:3] for p in pyramid] == [(side(size[0], l), side(size[1], l))
                                             for l in range(3, 8)]


def test_trunk_matches_transformers_swin_backbone():
  """transformers' SwinBackbone (always_partition) is an independent reference of GLIP's trunk:
  our body and the torch reference's body both reproduce its stage outputs."""
  config = transformers.SwinConfig(
      image_size=64, patch_size=4, embed_dim=TINY_SWIN["embed_dim"],
      depths=list(TINY_SWIN["depths"]), num_heads=list(TINY_SWIN["num_heads"]),
      window_size=TINY["window_size"], layer_norm_eps=1e-5, drop_path_rate=0.0,
      out_features=["stage2", "stage3", "stage4"])
  hf = torch_glip_backbone.randomize_(transformers.SwinBackbone(config), seed=1).eval()
  hf_state = numpy_state(hf)
  # hidden_states_norms.stage{i+1} is GLIP's norm{i}; swin.layernorm is the classifier's (unused).
  norms = {re.sub(r"hidden_states_norms\.stage(\d)", lambda m: f"body.norm{int(m[1]) - 1}", name):
           value for name, value in hf_state.items() if name.startswith("hidden_states_norms.")}
  unused = ("hidden_states_norms.", "swin.layernorm.")
  trunk = swin.convert_hf_swin({name: value for name, value in hf_state.items()
                                if not name.startswith(unused)})
  reference = torch_reference()
  fpn_state = {name: value for name, value in numpy_state(reference).items()
               if name.startswith("fpn.")}
  glip_state = {**{f"body.{name}": value for name, value in trunk.items()}, **norms, **fpn_state}
  missing, unexpected = reference.load_state_dict(
      {name: torch.from_numpy(v) for name, v in glip_state.items()}, strict=False)
  assert not unexpected and all(name.endswith("relative_position_index") for name in missing)

  x = images()
  with torch.no_grad():
    outputs = hf(torch.from_numpy(x), output_hidden_states=True)
    expected = [outputs.hidden_states[1]] + list(outputs.feature_maps)  # C2 has no norm in GLIP
    torch_body = reference.eval().body(torch.from_numpy(x))
  params = backbone.convert_backbone(glip_state)
  body = backbone.SwinBody(variant=TINY["swin_variant"], window_size=TINY["window_size"])
  ours = jit_apply(body, train=False)({"params": params["body"]},
                                      jnp.asarray(x.transpose(0, 2, 3, 1)))
  for stage, (a, b, c) in enumerate(zip(ours, torch_body, expected)):
    c = nchw_to_nhwc(c)
    assert a.shape == c.shape, stage
    assert rel_err(a, c) <= 1e-4, (stage, rel_err(a, c))
    assert rel_err(nchw_to_nhwc(b), c) <= 1e-4, (stage, rel_err(nchw_to_nhwc(b), c))


def test_pad_to_fit_is_the_plain_swin_where_maps_fit():
  """Every stage map (32, 16, 8, 4) tiles into windows of 2 and is larger than them."""
  model = swin.Model(num_classes=0, variant="mu", patch_size=2, window_size=2)
  padded = swin.Model(num_classes=0, variant="mu", patch_size=2, window_size=2, pad_to_fit=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
  params = random_params(model, x.shape)
  _, aux = jit_apply(model)({"params": params}, x)
  _, aux_padded = jit_apply(padded)({"params": params}, x)
  for a, b in zip(aux["stages"], aux_padded["stages"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Where the map is no larger than the window, the classifier shrinks the window; GLIP does not.
  assert swin.effective_window(3, 5, 4) == (3, 0)
  assert swin.effective_window(3, 5, 4, pad_to_fit=True) == (4, 2)
  with pytest.raises(ValueError, match="not divisible by the patch size"):
    jit_apply(model)({"params": params}, x[:, :63])


def test_resize_nearest_matches_pytorch():
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  for size in [(10, 14), (9, 13), (7, 9), (3, 4), (5, 7)]:
    expected = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size, mode="nearest")
    np.testing.assert_array_equal(backbone.resize_nearest(jnp.asarray(x), size),
                                  nchw_to_nhwc(expected))


@pytest.mark.parametrize("block_size", [3, 4])
def test_drop_block_keep_mask_matches_pytorch(block_size):
  seeds = (np.random.default_rng(block_size).random((2, 9, 11)) < 0.05).astype(np.float32)
  expected = torch_glip_backbone.DropBlock2D(0.3, block_size).keep_mask(torch.from_numpy(seeds))
  np.testing.assert_array_equal(backbone.drop_block_keep_mask(jnp.asarray(seeds), block_size),
                                expected.numpy())


def test_drop_block_statistics():
  batch, height, width, channels = 8, 64, 48, 3
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (batch, height, width, channels)),
                  jnp.float32)
  dropped, keep = jax.jit(functools.partial(backbone.drop_block, drop_prob=0.3, block_size=3))(
      x, jax.random.PRNGKey(0))
  dropped, keep, x = np.asarray(dropped), np.asarray(keep), np.asarray(x)
  # One mask per position, shared by the channels; survivors scaled by numel / kept over the batch.
  np.testing.assert_array_equal(dropped == 0, np.broadcast_to((keep == 0)[..., None], x.shape))
  np.testing.assert_allclose(dropped[keep == 1], (x * keep.size / keep.sum())[keep == 1],
                             rtol=1e-6)
  # A position survives when no seed (probability gamma = 0.3 / 9) lies in its 3x3 neighbourhood
  # (clipped at the borders): the expected kept fraction counts the neighbours per position.
  gamma = 0.3 / 9
  neighbours = lambda n: np.minimum(np.arange(n) + 1, n - 1) - np.maximum(np.arange(n) - 1, 0) + 1
  expected_keep = np.mean((1 - gamma) ** np.outer(neighbours(height), neighbours(width)))
  assert abs(keep.mean() - expected_keep) < 0.015, (keep.mean(), expected_keep)  # ~5 sigma
  # Dropped positions are unions of 3x3 squares: every dropped position lies in a square whose
  # (clipped) 3x3 neighbourhood is all dropped.
  padded = np.pad(keep == 0, ((0, 0), (1, 1), (1, 1)), constant_values=True)
  full = np.ones_like(keep, bool)
  for dy in range(3):
    for dx in range(3):
      full &= padded[:, dy:dy + height, dx:dx + width]
  covered = np.zeros((batch, height + 2, width + 2), bool)
  for dy in range(3):
    for dx in range(3):
      covered[:, dy:dy + height, dx:dx + width] |= full
  np.testing.assert_array_equal(covered[:, 1:-1, 1:-1], keep == 0)


def test_drop_block_only_on_p3_p4_in_training():
  """Trunk stochastic depth off: training changes P3/P4 only, and with the same keep masks the
  torch reference in train mode gives the same pyramid (undropped inner maps flow down)."""
  model = backbone.SwinFPN(**TINY)
  reference = torch_reference()
  params = backbone.convert_backbone(numpy_state(reference))
  x = images()
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  variables = {"params": params}
  evaluated = jit_apply(model, train=False)(variables, nhwc)
  trained, state = jit_apply(model, train=True, mutable="intermediates")(
      variables, nhwc, rngs={"dropout": jax.random.PRNGKey(3)})
  for level in (5, 6, 7):
    np.testing.assert_array_equal(trained[level - 3], evaluated[level - 3])
  for level in (3, 4):
    assert rel_err(trained[level - 3], np.asarray(evaluated[level - 3])) > 1e-3, level
  keeps = state["intermediates"]["fpn"]
  assert set(keeps) == {"drop_block_keep_p3", "drop_block_keep_p4"}
  keep_p3, keep_p4 = (np.asarray(keeps[f"drop_block_keep_p{level}"][0]) for level in (3, 4))
  assert keep_p3.shape == (2, *evaluated[0].shape[1:3]) and 0 < keep_p3.mean() < 1
  reference.train()
  reference.fpn.drop_block.keep_masks = [torch.tensor(keep_p4), torch.tensor(keep_p3)]
  with torch.no_grad():
    expected = reference(torch.from_numpy(x))
  for level, (ours, theirs) in enumerate(zip(trained, expected), 3):
    assert rel_err(ours, nchw_to_nhwc(theirs)) <= 1e-4, level


def test_stochastic_depth_skips_frozen_stages():
  """Stage i runs in eval mode when frozen_stages >= i + 2; drop-path rates linspace(0, 1, 8)
  give every stage a dropping block (stage 0's second block: 1/7), and 16 samples make a draw
  that drops nothing in a stage unlikely (it would show as an equal stage below)."""
  x = jnp.asarray(images(batch=16, size=(32, 32)).transpose(0, 2, 3, 1))
  make = lambda frozen: backbone.SwinBody(variant="pico", window_size=4, drop_path_rate=1.0,
                                          frozen_stages=frozen)
  params = random_params(make(-1), x.shape)
  evaluated = jit_apply(make(-1), train=False)({"params": params}, x)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  for frozen, deterministic_stages in ((-1, 0), (3, 2)):
    trained = jit_apply(make(frozen), train=True)({"params": params}, x, rngs=rngs)
    for stage in range(4):
      same = np.array_equal(trained[stage], evaluated[stage])
      assert same == (stage < deterministic_stages), (frozen, stage)
  assert backbone.frozen_param_regex(-1) is None
  assert backbone.frozen_param_regex(0) == "body/(?:patch_embed)/.*"
  assert backbone.frozen_param_regex(2) == "body/(?:patch_embed|layers_0)/.*"


def parameter_count(tree):
  return sum(int(np.prod(x.shape)) for x in common.flatten(tree).values())


def analytic_counts(embed_dim, depths, heads, window, fpn_channels):
  """Swin body (patch embed, blocks, merging, norm1..3) and FPN (+P6/P7) parameter counts."""
  dims = [embed_dim * 2 ** i for i in range(4)]
  body = 3 * 16 * embed_dim + embed_dim + 2 * embed_dim
  for i, c in enumerate(dims):
    body += depths[i] * (12 * c * c + 13 * c + (2 * window - 1) ** 2 * heads[i])
    body += 8 * c * c + 8 * c if i < 3 else 0
    body += 2 * c if i > 0 else 0
  conv3 = 9 * fpn_channels ** 2 + fpn_channels
  fpn = sum(c * fpn_channels + fpn_channels for c in dims[1:]) + 5 * conv3
  return body, fpn


@pytest.mark.parametrize("variant, millions", [("T", (27.52, 3.30)), ("L", (195.20, 3.64))])
def test_parameter_counts(variant, millions):
  settings = backbone.decode_variant(variant)
  model = backbone.SwinFPN(**settings)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))["params"]
  counts = parameter_count(shapes["body"]), parameter_count(shapes["fpn"])
  sizes = swin.decode_variant(settings["swin_variant"])
  assert counts == analytic_counts(sizes["embed_dim"], sizes["depths"], sizes["num_heads"],
                                   settings["window_size"], settings["fpn_channels"])
  assert tuple(round(n / 1e6, 2) for n in counts) == millions


def test_convert_backbone_is_strict():
  state = numpy_state(torch_reference())
  assert any(name.endswith("relative_position_index") for name in state)  # buffers are dropped
  bad = dict(state)
  del bad["fpn.top_blocks.p7.bias"], bad["body.layers.2.blocks.1.mlp.fc1.weight"]
  bad["body.norm0.weight"] = np.ones(16, np.float32)
  bad["body.head.weight"] = np.ones((10, 128), np.float32)
  with pytest.raises(ValueError) as info:
    backbone.convert_backbone(bad)
  message = str(info.value)
  for name in ("fpn.top_blocks.p7.bias", "body.layers.2.blocks.1.mlp.fc1.weight",
               "body.norm0.weight", "body.head.weight"):
    assert name in message
  with pytest.raises(ValueError, match="backbone.fpn.fpn_inner2.weight"):
    backbone.convert_backbone({f"backbone.{name}": value for name, value in state.items()})


def test_load_swin_trunk_from_classification_checkpoint(tmp_path):
  reference = torch_reference(seed=2)
  state = {name: value for name, value in reference.body.state_dict().items()
           if not name.startswith("norm")}
  state["norm.weight"], state["norm.bias"] = torch.ones(128), torch.zeros(128)  # unused by GLIP
  state["head.weight"], state["head.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
  path = tmp_path / "swin_pico_classifier.pth"
  torch.save({"model": state}, path)

  init = random_params(backbone.SwinFPN(**TINY), (1, 32, 32, 3))
  loaded = backbone.load_swin_trunk(init, path)
  expected = common.flatten(backbone.convert_backbone(numpy_state(reference)))
  for name, value in common.flatten(loaded).items():
    keeps_init = name.startswith("fpn/") or name.split("/")[1] in ("norm1", "norm2", "norm3")
    np.testing.assert_array_equal(value, common.flatten(init)[name] if keeps_init
                                  else expected[name], err_msg=name)
  with pytest.raises(ValueError, match="backbone's params"):
    backbone.load_swin_trunk(init["body"], path)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="Unknown GLIP backbone variant 'XL'"):
    backbone.decode_variant("XL")
  with pytest.raises(ValueError, match=r"images \(B, H, W, 3\)"):
    backbone.SwinFPN(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))
