"""Tests for jaxprompt/models/clip.py (CLIP model and loaders) and clip_tokenizer.py.

Parity with transformers' PyTorch `CLIPModel` uses random weights at ViT-B/32 widths: a 768-wide
vision tower (12 heads) at 224 px with 32-px patches, a 512-wide text tower (8 heads) with 77
positions and the 49408-token vocabulary, 512-d joint space; 2 blocks per tower instead of 12 for
speed. The OpenAI format is tested on state dicts that the test renames into OpenAI's key layout
itself (packed q,k,v `in_proj`, transposed `visual.proj`/`text_projection`, metadata scalars),
saved plain (`torch.save`) and as a TorchScript archive. transformers has no CLIP ResNet, so the
modified ResNet is checked against a small PyTorch reference written here from the paper's
description, with OpenAI's parameter names. No downloads: OpenAI's BPE vocabulary is used when
CLIP_BPE_PATH names it (or a copy lies beside the checkout; those tests skip otherwise); a tiny
vocabulary is written here.
"""
import functools
import gzip
import math
import os
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file as save_safetensors_torch

from jaxprompt.models import clip
from jaxprompt.models import clip_tokenizer
from jaxprompt.models import common

MAX_REL_ERR = 1e-4


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def hf_clip_config(vision_width, vision_heads, patch_size, image_size, text_width, text_heads,
                   projection_dim, layers=2):
  return transformers.CLIPConfig(
      vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width,
                         num_attention_heads=vision_heads, num_hidden_layers=layers,
                         patch_size=patch_size, image_size=image_size),
      text_config=dict(hidden_size=text_width, intermediate_size=4 * text_width,
                       num_attention_heads=text_heads, num_hidden_layers=layers,
                       vocab_size=49408, max_position_embeddings=77),
      projection_dim=projection_dim)


def randomize_torch_(model, seed):
  """Perturb LayerNorm/BatchNorm parameters, biases and BN statistics so that all of them count."""
  generator = torch.Generator().manual_seed(seed)
  noise = lambda t, std: std * torch.randn(t.shape, generator=generator)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = re.search(r"(layer_?norm|layrnorm|ln_|bn\d|downsample\.1)", name)
      if is_norm and name.endswith("weight"):
        p.copy_(1.0 + noise(p, 0.1))
      elif name.endswith("bias") or is_norm:
        p.copy_(noise(p, 0.05))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(noise(b, 0.1))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=generator))
  return model.eval()


def random_token_ids(lengths, seed):
  """Rows [SOT] + random ids + [EOT] + zero padding, as CLIP's tokenizer writes them."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), 77), np.int64)
  for i, length in enumerate(lengths):
    ids[i, :length] = [49406, *rng.integers(1, 49406, length - 2), 49407]
  return ids


def openai_state_dict_from_hf(hf_state):
  """transformers CLIPModel state dict -> OpenAI `clip/model.py` layout, written independently of
  `clip.hf_to_openai_state_dict`, with the scalars OpenAI's TorchScript files carry."""
  hf_state = {k: v.detach().clone() for k, v in hf_state.items()}
  out = {"logit_scale": hf_state.pop("logit_scale"),
         "text_projection": hf_state.pop("text_projection.weight").T.contiguous(),
         "visual.proj": hf_state.pop("visual_projection.weight").T.contiguous()}
  prefixes = [("text_model.embeddings.token_embedding.", "token_embedding."),
              ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
              ("text_model.final_layer_norm.", "ln_final."),
              ("text_model.encoder.layers.", "transformer.resblocks."),
              ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
              ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
              ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
              ("vision_model.pre_layrnorm.", "visual.ln_pre."),
              ("vision_model.post_layernorm.", "visual.ln_post."),
              ("vision_model.encoder.layers.", "visual.transformer.resblocks.")]
  inside = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."),
            ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]
  for name in sorted(hf_state):
    if name.endswith("position_ids") or re.search(r"\.[qkv]_proj\.", name):
      continue
    new = name
    for old, replacement in prefixes + inside:
      new = new.replace(old, replacement)
    out[new] = hf_state[name]
  for tower, ours in (("text_model", "transformer"), ("vision_model", "visual.transformer")):
    for i in range(1 + max(int(m.group(1)) for n in hf_state
                           if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.", n)))):
      for kind in ("weight", "bias"):
        out[f"{ours}.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
            [hf_state[f"{tower}.encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
  image_size = int(round(math.sqrt(out["visual.positional_embedding"].shape[0] - 1)))
  image_size *= out["visual.conv1.weight"].shape[-1]
  out.update(input_resolution=torch.tensor(image_size), context_length=torch.tensor(77),
             vocab_size=torch.tensor(49408))
  return out


def projected(features):
  """`get_{image,text}_features` output as numpy: a tensor before transformers 5, else its
  pooler_output."""
  return getattr(features, "pooler_output", features).numpy()


def nhwc(images):
  return jnp.asarray(images.numpy().transpose(0, 2, 3, 1))


@functools.cache
def jitted(model, method_name):
  return jax.jit(functools.partial(model.apply, method=getattr(clip.Model, method_name)))


def clip_outputs(model, variables, images, token_ids):
  image_features = jitted(model, "encode_image")(variables, images)
  text_features = jitted(model, "encode_text")(variables, jnp.asarray(token_ids))
  logits, _ = jitted(model, "__call__")(variables, images, jnp.asarray(token_ids))
  return image_features, text_features, logits


# ------------------------------------------------------------------------------------------------
# Parity with transformers' CLIPModel at ViT-B/32 widths (2 blocks per tower).


@pytest.fixture(scope="module")
def hf_b32(tmp_path_factory):
  torch.manual_seed(0)
  hf = randomize_torch_(transformers.CLIPModel(
      hf_clip_config(768, 12, 32, 224, 512, 8, 512)), seed=1)
  with torch.no_grad():
    hf.logit_scale.fill_(math.log(100.0))
  images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
  token_ids = random_token_ids([2, 9, 40, 77], seed=3)
  with torch.no_grad():
    expected = dict(
        image=projected(hf.get_image_features(pixel_values=images)),
        text=projected(hf.get_text_features(input_ids=torch.as_tensor(token_ids))),
        logits=hf(input_ids=torch.as_tensor(token_ids), pixel_values=images)
        .logits_per_image.numpy())
  folder = tmp_path_factory.mktemp("hf_b32")
  hf.save_pretrained(str(folder))  # model.safetensors
  torch.save(openai_state_dict_from_hf(hf.state_dict()), str(folder / "openai.pt"))
  return dict(folder=folder, images=nhwc(images), token_ids=token_ids, expected=expected)


@pytest.mark.parametrize("filename", ["model.safetensors", "openai.pt"])
def test_parity_with_transformers_clip(hf_b32, filename):
  path = hf_b32["folder"] / filename
  model, variables = clip.load_pretrained(path)
  assert (model.vision_layers, model.vision_width, model.vision_heads, model.vision_patch_size,
          model.image_size) == (2, 768, 12, 32, 224)
  assert (model.text_layers, model.text_width, model.text_heads, model.context_length,
          model.vocab_size, model.embed_dim) == (2, 512, 8, 77, 49408, 512)
  assert set(variables) == {"params"}
  image, text, logits = clip_outputs(model, variables, hf_b32["images"], hf_b32["token_ids"])
  errors = {"image": rel_err(image, hf_b32["expected"]["image"]),
            "text": rel_err(text, hf_b32["expected"]["text"]),
            "logits": rel_err(logits, hf_b32["expected"]["logits"])}
  print(f"\nmax relative error vs transformers CLIPModel ({filename}): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert all(v <= MAX_REL_ERR for v in errors.values()), errors

  # `load` into existing init variables gives the same weights as `load_pretrained`.
  reloaded = clip.load(clip.init_variables_like(model), path)
  for name, value in common.flatten(reloaded).items():
    np.testing.assert_array_equal(value, common.flatten(variables)[name], err_msg=name)


def test_openai_layout_is_openai_conversion_of_hf(hf_b32):
  """Our HF -> OpenAI renaming agrees with the test's independent one, name for name."""
  ours = clip.hf_to_openai_state_dict(common.load_torch_state_dict(
      hf_b32["folder"] / "model.safetensors"))
  theirs = common.load_torch_state_dict(hf_b32["folder"] / "openai.pt")
  assert set(theirs) - set(ours) == set(clip.OPENAI_METADATA)
  for name, value in ours.items():
    np.testing.assert_array_equal(value, theirs[name], err_msg=name)
  assert ours["visual.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 768, 768)
  assert ours["text_projection"].shape == (512, 512) and ours["visual.proj"].shape == (768, 512)


# ------------------------------------------------------------------------------------------------
# Modified ResNet: a PyTorch reference in OpenAI's key layout, TorchScript archive.


class TorchBottleneck(torch.nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.stride = stride
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(4 * planes)
    self.has_shortcut = stride > 1 or inplanes != 4 * planes
    if self.has_shortcut:  # keys downsample.0 (conv) and downsample.1 (BN), as OpenAI's
      self.downsample = torch.nn.ModuleDict({"0": torch.nn.Conv2d(inplanes, 4 * planes, 1,
                                                                  bias=False),
                                             "1": torch.nn.BatchNorm2d(4 * planes)})

  def forward(self, x):
    pool = (lambda t: F.avg_pool2d(t, self.stride)) if self.stride > 1 else (lambda t: t)
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(pool(y)))
    if self.has_shortcut:
      x = self.downsample["1"](self.downsample["0"](pool(x)))
    return F.relu(x + y)


class TorchAttentionPool(torch.nn.Module):
  def __init__(self, tokens, channels, heads, output_dim):
    super().__init__()
    self.heads = heads
    self.positional_embedding = torch.nn.Parameter(torch.randn(tokens, channels) / channels**0.5)
    self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(channels, channels)
                                             for _ in range(3))
    self.c_proj = torch.nn.Linear(channels, output_dim)

  def forward(self, x):  # (B, C, H, W)
    x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding
    batch, tokens, channels = x.shape
    split = lambda t: t.reshape(batch, t.shape[1], self.heads, -1).transpose(1, 2)
    q, k, v = split(self.q_proj(x[:, :1])), split(self.k_proj(x)), split(self.v_proj(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1]**0.5, dim=-1)  # (B, h, 1, T)
    return self.c_proj((weights @ v).transpose(1, 2).reshape(batch, channels))


class TorchModifiedResNet(torch.nn.Module):
  def __init__(self, layers, width, heads, output_dim, image_size):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(width // 2)
    self.conv2 = torch.nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(width // 2)
    self.conv3 = torch.nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(width)
    inplanes = width
    for stage, blocks in enumerate(layers):
      planes, stride = width * 2**stage, 1 if stage == 0 else 2
      stage_blocks = []
      for j in range(blocks):
        stage_blocks.append(TorchBottleneck(inplanes, planes, stride if j == 0 else 1))
        inplanes = 4 * planes
      setattr(self, f"layer{stage + 1}", torch.nn.Sequential(*stage_blocks))
    self.attnpool = TorchAttentionPool((image_size // 32)**2 + 1, 32 * width, heads, output_dim)

  def forward(self, x):
    for i in (1, 2, 3):
      x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
    x = F.avg_pool2d(x, 2)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.attnpool(x)


class TorchOpenAIClip(torch.nn.Module):
  """`visual` runs; every other OpenAI entry is only held, under its own dotted name."""

  def __init__(self, visual, other_entries):
    super().__init__()
    self.visual = visual
    for name, tensor in other_entries.items():
      *parents, leaf = name.split(".")
      module = self
      for part in parents:
        if not hasattr(module, part):
          module.add_module(part, torch.nn.Module())
        module = getattr(module, part)
      if tensor.is_floating_point() and tensor.ndim:
        module.register_parameter(leaf, torch.nn.Parameter(tensor))
      else:
        module.register_buffer(leaf, tensor)

  def forward(self, images):
    return self.visual(images)


RN_LAYERS, RN_WIDTH, RN_HEADS, RN_IMAGE = (1, 2, 1, 1), 8, 16, 64  # head dim 32 * 8 / 16 = 16


@pytest.fixture(scope="module")
def openai_rn(tmp_path_factory):
  """A tiny OpenAI-layout CLIP RN as a TorchScript archive: our ResNet reference + the text tower
  of a tiny transformers CLIPModel (32 wide, 2 heads of 16), with reference outputs."""
  torch.manual_seed(0)
  visual = randomize_torch_(TorchModifiedResNet(RN_LAYERS, RN_WIDTH, RN_HEADS, 16, RN_IMAGE), 1)
  hf = randomize_torch_(transformers.CLIPModel(hf_clip_config(32, 2, 8, 32, 32, 2, 16)), seed=2)
  text_entries = {name: t for name, t in openai_state_dict_from_hf(hf.state_dict()).items()
                  if not name.startswith("visual.")}
  text_entries["input_resolution"] = torch.tensor(RN_IMAGE)
  images = torch.randn(3, 3, RN_IMAGE, RN_IMAGE, generator=torch.Generator().manual_seed(4))
  token_ids = random_token_ids([3, 12], seed=5)
  with torch.no_grad():
    expected_image = visual(images).numpy()
    expected_text = projected(hf.get_text_features(input_ids=torch.as_tensor(token_ids)))
  path = tmp_path_factory.mktemp("openai_rn") / "RN-tiny.pt"
  with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, OpenAI's format
    warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", DeprecationWarning)
    traced = torch.jit.trace(TorchOpenAIClip(visual, text_entries).eval(), images[:1])
    torch.jit.save(traced, str(path))
  return dict(path=path, images=nhwc(images), token_ids=token_ids, expected_image=expected_image,
              expected_text=expected_text, torch_state=TorchOpenAIClip(visual, text_entries))


def test_resnet_parity_from_torchscript_archive(openai_rn):
  state = clip.read_state_dict(openai_rn["path"])  # torch.jit.load(...).state_dict()
  assert "visual.layer2.1.conv3.weight" in state and "visual.attnpool.c_proj.bias" in state
  assert "visual.layer1.0.downsample.1.running_var" in state and "input_resolution" in state
  model, variables = clip.load_pretrained(openai_rn["path"], head_dim=16)
  assert model.is_resnet
  assert (tuple(model.vision_layers), model.vision_width, model.vision_heads, model.image_size,
          model.embed_dim) == (RN_LAYERS, RN_WIDTH, RN_HEADS, RN_IMAGE, 16)
  assert set(variables) == {"params", "batch_stats"}
  assert variables["params"]["visual"]["attnpool"]["attn"]["query"]["kernel"].shape == (256, 16, 16)
  image = jitted(model, "encode_image")(variables, openai_rn["images"])
  text = jitted(model, "encode_text")(variables, jnp.asarray(openai_rn["token_ids"]))
  errors = {"image": rel_err(image, openai_rn["expected_image"]),
            "text": rel_err(text, openai_rn["expected_text"])}
  print("\nmax relative error vs the PyTorch ResNet reference / transformers text tower: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert all(v <= MAX_REL_ERR for v in errors.values()), errors

  # train=True (LMPT runs the frozen RN50 so) normalises with batch statistics and updates them.
  encode = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"],
                                     method=clip.Model.encode_image))
  train_image, updates = encode(variables, openai_rn["images"])
  assert rel_err(train_image, image) > 1e-3
  assert not np.allclose(updates["batch_stats"]["visual"]["bn1"]["mean"],
                         variables["batch_stats"]["visual"]["bn1"]["mean"])


def test_torchscript_and_plain_state_dict_read_the_same(openai_rn, tmp_path):
  plain = {k: v.detach() for k, v in openai_rn["torch_state"].state_dict().items()}
  torch.save(plain, str(tmp_path / "plain.pt"))
  from_jit = clip.read_state_dict(openai_rn["path"])
  from_plain = clip.read_state_dict(tmp_path / "plain.pt")
  assert set(from_jit) == set(from_plain)
  for name in from_plain:
    np.testing.assert_array_equal(from_jit[name], from_plain[name], err_msg=name)


# Published parameter counts of OpenAI's released models (`sum(p.numel() for p in
# model.parameters())`; BatchNorm running statistics are buffers, not counted).
OPENAI_PARAM_COUNTS = {
    "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
    "ViT-L/14@336px": 427_944_193, "RN50": 102_007_137, "RN101": 119_688_033,
    "RN50x4": 178_300_601, "RN50x16": 290_979_217, "RN50x64": 623_258_305,
}


@pytest.mark.parametrize("variant", [
    v if v in ("ViT-B/32", "RN50") else pytest.param(v, marks=pytest.mark.slow)
    for v in OPENAI_PARAM_COUNTS])
def test_released_sizes_have_openai_parameter_counts(variant):
  model = clip.Model(**clip.decode_variant(variant))
  shapes = jax.eval_shape(lambda: clip.init_variables_like(model))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"])) == (
      OPENAI_PARAM_COUNTS[variant])


def random_variables(model, seed):
  """Variables of `model` filled with numpy noise (jitting `model.init` compiles slowly on CPU):
  N(0, 0.05) params, positive BatchNorm variances, OpenAI's initial logit scale log(1/0.07)."""
  rng = np.random.default_rng(seed)
  flat = common.flatten(clip.init_variables_like(model))
  for name, value in flat.items():
    if name.endswith("/var"):
      flat[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif name == "params/logit_scale":
      flat[name] = np.float32(math.log(1 / 0.07))
    else:
      flat[name] = rng.normal(0, 0.05, value.shape).astype(np.float32)
  return jax.tree.map(jnp.asarray, common.unflatten(flat))


@pytest.mark.parametrize("variant", ["ViT-mu/8", "RN-mu"])
def test_tiny_sizes_run(variant):
  model = clip.Model(**clip.decode_variant(variant))
  images = jnp.ones((2, model.image_size, model.image_size, 3))
  token_ids = jnp.asarray(random_token_ids([4, 7, 77], seed=0))
  logits, aux = jitted(model, "__call__")(random_variables(model, 0), images, token_ids)
  assert logits.shape == (2, 3) and aux["logits_per_text"].shape == (3, 2)
  np.testing.assert_allclose(np.linalg.norm(aux["image_features"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(aux["logit_scale"], 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(logits, aux["logit_scale"] * aux["image_features"]
                             @ aux["text_features"].T, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Text tower on given token embeddings (what CoOp feeds it); dtype.


@pytest.fixture(scope="module")
def mu_vit():
  model = clip.Model(**clip.decode_variant("ViT-mu/8"))
  return model, random_variables(model, 1)


def test_encode_text_embeddings_matches_encode_text(mu_vit):
  model, variables = mu_vit
  token_ids = jnp.asarray(random_token_ids([5, 9, 77], seed=1))
  eot = jnp.argmax(token_ids, axis=-1)
  embeddings = model.apply(variables, token_ids, method=clip.Model.embed_tokens)
  np.testing.assert_array_equal(
      embeddings, variables["params"]["token_embedding"]["embedding"][token_ids])
  encode = jitted(model, "encode_text_embeddings")
  from_embeddings = encode(variables, embeddings, eot)
  np.testing.assert_allclose(from_embeddings, jitted(model, "encode_text")(variables, token_ids),
                             rtol=1e-6, atol=1e-6)

  # Causal: whatever follows EOT (padding) cannot change the feature; a learned context can.
  noise = jax.random.normal(jax.random.PRNGKey(1), embeddings.shape)
  after_eot = jnp.arange(77)[None, :, None] > eot[:, None, None]
  np.testing.assert_allclose(encode(variables, jnp.where(after_eot, noise, embeddings), eot),
                             from_embeddings, rtol=1e-6, atol=1e-6)
  with_context = embeddings.at[:, 1:3].set(noise[:, 1:3])
  assert rel_err(encode(variables, with_context, eot), from_embeddings) > 1e-2


def test_encode_text_embeddings_rejects_bad_shapes(mu_vit):
  model, variables = mu_vit
  with pytest.raises(ValueError, match="L <= 77"):
    model.apply(variables, jnp.zeros((1, 78, 32)), jnp.zeros((1,), jnp.int32),
                method=clip.Model.encode_text_embeddings)
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
    model.apply(variables, jnp.zeros((1, 3, 32, 32)), method=clip.Model.encode_image)


def test_bfloat16_compute_keeps_float32_params(mu_vit):
  model, variables = mu_vit
  bf16 = clip.Model(**clip.decode_variant("ViT-mu/8"), dtype=jnp.bfloat16)
  init = jax.eval_shape(lambda: clip.init_variables_like(bf16))
  assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  token_ids = jnp.asarray(random_token_ids([6, 20], seed=2))
  for method, inputs in (("encode_image", (images,)), ("encode_text", (token_ids,))):
    low, high = jitted(bf16, method)(variables, *inputs), jitted(model, method)(variables, *inputs)
    assert low.dtype == jnp.float32
    assert rel_err(low, high) < 3e-2, method


# ------------------------------------------------------------------------------------------------
# Bad checkpoints.


@pytest.fixture(scope="module")
def mu_openai_state(tmp_path_factory):
  """A tiny OpenAI-layout ViT CLIP state dict (numpy) and matching init variables."""
  hf = transformers.CLIPModel(hf_clip_config(32, 2, 8, 32, 32, 2, 16))
  state = {k: v.numpy() for k, v in openai_state_dict_from_hf(hf.state_dict()).items()}
  model = clip.Model(**clip.infer_config(state, head_dim=16))
  return state, clip.init_variables_like(model)


def test_missing_extra_and_misshaped_keys_are_listed(mu_openai_state, tmp_path):
  state, init = mu_openai_state
  state = dict(state)
  del state["visual.ln_pre.bias"], state["transformer.resblocks.1.mlp.c_fc.weight"]
  state["visual.transformer.resblocks.2.ln_1.weight"] = np.ones(32, np.float32)
  state["prompt_learner.ctx"] = np.ones((4, 32), np.float32)
  state["visual.proj"] = np.zeros((32, 17), np.float32)
  path = str(tmp_path / "broken.pt")
  torch.save({k: torch.as_tensor(v) for k, v in state.items()}, path)
  with pytest.raises(ValueError) as error:
    clip.load(init, path)
  message = str(error.value)
  assert path in message
  for name in ("missing from the checkpoint (2)", "params/visual/ln_pre/bias",
               "params/transformer/resblocks_1/mlp/c_fc/kernel",
               "in the checkpoint but not in the model (2)",
               "params/visual/transformer/resblocks_2/ln_1/scale", "params/prompt_learner/ctx",
               "params/visual/proj: checkpoint (32, 17) vs expected (32, 16)"):
    assert name in message, name

  # dont_load covers the extras; the mis-shapes and missing ones are still errors.
  with pytest.raises(ValueError, match="wrong shape"):
    clip.load(init, path, dont_load=("params/prompt_learner/.*", ".*/resblocks_2/.*"))


def test_unsplittable_in_proj_is_an_error(mu_openai_state):
  state, _ = mu_openai_state
  state = dict(state, **{"transformer.resblocks.0.attn.in_proj_weight": np.zeros((97, 32))})
  with pytest.raises(ValueError, match=r"in_proj_weight has shape \(97, 32\); expected packed"):
    clip.convert_openai_clip(state, vision_heads=2, text_heads=2)


def test_unknown_hf_names_and_non_clip_state_dicts(mu_openai_state):
  with pytest.raises(ValueError, match=r"not transformers CLIPModel parameters \(2\)"):
    clip.hf_to_openai_state_dict({"text_model.pooler.weight": np.zeros(2),
                                  "vision_model.embeddings.class_embedding": np.zeros(2),
                                  "vision_model.encoder.layers.0.bogus.weight": np.zeros(2)})
  with pytest.raises(ValueError, match="k_proj"):
    clip.hf_to_openai_state_dict({
        "text_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((2, 2)),
        "text_model.encoder.layers.0.self_attn.v_proj.weight": np.zeros((2, 2))})
  with pytest.raises(ValueError, match="no 'ln_final.weight'"):
    clip.infer_config({"encoder.weight": np.zeros(3)})
  state, init = mu_openai_state
  assert clip.infer_config(state, head_dim=16)["vision_heads"] == 2
  with pytest.raises(ValueError, match="whole variables dict"):
    clip.load(init["params"], "x.pt")
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    clip.read_state_dict("nope.pt")


def test_safetensors_of_a_plain_openai_state_dict(mu_openai_state, tmp_path):
  state, init = mu_openai_state
  path = str(tmp_path / "openai.safetensors")
  save_safetensors_torch({k: torch.as_tensor(v).contiguous() for k, v in state.items()}, path)
  variables = clip.load(init, path)
  np.testing.assert_array_equal(variables["params"]["visual"]["proj"], state["visual.proj"])
  np.testing.assert_array_equal(
      variables["params"]["transformer"]["resblocks_1"]["attn"]["key"]["bias"].reshape(-1),
      state["transformer.resblocks.1.attn.in_proj_bias"][32:64])


@pytest.mark.parametrize("variant", ["X", "ViT-B/33", ""])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="Unknown CLIP variant"):
    clip.decode_variant(variant)


# ------------------------------------------------------------------------------------------------
# Tokenizer.

REAL_BPE = pathlib.Path(os.environ.get(
    "CLIP_BPE_PATH",
    pathlib.Path(__file__).resolve().parents[2] / "shared/data/clip/bpe_simple_vocab_16e6.txt.gz"))
needs_real_bpe = pytest.mark.skipif(
    not REAL_BPE.is_file(), reason=f"OpenAI's CLIP BPE vocabulary not found at {REAL_BPE} "
    "(set CLIP_BPE_PATH); the project does not require it")


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
  """A 516-token vocabulary: 512 byte symbols, merges 'c a' and 'ca t</w>', SOT 514, EOT 515."""
  path = tmp_path_factory.mktemp("tiny_bpe") / "tiny_vocab.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: tiny\nc a\nca t</w>\n")
  return str(path)


def test_tiny_vocabulary(tiny_bpe, tmp_path):
  tokenize = clip_tokenizer.Tokenizer(tiny_bpe)
  assert (tokenize.vocab_size, tokenize.sot_token_id, tokenize.eot_token_id) == (516, 514, 515)
  # 'a</w>' and '.</w>' sit where they sit in the real vocabulary (320, 269).
  row = tokenize("  A\n CAT.  ")[0]
  np.testing.assert_array_equal(row[:6], [514, 320, 513, 269, 515, 0])
  assert row.shape == (77,) and row.dtype == np.int32 and not row[5:].any()
  assert tokenize.encode("a &amp;amp; cat") == tokenize.encode("a & cat")

  folder = clip_tokenizer.convert_openai_bpe(tiny_bpe, str(tmp_path / "hf"))
  assert sorted(os.listdir(folder)) == ["merges.txt", "vocab.json"]
  from_folder = clip_tokenizer.Tokenizer(folder)
  texts = ["a cat.", "Cats, a CAT's cat!", "catcat 42"]
  np.testing.assert_array_equal(from_folder(texts), tokenize(texts))


def test_truncation(tiny_bpe):
  tokenize = clip_tokenizer.Tokenizer(tiny_bpe, context_length=5)
  np.testing.assert_array_equal(tokenize(["a a a"]), [[514, 320, 320, 320, 515]])
  with pytest.raises(ValueError, match="6 tokens .* context length 5.*truncate=True"):
    tokenize(["a a a a"])
  np.testing.assert_array_equal(tokenize(["a a a a", "cat"], truncate=True),
                                [[514, 320, 320, 320, 515], [514, 513, 515, 0, 0]])


def test_tokenizer_path_errors(tmp_path):
  for path in (None, ""):
    with pytest.raises(ValueError, match="needs a local vocabulary"):
      clip_tokenizer.Tokenizer(path)
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    clip_tokenizer.Tokenizer(tmp_path / "nope.txt.gz")
  with pytest.raises(FileNotFoundError, match="neither vocab.json"):
    clip_tokenizer.Tokenizer(tmp_path)


def test_bytes_to_unicode_order():
  mapping = clip_tokenizer.bytes_to_unicode()
  assert len(mapping) == 256 and len(set(mapping.values())) == 256
  symbols = list(mapping.values())
  assert symbols[:3] == ["!", '"', "#"] and mapping[ord(" ")] == "Ġ" and symbols[-1] == chr(323)


@needs_real_bpe
def test_real_vocabulary_known_ids():
  for path in (REAL_BPE, REAL_BPE.parent):  # the file, or a folder holding it
    tokenize = clip_tokenizer.Tokenizer(path)
    assert (tokenize.vocab_size, tokenize.sot_token_id, tokenize.eot_token_id) == (
        49408, 49406, 49407)
    row = tokenize("a photo of a cat.")[0]
    np.testing.assert_array_equal(row[:9], [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0])
  x_prompt = tokenize("X X X X dog.")[0]
  assert int(np.argmax(x_prompt)) == 7 and list(x_prompt[1:5]) == [343] * 4  # one token per X
  long_text = tokenize(["word " * 100], truncate=True)[0]
  assert long_text[-1] == 49407 and int(np.argmax(long_text)) == 76
  with pytest.raises(ValueError, match="102 tokens"):
    tokenize(["word " * 100])
