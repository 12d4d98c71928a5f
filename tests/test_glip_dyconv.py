"""Tests for jaxprompt/models/glip/deform_conv.py and dyconv.py.

Parity is against tests/torch_glip_dyconv.py (pure-torch DCNv2 with an explicit bilinear gather,
and a DyConv with the official attribute names that reproduces the CUDA kernel's flat read of
the offset buffers), with random weights loaded through `convert_dyconv`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_glip_dyconv
from jaxprompt.models import common
from jaxprompt.models.glip import deform_conv
from jaxprompt.models.glip import dyconv


def rel_err(actual, expected):
  expected = np.asarray(expected)
  return np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()


def nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def random_dcn_inputs(seed, *, batch=2, height=7, width=9, cin=5, cout=6, stride=1,
                      offset_scale=3.0):
  rng = np.random.default_rng(seed)
  out_h = deform_conv.conv_output_size(height, 3, stride=stride, padding=1, dilation=1)
  out_w = deform_conv.conv_output_size(width, 3, stride=stride, padding=1, dilation=1)
  x = rng.normal(size=(batch, height, width, cin)).astype(np.float32)
  offset = (offset_scale * rng.normal(size=(batch, out_h, out_w, 18))).astype(np.float32)
  mask = rng.uniform(size=(batch, out_h, out_w, 9)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
  bias = rng.normal(size=(cout,)).astype(np.float32)
  return x, offset, mask, kernel, bias


@pytest.mark.parametrize("stride", [1, 2])
def test_deform_conv_forward_and_gradients_match_torch(stride):
  x, offset, mask, kernel, bias = random_dcn_inputs(stride, stride=stride)
  height, width = x.shape[1:3]
  out_h, out_w = offset.shape[1:3]
  # The offsets must send a good share of samples outside the image (and past the -1/H border).
  y = ((np.arange(out_h) * stride - 1)[:, None, None] + np.repeat(np.arange(3), 3)
       + offset[..., 0::2])
  assert np.mean((y <= -1) | (y >= height)) > 0.15
  cotangent = np.random.default_rng(9).normal(size=(2, out_h, out_w, 6)).astype(np.float32)

  def loss(x, offset, mask, kernel, bias):
    out = deform_conv.modulated_deform_conv(x, offset, mask, kernel, bias, stride=stride)
    return jnp.sum(out * cotangent), out
  grads, out = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, offset, mask, kernel, bias)

  tx, toffset, tmask = (nchw(a).requires_grad_() for a in (x, offset, mask))
  tkernel = torch.tensor(kernel.transpose(3, 2, 0, 1)).requires_grad_()
  tbias = torch.tensor(bias).requires_grad_()
  tout = torch_glip_dyconv.modulated_deform_conv(tx, toffset, tmask, tkernel, tbias, stride=stride)
  (tout * nchw(cotangent)).sum().backward()

  assert out.shape == (2, out_h, out_w, 6) and (out_h, out_w) == (-(-height // stride),
                                                                    -(-width // stride))
  assert rel_err(out, nhwc(tout)) < 1e-4
  expected = (nhwc(tx.grad), nhwc(toffset.grad), nhwc(tmask.grad),
              tkernel.grad.numpy().transpose(2, 3, 1, 0), tbias.grad.numpy())
  for name, grad, want in zip(("x", "offset", "mask", "kernel", "bias"), grads, expected):
    assert np.abs(want).max() > 0, name
    assert rel_err(grad, want) < 1e-4, name


def test_deform_conv_dilation_matches_torch():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 8, 9, 3)).astype(np.float32)
  offset = (2 * rng.normal(size=(1, 8, 9, 18))).astype(np.float32)  # padding 2: same grid
  mask = rng.uniform(size=(1, 8, 9, 9)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  out = deform_conv.modulated_deform_conv(x, offset, mask, kernel, padding=2, dilation=2)
  want = torch_glip_dyconv.modulated_deform_conv(
      nchw(x), nchw(offset), nchw(mask), torch.tensor(kernel.transpose(3, 2, 0, 1)), padding=2,
      dilation=2)
  assert rel_err(out, nhwc(want)) < 1e-4


def plain_conv(x, kernel, stride=1, padding=((1, 1), (1, 1))):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offsets_full_mask_is_a_plain_conv(stride):
  x, offset, mask, kernel, _ = random_dcn_inputs(0, stride=stride)
  out = deform_conv.modulated_deform_conv(x, np.zeros_like(offset), np.ones_like(mask), kernel,
                                          stride=stride)
  assert rel_err(out, plain_conv(x, kernel, stride)) < 1e-5


def test_integer_offset_is_a_shifted_conv():
  x, offset, mask, kernel, _ = random_dcn_inputs(1)
  offset = np.zeros_like(offset)
  offset[..., 0::2] = 1.0  # dy = 1, dx = 0 for every tap: tap i of row oy reads row oy + i
  half_mask = np.full_like(mask, 0.5)
  out = deform_conv.modulated_deform_conv(x, offset, half_mask, kernel)
  # The same window one row lower: no zero row above, two below.
  assert rel_err(out, 0.5 * plain_conv(x, kernel, padding=((0, 2), (1, 1)))) < 1e-5
  assert rel_err(out, 0.5 * plain_conv(x, kernel)) > 0.1


def test_deform_conv_rejects_offsets_off_the_output_grid():
  x, offset, mask, kernel, _ = random_dcn_inputs(0)
  with pytest.raises(ValueError, match="offset has shape"):
    deform_conv.modulated_deform_conv(x, offset[:, :-1], mask, kernel)
  with pytest.raises(ValueError, match="mask has shape"):
    deform_conv.modulated_deform_conv(x, offset, mask[..., :8], kernel)


def test_modulated_deform_conv_module_init():
  x, offset, mask, _, _ = random_dcn_inputs(0, cin=64)
  params = deform_conv.ModulatedDeformConv(40).init(jax.random.PRNGKey(0), x, offset, mask)
  kernel, bias = params["params"]["kernel"], params["params"]["bias"]
  bound = 1 / np.sqrt(64 * 9)
  assert kernel.shape == (3, 3, 64, 40) and np.all(np.asarray(bias) == 0)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert abs(float(np.std(kernel)) - bound / np.sqrt(3)) < 0.05 * bound


def test_reinterpret_offset_buffer_concrete_example():
  # Per sample a (C=2, H=2, W=3) buffer; channel 0 holds 0..5, channel 1 holds 10..15.
  channel_major = np.stack([np.arange(6).reshape(2, 3), 10 + np.arange(6).reshape(2, 3)])
  batch = np.stack([channel_major, 100 + channel_major])  # (B=2, C, H, W)
  values = jnp.asarray(batch.transpose(0, 2, 3, 1))  # NHWC
  out = np.asarray(dyconv.reinterpret_offset_buffer(values, (1, 2)))
  # Flat per sample: 0 1 2 3 4 5 10 ... -> first 2*1*2 = 4 values -> channel 0 [0 1], channel 1
  # [2 3]; the second sample reads its own buffer.
  np.testing.assert_array_equal(out.transpose(0, 3, 1, 2),
                                [[[[0, 1]], [[2, 3]]], [[[100, 101]], [[102, 103]]]])
  assert dyconv.reinterpret_offset_buffer(values, (2, 3)) is values
  with pytest.raises(ValueError, match="needs 14 values"):
    dyconv.reinterpret_offset_buffer(values, (7, 1))


def test_resize_bilinear_align_corners_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
  for size in [(5, 7), (3, 4), (1, 1), (6, 1)]:
    want = torch.nn.functional.interpolate(nchw(x), size=size, mode="bilinear",
                                           align_corners=True)
    assert rel_err(dyconv.resize_bilinear_align_corners(x, size), nhwc(want)) < 1e-6


def perturbed_torch_dyconv(seed, channels, gn_groups, **flags):
  """The torch block with every parameter perturbed (GroupNorm affine, biases, the attention
  conv) and large offsets, so that no branch is a near-constant."""
  torch.manual_seed(seed)
  module = torch_glip_dyconv.DyConv(channels, gn_groups, **flags)
  with torch.no_grad():
    for name, param in module.named_parameters():
      if name.startswith("offset"):
        param.mul_(6.0)
      elif name.startswith("AttnConv"):
        param.normal_(0.0, 0.3)
      elif name.endswith("bias") or ".bn." in name:
        param.add_(0.3 * torch.randn_like(param))
  return module.eval()


@functools.cache
def jit_dyconv(**flags):
  return jax.jit(dyconv.DyConv(32, gn_groups=8, **flags).apply)


def torch_case(sizes, seed, **flags):
  """(features, torch outputs as NHWC, our params converted from the torch state dict)."""
  rng = np.random.default_rng(seed)
  features = [rng.normal(size=(2, h, w, 32)).astype(np.float32) for h, w in sizes]
  module = perturbed_torch_dyconv(seed, 32, 8, **flags)
  with torch.no_grad():
    want = [nhwc(y) for y in module([nchw(f) for f in features])]
  state = {name: value.numpy() for name, value in module.state_dict().items()}
  model = dyconv.DyConv(32, gn_groups=8, **flags)
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), features)["params"]
  params = common.merge_params(dyconv.convert_dyconv(state, **flags), init)  # strict
  return features, want, {"params": params}


NON_SQUARE = [(10, 13), (5, 7), (3, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize("sizes", [[(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], NON_SQUARE])
def test_dyconv_matches_torch(sizes):
  features, want, params = torch_case(sizes, 0)
  got = jit_dyconv()(params, features)
  assert len(got) == 5
  for level, (a, b) in enumerate(zip(got, want)):
    assert a.shape == features[level].shape
    assert rel_err(a, b) < 1e-4, level


def test_dyconv_gradients_match_torch():
  """Gradients of a random projection of all five outputs w.r.t. inputs and every parameter."""
  sizes = [(6, 7), (3, 4)]  # two levels: all three branches and the quirk, less to compile
  rng = np.random.default_rng(3)
  features = [rng.normal(size=(2, h, w, 32)).astype(np.float32) for h, w in sizes]
  cotangents = [rng.normal(size=f.shape).astype(np.float32) for f in features]
  module = perturbed_torch_dyconv(3, 32, 8)
  inputs = [nchw(f).requires_grad_() for f in features]
  outputs = module(inputs)
  sum((y * nchw(c)).sum() for y, c in zip(outputs, cotangents)).backward()
  state = {name: value.detach().numpy() for name, value in module.state_dict().items()}
  grads_state = {name: p.grad.numpy() for name, p in module.named_parameters()}
  model = dyconv.DyConv(32, gn_groups=8)

  def loss(params, features):
    outs = model.apply({"params": params}, features)
    return sum(jnp.sum(y * c) for y, c in zip(outs, cotangents))
  param_grads, feature_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      dyconv.convert_dyconv(state), features)
  want_params = common.flatten(dyconv.convert_dyconv(grads_state))
  for name, grad in common.flatten(param_grads).items():
    assert rel_err(grad, want_params[name]) < 1e-4, name
  for level, (grad, tin) in enumerate(zip(feature_grads, inputs)):
    assert rel_err(grad, nhwc(tin.grad)) < 1e-4, level


def test_dyconv_quirk_is_not_vacuous(monkeypatch):
  """Parity above pins the flat-prefix read only if it matters: with offsets resampled to the
  coarser grid instead (not what GLIP does), the finer levels' outputs move away from torch."""
  features, want, params = torch_case(NON_SQUARE[:3], 0)
  monkeypatch.setattr(dyconv, "reinterpret_offset_buffer", lambda v, hw: (
      v if v.shape[1:3] == hw else jax.image.resize(v, (v.shape[0], *hw, v.shape[3]), "nearest")))
  model = dyconv.DyConv(32, gn_groups=8)
  got = jax.jit(lambda p, f: model.apply(p, f))(params, features)  # fresh trace, patched
  for level in range(2):
    assert rel_err(got[level], want[level]) > 1e-2, level
  assert rel_err(got[2], want[2]) < 1e-4  # the coarsest level has no coarser branch


def test_dyconv_flags_match_torch():
  """No deformable conv (plain 3x3 convs, no offsets), no scale attention, plain ReLU."""
  flags = dict(use_dyrelu=False, use_deform=False, use_dyfuse=False)
  features, want, params = torch_case([(6, 5), (3, 3), (2, 2)], 1, **flags)
  got = dyconv.DyConv(32, gn_groups=8, **flags).apply(params, features)
  for a, b in zip(got, want):
    assert rel_err(a, b) < 1e-4


def test_convert_dyconv_names_unknown_and_missing_keys():
  state = {name: np.zeros(1) for name in dyconv.dyconv_param_names()}
  assert sorted(common.flatten(dyconv.convert_dyconv(state))) == sorted([
      f"DyConv_{k}/{part}/{leaf}" for k in range(3)
      for part, leaf in (("conv", "bias"), ("conv", "scale"), ("bn", "bias"), ("bn", "scale"))
  ] + ["offset/bias", "offset/scale", "AttnConv_1/bias", "AttnConv_1/scale", "relu/fc_0/bias",
       "relu/fc_0/scale", "relu/fc_2/bias", "relu/fc_2/scale"])  # 1-d stand-ins: 'scale'
  del state["relu.fc.2.bias"]
  state["relu.fc.1.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match=r"unknown \(1\): relu.fc.1.weight; missing \(1\): "
                                       r"relu.fc.2.bias"):
    dyconv.convert_dyconv(state)


def test_full_size_param_tree_and_count():
  """GLIP-T's DyConv (256 channels, GN 16) at P3..P7 of a 800x1344 image: shapes only."""
  sizes = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
  features = [jax.ShapeDtypeStruct((1, h, w, 256), jnp.float32) for h, w in sizes]
  model = dyconv.DyConv(256)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), features)["params"]
  flat = common.flatten(params)
  assert flat["DyConv_2/conv/kernel"].shape == (3, 3, 256, 256)
  assert flat["offset/kernel"].shape == (3, 3, 256, 27)
  assert flat["AttnConv_1/kernel"].shape == (1, 1, 256, 1)
  assert flat["relu/fc_0/kernel"].shape == (256, 64)
  assert flat["relu/fc_2/kernel"].shape == (64, 1024)
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == 1_917_276  # spec: ~1.92 M
  outputs = jax.eval_shape(model.apply, {"params": params}, features)
  assert [o.shape for o in outputs] == [f.shape for f in features]
