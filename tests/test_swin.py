"""Tests for jaxprompt/models/swin.py and its checkpoint loading.

Parity is checked against transformers' PyTorch `SwinModel` with random weights, at Swin-B size
and on tiny configurations. Microsoft-format checkpoints are written here from the transformers
weights by an independent renaming (no downloads).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file as save_safetensors_torch

from jaxprompt.models import common
from jaxprompt.models import swin


def rel_err(actual, expected):
  return np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()


def nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


@functools.cache
def param_shapes(model, height, width=None):
  images = jax.ShapeDtypeStruct((1, height, width or height, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]


def random_params(model, height, width=None, seed=0):
  """Random params from numpy: compiling `model.init` (its RNG) costs more than the forward."""
  rng = np.random.default_rng(seed)
  return common.unflatten({
      name: (1.0 if name.endswith("scale") else 0.0) + rng.normal(0, 0.1, x.shape).astype(x.dtype)
      for name, x in common.flatten(param_shapes(model, height, width)).items()})


@functools.cache
def jit_apply(model, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))


def hf_swin_config(variant, image_size, window_size, **kw):
  v = swin.decode_variant(variant)
  return transformers.SwinConfig(
      image_size=image_size, patch_size=4, embed_dim=v["embed_dim"], depths=list(v["depths"]),
      num_heads=list(v["num_heads"]), window_size=window_size, mlp_ratio=4.0, qkv_bias=True,
      hidden_act="gelu", layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, drop_path_rate=0.0, use_absolute_embeddings=False, **kw)


def random_hf(cls, config, seed=0, **kw):
  """transformers zero-initialises biases and bias tables, and LayerNorms to (1, 0): perturb all
  of them so that each one counts (tables at 0.5, so the -100 shift mask is not the only term)."""
  torch.manual_seed(seed)
  model = cls(config, **kw)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(0.5 * torch.randn_like(p))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn_like(p))
  return model.eval()


def microsoft_state_dict(hf_state, window_size):
  """transformers>=5 `SwinModel` state dict -> the names of microsoft/Swin-Transformer, with the
  `relative_position_index` and `attn_mask` buffers an official checkpoint carries."""
  out = {}
  for name, value in hf_state.items():
    name = (name.replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.")
            .replace("embeddings.norm.", "patch_embed.norm.")
            .replace("encoder.layers.", "layers.")
            .replace("layernorm_before.", "norm1.").replace("layernorm_after.", "norm2.")
            .replace("attention.relative_position_bias.", "attn.")
            .replace("attention.o_proj.", "attn.proj."))
    if name.startswith("layernorm."):
      name = "norm." + name.removeprefix("layernorm.")
    out[name] = value
  for name in [n for n in out if ".attention.q_proj." in n]:
    parts = [out.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
    out[name.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts, dim=0)
  n = window_size * window_size
  for name in [n for n in out if n.endswith("attn.relative_position_bias_table")]:
    block = name.removesuffix(".attn.relative_position_bias_table")
    out[block + ".attn.relative_position_index"] = torch.zeros((n, n), dtype=torch.int64)
    if int(block.rsplit(".", 1)[1]) % 2:
      out[block + ".attn_mask"] = torch.zeros((4, n, n))
  return out


# ------------------------------------------------------------------------------------------------
# Parity with transformers at Swin-B (window 7, 224 px), through both checkpoint formats.


@pytest.fixture(scope="module")
def swin_b(tmp_path_factory):
  hf = random_hf(transformers.SwinModel, hf_swin_config("B", 224, 7))
  images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    out = hf(pixel_values=images)
  folder = tmp_path_factory.mktemp("swin_b")
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers>=5 names
  save_safetensors_torch(state, str(folder / "hf.safetensors"))
  torch.save({"model": microsoft_state_dict(state, 7)}, str(folder / "microsoft.pth"))
  return dict(folder=folder, images=nhwc(images), encoded=out.last_hidden_state.numpy(),
              pooled=out.pooler_output.numpy())


def test_parity_with_transformers_swin_b(swin_b):
  model = swin.Model(num_classes=0, variant="B")
  init = param_shapes(model, 224)  # shapes and dtypes are all that loading needs from init
  from_microsoft = swin.load(init, swin_b["folder"] / "microsoft.pth")
  from_hf = swin.load(init, swin_b["folder"] / "hf.safetensors")
  jax.tree.map(np.testing.assert_array_equal, from_microsoft, from_hf)
  table = from_microsoft["layers_2"]["blocks_17"]["attn"]["relative_position_bias_table"]
  assert table.shape == (169, 16)

  pooled, aux = jit_apply(model)({"params": from_microsoft}, swin_b["images"])
  assert aux["encoded"].shape == swin_b["encoded"].shape == (2, 49, 1024)
  assert [s.shape for s in aux["stages"]] == [(2, 56, 56, 128), (2, 28, 28, 256),
                                             (2, 14, 14, 512), (2, 7, 7, 1024)]
  errors = rel_err(aux["encoded"], swin_b["encoded"]), rel_err(pooled, swin_b["pooled"])
  print(f"\nSwin-B vs transformers SwinModel: max rel error last_hidden_state {errors[0]:.2e}, "
        f"pooled {errors[1]:.2e}")
  assert max(errors) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Tiny configurations.


def test_parity_window12_384_classifier_legacy_names(tmp_path):
  """Window 12 at 384 px (stage maps 96, 48, 24, 12: the last one is a single unshifted window),
  through `save_pretrained` (the Hub's legacy names, 'swin.' prefix, 'classifier')."""
  hf = random_hf(transformers.SwinForImageClassification,
                 hf_swin_config("mu", 384, 12, num_labels=5))
  hf.save_pretrained(str(tmp_path))
  images = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = hf(pixel_values=images).logits.numpy()
  model = swin.Model(num_classes=5, variant="mu", window_size=12)
  params = swin.load(random_params(model, 384), tmp_path / "model.safetensors", dont_load=())
  logits, _ = jit_apply(model)({"params": params}, nhwc(images))
  error = rel_err(logits, expected)
  print(f"\nmu window 12 / 384 px logits vs transformers: max rel error {error:.2e}")
  assert error <= 1e-5


def test_parity_non_square_image(tmp_path):
  """224x448: stage maps 56x112 ... 7x14, the last with one row of windows and no shift."""
  hf = random_hf(transformers.SwinModel, hf_swin_config("mu", (224, 448), 7))
  torch.save(hf.state_dict(), str(tmp_path / "pytorch_model.bin"))
  images = torch.randn(1, 3, 224, 448, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    expected = hf(pixel_values=images).last_hidden_state.numpy()
  model = swin.Model(num_classes=0, variant="mu")
  params = swin.load(random_params(model, 224, 448), tmp_path / "pytorch_model.bin")
  _, aux = jit_apply(model)({"params": params}, nhwc(images))
  error = rel_err(aux["encoded"], expected)
  print(f"\nmu 224x448 vs transformers: max rel error {error:.2e}")
  assert aux["stages"][-1].shape == (1, 7, 14, 128) and error <= 1e-5


def reference_unshifted_single_window_block(params, x, num_heads):
  """A Swin block on a map that is one window, written out directly (loop over token pairs for
  the relative position bias), in numpy float64."""
  x = np.asarray(x, np.float64)[0]  # (H, W, C)
  height, width, channels = x.shape
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  ln = lambda y, q: (y - y.mean(-1, keepdims=True)) / np.sqrt(
      y.var(-1, keepdims=True) + 1e-5) * q["scale"] + q["bias"]
  dense = lambda y, q: y @ q["kernel"] + q["bias"]
  tokens = x.reshape(-1, channels)
  coords = [(r, c) for r in range(height) for c in range(width)]
  side = 2 * height - 1  # the table of a window of side `height`
  bias = np.array([[p["attn"]["relative_position_bias_table"][
      (qr - kr + height - 1) * side + (qc - kc + height - 1)] for kr, kc in coords]
      for qr, qc in coords])  # (N, N, heads)
  qkv = dense(ln(tokens, p["norm1"]), p["attn"]["qkv"]).reshape(len(coords), 3, num_heads, -1)
  q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
  logits = np.einsum("qhd,khd->hqk", q / np.sqrt(q.shape[-1]), k) + bias.transpose(2, 0, 1)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attended = np.einsum("hqk,khd->qhd", probs, v).reshape(len(coords), channels)
  tokens = tokens + dense(attended, p["attn"]["proj"])
  hidden = dense(ln(tokens, p["norm2"]), p["mlp"]["fc1"])
  hidden = hidden * 0.5 * (1 + np.vectorize(math.erf)(hidden / np.sqrt(2)))
  return (tokens + dense(hidden, p["mlp"]["fc2"])).reshape(height, width, channels)


def test_window_is_clipped_to_a_smaller_map():
  """At 192 px with window 12 the last map is 6x6: one 6x6 window, 11x11 table, no shift (the
  original's rule; transformers 5 cannot run this case, so the reference is written out here)."""
  model = swin.Model(num_classes=0, variant="mu", window_size=12)
  params = random_params(model, 192)
  assert params["layers_2"]["blocks_1"]["attn"]["relative_position_bias_table"].shape == (529, 4)
  assert params["layers_3"]["blocks_1"]["attn"]["relative_position_bias_table"].shape == (121, 4)
  assert swin.effective_window(6, 6, 12) == (6, 0)
  assert swin.effective_window(12, 24, 12) == (12, 0)
  assert swin.effective_window(24, 24, 12) == (12, 6)

  block = swin.SwinBlock(num_heads=4, window_size=12, shifted=True)
  block_params = params["layers_3"]["blocks_1"]
  x = np.random.default_rng(1).normal(size=(1, 6, 6, 128)).astype(np.float32)
  actual = jax.jit(block.apply)({"params": block_params}, x)[0]
  expected = reference_unshifted_single_window_block(block_params, x, num_heads=4)
  assert rel_err(actual, expected) <= 1e-5


def test_image_size_errors():
  model = swin.Model(num_classes=0, variant="mu")
  for size, message in [((225, 224), "not divisible by the patch size 4"),
                        ((224, 240), "stage-0 map 56x60 does not tile into 7x7 windows"),
                        ((84, 84), "stage-0 map 21x21 cannot be merged 2x2")]:
    with pytest.raises(ValueError, match=message) as error:
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))
    assert "multiples of 224" in str(error.value)
  with pytest.raises(ValueError, match="stage-0 map 56x56 does not tile into 12x12"):
    swin.Model(num_classes=0, variant="mu", window_size=12).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  with pytest.raises(ValueError, match="Unknown Swin variant 'XL'"):
    swin.decode_variant("XL")


def test_sizes_table():
  assert swin.SIZES["T"] == (96, (2, 2, 6, 2), (3, 6, 12, 24))
  assert swin.SIZES["S"] == (96, (2, 2, 18, 2), (3, 6, 12, 24))
  assert swin.SIZES["B"] == (128, (2, 2, 18, 2), (4, 8, 16, 32))
  assert swin.SIZES["L"] == (192, (2, 2, 18, 2), (6, 12, 24, 48))
  shapes = jax.eval_shape(swin.Model(num_classes=1000, variant="T").init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 28_288_354  # Swin-T's published count


def test_patch_merging_order():
  """Channels of a merged token: (even row, even col), (odd, even), (even, odd), (odd, odd)."""
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  merging = swin.PatchMerging()
  params = merging.init(jax.random.PRNGKey(0), x)["params"]
  assert params["reduction"]["kernel"].shape == (4, 2) and "bias" not in params["reduction"]
  capture = {}
  def norm_input(next_fun, args, kwargs, context):
    if context.module.name == "norm":
      capture["x"] = args[0]
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(norm_input):
    merging.apply({"params": params}, x)
  np.testing.assert_array_equal(capture["x"][0, 0, 1], [2, 6, 3, 7])


# ------------------------------------------------------------------------------------------------
# Loading: errors and window resizing.


@pytest.fixture(scope="module")
def mu_microsoft(tmp_path_factory):
  """A tiny random model's weights under Microsoft's names, as torch tensors."""
  hf = random_hf(transformers.SwinForImageClassification,
                 hf_swin_config("mu", 224, 7, num_labels=3))
  state = {k.removeprefix("swin.").replace("classifier.", "head."): v
           for k, v in hf.state_dict().items()}
  return microsoft_state_dict(state, 7)


def save(tmp_path, name, state):
  path = tmp_path / name
  torch.save({"model": state}, str(path))
  return path


def test_load_errors_list_missing_extra_and_misshaped(tmp_path, mu_microsoft):
  init = param_shapes(swin.Model(num_classes=3, variant="mu"), 224)
  state = dict(mu_microsoft)
  del state["layers.1.blocks.0.norm1.weight"], state["norm.bias"]
  state["layers.3.blocks.2.norm1.weight"] = torch.ones(128)
  state["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(169, 3)
  path = save(tmp_path, "bad.pth", state)
  with pytest.raises(ValueError) as error:
    swin.load(init, path)
  message = str(error.value)
  assert str(path) in message
  for expected in ["missing from the checkpoint (2)", "layers_1/blocks_0/norm1/scale",
                   "norm/bias", "in the checkpoint but not in the model (1)",
                   "layers_3/blocks_2/norm1/scale", "wrong shape (1)",
                   "layers_0/blocks_0/attn/relative_position_bias_table: checkpoint (169, 3) vs "
                   "expected (169, 2)"]:
    assert expected in message

  with pytest.raises(ValueError, match=r"not Swin parameters \(2\): absolute_pos_embed, "
                                       r"layers.0.blocks.0.attn.qkv_extra.weight"):
    swin.load(init, save(tmp_path, "ape.pth", {
        **mu_microsoft, "absolute_pos_embed": torch.zeros(1, 3136, 16),
        "layers.0.blocks.0.attn.qkv_extra.weight": torch.zeros(1)}))
  with pytest.raises(ValueError, match="'params' collection"):
    swin.load({"params": init}, path)


def test_load_drops_head_and_keeps_init(tmp_path, mu_microsoft):
  path = save(tmp_path, "ok.pth", mu_microsoft)
  model = swin.Model(num_classes=7, variant="mu", head_zeroinit=False)
  init = random_params(model, 224)
  params = swin.load(init, path)  # checkpoint head is (3, 128): dropped by dont_load
  np.testing.assert_array_equal(params["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(params["layers_0"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                mu_microsoft["layers.0.blocks.1.attn.qkv.weight"].numpy().T)
  conv = mu_microsoft["patch_embed.proj.weight"].numpy()  # (16, 3, 4, 4) OIHW
  np.testing.assert_array_equal(params["patch_embed"]["proj"]["kernel"], conv.transpose(2, 3, 1, 0))


def test_hf_qkv_and_mixed_names_errors():
  base = "encoder.layers.0.blocks.0.attention."
  with pytest.raises(ValueError, match=r"needs query, key and value \(q, k, v\); found only q, v"):
    swin.convert_hf_swin({base + "q_proj.weight": np.zeros((4, 4)),
                          base + "v_proj.weight": np.zeros((4, 4))})
  with pytest.raises(ValueError, match="both map to 'layers.0.blocks.0.mlp.fc1.bias'"):
    swin.convert_hf_swin({"encoder.layers.0.blocks.0.mlp.fc1.bias": np.zeros(4),
                          "encoder.layers.0.blocks.0.intermediate.dense.bias": np.zeros(4)})
  with pytest.raises(ValueError, match=r"not transformers Swin parameters \(1\): "
                                       r"embeddings.mask_token"):
    swin.convert_hf_swin({"embeddings.mask_token": np.zeros((1, 1, 4))})


def test_relative_position_bias_table_resize_matches_torch_bicubic(tmp_path, mu_microsoft):
  table = np.random.default_rng(0).normal(size=(169, 4)).astype(np.float32)
  for side in (23, 9, 13):
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(table).T.reshape(1, 4, 13, 13), size=(side, side), mode="bicubic",
        align_corners=False).reshape(4, side * side).T.numpy()
    actual = swin.resize_relative_position_bias_table(table, side * side)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="square numbers"):
    swin.resize_relative_position_bias_table(table, 170)

  # A window-7 checkpoint fine-tuned at window 12 (384 px): every table is resized 13^2 -> 23^2.
  model = swin.Model(num_classes=0, variant="mu", window_size=12)
  params = swin.load(param_shapes(model, 384), save(tmp_path, "w7.pth", mu_microsoft))
  name = "layers.2.blocks.1.attn.relative_position_bias_table"
  np.testing.assert_array_equal(
      params["layers_2"]["blocks_1"]["attn"]["relative_position_bias_table"],
      swin.resize_relative_position_bias_table(mu_microsoft[name].numpy(), 529))


# ------------------------------------------------------------------------------------------------
# Training-time behaviour, precision and hooks.


def test_gradients_are_finite_with_drop_path():
  model = swin.Model(num_classes=3, variant="mu", drop_path_rate=0.3)
  params = random_params(model, 224)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 224, 224, 3))

  def loss(p, x, rng):
    logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
    return jnp.mean(logits ** 2)

  loss_and_grad = jax.jit(jax.value_and_grad(loss))
  value, grads = loss_and_grad(params, images, jax.random.PRNGKey(2))
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  table_grad = grads["layers_0"]["blocks_1"]["attn"]["relative_position_bias_table"]
  assert np.abs(table_grad).max() > 0 and np.abs(grads["patch_embed"]["proj"]["kernel"]).max() > 0
  # Stochastic depth is live in training: another dropout key drops other residual branches.
  assert loss_and_grad(params, images, jax.random.PRNGKey(3))[0] != value


def test_bfloat16_compute_keeps_float32_params():
  model = swin.Model(num_classes=0, variant="mu")
  bf16 = swin.Model(num_classes=0, variant="mu", dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(param_shapes(bf16, 224))} == {jnp.dtype("float32")}
  params = random_params(model, 224)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 224, 224, 3))
  _, aux = jit_apply(model)({"params": params}, images)
  _, aux_bf16 = jit_apply(bf16)({"params": params}, images)
  assert aux_bf16["encoded"].dtype == jnp.bfloat16
  error = rel_err(aux_bf16["encoded"].astype(jnp.float32), np.asarray(aux["encoded"]))
  print(f"\nmu bf16 vs f32: max rel error {error:.2e}")
  assert error < 0.05


def test_block_hook_sees_every_block_and_can_run_a_second_stream():
  """A hook that stacks a second map on the batch before the first block: it passes the same
  blocks and merges as the image map (SA2VP's prompt map), which itself is unchanged."""
  model = swin.Model(num_classes=0, variant="mu")
  params = random_params(model, 224)
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 224, 224, 3))
  plain, _ = jit_apply(model)({"params": params}, images)
  seen = []

  def two_streams(stage, index, block, x):
    seen.append((stage, index, x.shape))
    if (stage, index) == (0, 0):
      x = jnp.concatenate([x, jnp.zeros_like(x)])
    return block(x)

  both, aux = jit_apply(model, block_hook=two_streams)({"params": params}, images)
  assert [s[:2] for s in seen] == [(i, j) for i in range(4) for j in range(2)]
  assert seen[2][2] == (2, 28, 28, 32)
  assert both.shape == (2, 128) and aux["stages"][2].shape == (2, 14, 14, 64)
  np.testing.assert_allclose(both[:1], plain, rtol=1e-5, atol=1e-5)


def test_subclass_can_reuse_the_patch_embed_norm_for_a_second_map():
  """The route for methods whose second map starts after the patch convolution (SA2VP's prompt
  map goes through the frozen patch-embed LayerNorm only)."""

  class TwoMaps(swin.Model):
    @nn.compact
    def __call__(self, images, prompt_map):
      embed = self.make_patch_embed()
      return embed(images), embed.norm(prompt_map)

  model = TwoMaps(num_classes=0, variant="mu")
  images, prompt_map = jnp.ones((1, 8, 8, 3)), jnp.arange(64.0).reshape(1, 2, 2, 16)
  variables = model.init(jax.random.PRNGKey(0), images, prompt_map)
  assert set(variables["params"]) == {"patch_embed"}
  assert set(variables["params"]["patch_embed"]) == {"proj", "norm"}
  _, normed = model.apply(variables, images, prompt_map)
  np.testing.assert_allclose(normed.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(normed.std(-1), 1, atol=1e-3)


def test_hook_modules_created_outside_the_hook_belong_to_the_caller():
  class Adapted(swin.Model):
    @nn.compact
    def __call__(self, images):
      adapter = nn.Dense(16, name="adapter")  # created here, called inside the hook

      def hook(stage, index, block, x):
        return block(x + adapter(x)) if (stage, index) == (0, 0) else block(x)

      return super().__call__(images, block_hook=hook)

  shapes = param_shapes(Adapted(num_classes=0, variant="mu"), 224)
  assert set(shapes) == {"adapter", "patch_embed", "layers_0", "layers_1", "layers_2",
                         "layers_3", "norm"}
  assert set(shapes["layers_0"]) == {"blocks_0", "blocks_1", "downsample"}
