"""DGL (jaxprompt/prompts/dgl.py) against numpy references written here from knightyxp/DGL
`modules/clip.py`: the global-local attention, both latent spaces, the prompted text tower and the
video tower in the original's token-major order; prompts off = plain CLIP; trainable counts at
ViT-B/32; the postfix prompts' zero gradient; inits; training moves only the prompts."""
from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprompt import optim, train
from jaxprompt.models import clip, common
from jaxprompt.prompts import clip4clip, dgl

VARIANT, FRAMES, WORDS, BATCH = "ViT-mu/8", 3, 8, 4
SOT, EOT = 49406, 49407


def make_model(latent_space: str, **kwargs) -> dgl.Model:
  return dgl.Model(variant=VARIANT, num_frames=FRAMES, latent_space=latent_space, **kwargs)


def make_batch(seed: int = 0):
  """Random CLIP-normalised videos (B, T, 32, 32, 3) and captions [SOT, words, EOT, 0...]."""
  rng = np.random.default_rng(seed)
  video = rng.normal(size=(BATCH, FRAMES, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((BATCH, WORDS), np.int32)
  for i, length in enumerate((3, 6, 8, 5)):  # SOT + words + EOT
    tokens[i, :length] = [SOT, *rng.integers(1, 49000, length - 2), EOT]
  return jnp.asarray(video), jnp.asarray(tokens)


@functools.lru_cache(maxsize=None)
def built(latent_space: str):
  """(model, variables) of one latent space, initialised once for the whole module."""
  model = make_model(latent_space)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), *make_batch())


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
               / np.max(np.abs(expected)))


# ------------------------------------------------------------------------------------------------
# numpy references (float64), from the flax param trees.


def np_params(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def layer_norm(x, p):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + clip.LAYER_NORM_EPS) * p["scale"] + p["bias"]


def softmax(x):
  x = np.exp(x - x.max(-1, keepdims=True))
  return x / x.sum(-1, keepdims=True)


def attention(p, queries, keys_values, mask=None):
  """nn.MultiheadAttention(q, kv, kv) of (B, Lq, D) and (B, Lk, D); mask (Lq, Lk) True = allowed."""
  q, k, v = (np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + p[name]["bias"]
             for x, name in ((queries, "query"), (keys_values, "key"), (keys_values, "value")))
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    scores = np.where(mask, scores, -np.inf)
  out = np.einsum("bhqs,bshk->bqhk", softmax(scores), v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def mlp(p, x):
  h = x @ p["c_fc"]["kernel"] + p["c_fc"]["bias"]
  h = h / (1 + np.exp(-1.702 * h))
  return h @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]


def block(p, x, mask=None):
  h = layer_norm(x, p["ln_1"])
  x = x + attention(p["attn"], h, h, mask)
  return x + mlp(p["mlp"], layer_norm(x, p["ln_2"]))


def reference_prompts(model, params):
  """`CLIP.encode_prompt`: text prompts (Lp, P_t, D_t), frame prompts (Lp, T, N_l, D_v)."""
  latent, layers = params["shared_latent_space"], 2
  table = latent["table"]  # row r, layer l = columns [l·D, (l+1)·D)
  width = table.shape[1] // layers
  per_layer = [table[:, l * width:(l + 1) * width] for l in range(layers)]
  if model.latent_space == "linear":
    text = [np.concatenate([v @ latent[n]["kernel"] + latent[n]["bias"]
                            for n in ("prefix_proj", "postfix_proj")]) for v in per_layer]
    frames = [np.stack([v] * FRAMES) for v in per_layer]
  else:
    outputs = [block(latent["prompt_transformer"], v[None])[0] for v in per_layer]
    p_t = model.num_text_prompts
    text = [mlp(latent["text_mlp"], o[:p_t]) for o in outputs]
    frames = [np.stack([o[p_t + 4 * t:p_t + 4 * t + 4] for t in range(FRAMES)]) for o in outputs]
  return np.stack(text), np.stack(frames)


def reference_text(params, tokens, text_prompts):
  """`CLIP.encode_text` with `incorporate_text_prompt` / `forward_deep_text_prompt`."""
  tokens = np.asarray(tokens)
  batch, length = tokens.shape
  num_prompts = text_prompts.shape[1]
  prefix = num_prompts // 2
  x = params["token_embedding"]["embedding"][tokens] + params["positional_embedding"][:length]
  prompt = lambda i: np.broadcast_to(text_prompts[i], (batch,) + text_prompts.shape[1:])
  x = np.concatenate([x[:, :1], prompt(0)[:, :prefix], x[:, 1:], prompt(0)[:, prefix:]], 1)
  prompt_token = np.zeros((batch, length + num_prompts))
  prompt_token[:, 0] = tokens[:, 0]
  prompt_token[:, prefix + 1:prefix + length] = tokens[:, 1:]
  causal = np.tril(np.ones((length + num_prompts,) * 2, bool))
  for i in range(2):
    if i:
      x = np.concatenate([x[:, :1], prompt(i)[:, :prefix], x[:, prefix + 1:prefix + length],
                          prompt(i)[:, prefix:]], 1)
    x = block(params["transformer"][f"resblocks_{i}"], x, causal)
  x = layer_norm(x, params["ln_final"]) @ params["text_projection"]
  return x[np.arange(batch), prompt_token.argmax(-1)]


def reference_video(visual, video, frame_prompts, global_prompts):
  """`VisualTransformer.forward` in the original's token-major order (index N_g + l·T + t), each
  block's attention as its two calls (step 4 of the method): globals over everything, then per
  frame t the queries of frame t over [globals; frame t]."""
  video = np.asarray(video, np.float64)
  batch, frames, size = video.shape[:3]
  patch = visual["conv1"]["kernel"].shape[0]
  grid, width = size // patch, visual["conv1"]["kernel"].shape[-1]
  x = video.reshape(batch * frames, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(batch * frames, grid * grid, -1) @ visual["conv1"]["kernel"].reshape(-1, width)
  cls = np.broadcast_to(visual["class_embedding"], (batch * frames, 1, width))
  x = layer_norm(np.concatenate([cls, x], 1) + visual["positional_embedding"], visual["ln_pre"])
  x = x.reshape(batch, frames, 1 + grid * grid, width)
  num_global, num_local = global_prompts.shape[0], frame_prompts.shape[2]
  x = np.concatenate([x[:, :, :1], np.broadcast_to(frame_prompts[0], (batch,) + frame_prompts.shape[
      1:]), x[:, :, 1:]], 2)
  per_frame = x.shape[2]
  x = x.transpose(0, 2, 1, 3).reshape(batch, per_frame * frames, width)  # token-major
  x = np.concatenate([np.broadcast_to(global_prompts, (batch, num_global, width)), x], 1)
  for i in range(2):
    p = visual["transformer"][f"resblocks_{i}"]
    if i:
      for t in range(frames):
        for j in range(num_local):
          x[:, num_global + (1 + j) * frames + t] = frame_prompts[i, t, j]
    h = layer_norm(x, p["ln_1"])
    out = np.empty_like(x)
    out[:, :num_global] = attention(p["attn"], h[:, :num_global], h)
    for t in range(frames):
      rows = num_global + np.arange(per_frame) * frames + t
      out[:, rows] = attention(p["attn"], h[:, rows],
                               np.concatenate([h[:, :num_global], h[:, rows]], 1))
    x = x + out
    x = x + mlp(p["mlp"], layer_norm(x, p["ln_2"]))
  return layer_norm(x[:, 0], visual["ln_post"]) @ visual["proj"]


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------------------------


def test_global_local_attention_equals_per_frame_loop_and_dense_mask():
  num_global, frames, per_frame, heads, depth = 3, 4, 5, 2, 8
  length = num_global + frames * per_frame
  q, k, v = np.random.default_rng(0).normal(size=(3, 2, length, heads, depth)).astype(np.float32)
  out = np.asarray(jax.jit(functools.partial(dgl.global_local_attention, num_global=num_global,
                                             num_frames=frames))(q, k, v))
  # per-frame loop: globals over all tokens; frame t over [globals; frame t]
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))

  def attend(rows, keys):
    scores = np.einsum("bqhd,bkhd->bhqk", q64[:, rows], k64[:, keys]) / math.sqrt(depth)
    return np.einsum("bhqk,bkhd->bqhd", softmax(scores), v64[:, keys])

  loop = np.empty_like(q64)
  globals_ = np.arange(num_global)
  loop[:, globals_] = attend(globals_, np.arange(length))
  for t in range(frames):
    rows = num_global + t * per_frame + np.arange(per_frame)
    loop[:, rows] = attend(rows, np.concatenate([globals_, rows]))
  assert relative_error(out, loop) < 1e-5
  frame_of = np.concatenate([np.full(num_global, -1), np.repeat(np.arange(frames), per_frame)])
  mask = ((frame_of[:, None] < 0) | (frame_of[None] < 0) | (frame_of[:, None] == frame_of[None]))
  dense = jax.jit(nn.dot_product_attention)(q, k, v, mask=jnp.asarray(mask)[None, None])
  assert relative_error(out, dense) < 1e-5
  with pytest.raises(ValueError, match="globals"):
    dgl.global_local_attention(q, k, v, num_global=num_global + 1, num_frames=frames)


@pytest.mark.parametrize("latent_space", dgl.LATENT_SPACES)
def test_model_matches_the_original_order_reference(latent_space):
  """Prompts, text tower, video tower (token-major, two attention calls per block) and the
  similarity against the numpy references, both latent spaces."""
  model, variables = built(latent_space)
  video, tokens = make_batch(1)
  similarity, aux = jax.jit(model.apply)(variables, video, tokens)
  params = np_params(variables["params"])
  text_prompts, frame_prompts = reference_prompts(model, params)
  got_text, got_frames, _ = jax.jit(lambda v: model.apply(v, method=dgl.Model.prompts))(
      variables)
  assert relative_error(got_text, text_prompts) < 1e-4
  assert relative_error(got_frames, frame_prompts) < 1e-4
  text = normalized(reference_text(params["clip"], tokens, text_prompts))
  video_features = normalized(reference_video(params["clip"]["visual"], video, frame_prompts,
                                              params["global_prompts"]))
  assert relative_error(aux["text_features"], text) < 1e-4
  assert relative_error(aux["video_features"], video_features) < 1e-4
  expected = np.exp(params["clip"]["logit_scale"]) * text @ video_features.T
  assert relative_error(similarity, expected) < 1e-4


def test_prompts_off_is_plain_clip():
  """No prompts (P_t = N_l = N_g = 0) through the same encoders: CLIP's text features, and per
  frame CLIP's image features (the frames do not interact)."""
  model, variables = built("linear")
  video, tokens = make_batch(2)
  tower = clip.Model(**clip.decode_variant(VARIANT))
  clip_variables = {"params": variables["params"]["clip"]}
  text = jax.jit(lambda t: model.apply(variables, t, jnp.zeros((2, 0, 32)),
                                       method=dgl.Model.encode_text))(tokens)
  expected = jax.jit(lambda t: tower.apply(clip_variables, t, method=clip.Model.encode_text))(
      tokens)
  assert relative_error(text, expected) < 1e-5
  encode_video = jax.jit(lambda v: model.apply(variables, v, jnp.zeros((2, FRAMES, 0, 32)),
                                               jnp.zeros((0, 32)), method=dgl.Model.encode_video))
  images = jax.jit(lambda v: tower.apply(clip_variables, v, method=clip.Model.encode_image))(
      video.reshape(-1, 32, 32, 3))
  images = np.asarray(images).reshape(BATCH, FRAMES, -1)
  for t in range(FRAMES):  # frame t first: the first token is its class token
    assert relative_error(encode_video(jnp.roll(video, -t, axis=1)), images[:, t]) < 1e-5


def test_trainable_counts_at_vit_b32():
  """The original's counts (knightyxp/DGL, ViT-B/32, T = 12) with the trainable regex."""
  expected = {"linear": {"table": 36_864, "prefix_proj": 393_728, "postfix_proj": 393_728,
                         "global_prompts": 3_072},
              "transformer": {"table": 516_096, "prompt_transformer": 7_087_872,
                              "text_mlp": 1_968_128, "global_prompts": 3_072}}
  totals = {"linear": 827_392, "transformer": 9_575_168}
  for latent, parts in expected.items():
    model = dgl.Model(variant="ViT-B/32", num_frames=12, latent_space=latent)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 12, 224, 224, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1, 32), jnp.int32))
    sizes = {name: math.prod(leaf.shape)
             for name, leaf in common.flatten(shapes["params"]).items()}
    trained = {name: n for name, n in sizes.items() if re.fullmatch(dgl.TRAINABLE_PARAMS, name)}
    assert sum(trained.values()) == totals[latent]
    for part, count in parts.items():
      assert sum(n for name, n in trained.items() if part in name.split("/")) == count, part
    assert all(name.startswith("clip/") for name in set(sizes) - set(trained))


def test_postfix_prompts_get_zero_gradient():
  """The postfix prompts sit after every EOT: through the symmetric InfoNCE their gradient is
  exactly zero, the prefix's is not (DGL-Linear's postfix generator: the training test)."""
  model, variables = built("transformer")
  video, tokens = make_batch(3)

  def loss(text_prompts):
    _, frame_prompts, global_prompts = model.apply(variables, method=dgl.Model.prompts)
    text = clip.normalize(model.apply(variables, tokens, text_prompts,
                                      method=dgl.Model.encode_text))
    video_features = clip.normalize(model.apply(variables, video, frame_prompts, global_prompts,
                                                method=dgl.Model.encode_video))
    return clip4clip.symmetric_info_nce(100.0 * text @ video_features.T)

  text_prompts = jax.jit(lambda v: model.apply(v, method=dgl.Model.prompts))(variables)[0]
  grad = np.asarray(jax.jit(jax.grad(loss))(text_prompts))
  prefix = model.num_text_prompts // 2
  assert np.all(grad[:, prefix:] == 0.0)
  assert np.all(np.abs(grad[:, :prefix]).sum(-1) > 0)


def test_inits_at_vit_b32():
  """Embedding N(0, 1) table, uniform ±sqrt(6 / (3 p² + D_v)) table and global prompts,
  PyTorch's Linear and attention inits."""
  bound = math.sqrt(6 / (3 * 32 * 32 + 768))
  assert bound == pytest.approx(0.03953, abs=1e-5)
  settings = dict(num_layers=12, width=768, text_width=512, num_frames=12, num_local_prompts=4)
  linear = jax.jit(dgl.LinearLatentSpace(**settings, init_bound=bound).init)(
      jax.random.PRNGKey(0))
  table = np.asarray(linear["params"]["table"])
  assert table.shape == (4, 9216)
  assert np.abs(table).max() <= bound and np.abs(table).max() > 0.99 * bound
  assert table.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
  prefix = linear["params"]["prefix_proj"]
  for leaf in (prefix["kernel"], prefix["bias"]):
    assert 0.99 / math.sqrt(768) < np.abs(leaf).max() <= 1 / math.sqrt(768)

  params = jax.jit(dgl.TransformerLatentSpace(**settings, num_text_prompts=8).init)(
      jax.random.PRNGKey(1))["params"]
  table = np.asarray(params["table"])
  assert table.shape == (56, 9216)
  assert abs(table.mean()) < 0.01 and table.std() == pytest.approx(1.0, rel=0.01)
  attn = params["prompt_transformer"]["attn"]
  in_bound = math.sqrt(6 / (768 + 3 * 768))  # xavier over the packed (3·768, 768) in_proj
  assert attn["query"]["kernel"].shape == (768, 12, 64)  # 12 heads
  for name in ("query", "key", "value"):
    assert 0.99 * in_bound < np.abs(attn[name]["kernel"]).max() <= in_bound
  for name in ("query", "key", "value", "out"):
    assert not np.any(attn[name]["bias"])
  assert 0.99 / math.sqrt(768) < np.abs(attn["out"]["kernel"]).max() <= 1 / math.sqrt(768)
  text_mlp = params["text_mlp"]
  assert text_mlp["c_fc"]["kernel"].shape == (768, 1536)
  assert text_mlp["c_proj"]["kernel"].shape == (1536, 512)
  assert 0.99 / math.sqrt(1536) < np.abs(text_mlp["c_proj"]["bias"]).max() <= 1 / math.sqrt(1536)
  ln = params["prompt_transformer"]["ln_1"]
  assert np.all(ln["scale"] == 1) and not np.any(ln["bias"])



def test_global_prompts_init():
  model, variables = built("linear")
  global_prompts = np.asarray(variables["params"]["global_prompts"])
  bound = math.sqrt(6 / (3 * 8 * 8 + 32))  # ViT-mu/8: patch 8, width 32
  assert global_prompts.shape == (model.num_global_prompts, 32)
  assert 0.9 * bound < np.abs(global_prompts).max() <= bound


@pytest.mark.parametrize("latent_space", dgl.LATENT_SPACES)
def test_training_moves_only_the_prompts(latent_space):
  """The trainer's step with DGL's METHOD and loss: the loss falls, CLIP stays bit-identical;
  DGL-Linear's postfix generator gets zero gradient, so Adam leaves it bit-identical too."""
  model, variables = built(latent_space)
  params = variables["params"]
  labels = optim.param_labels(params, dgl.METHOD.trainable)
  tx = optax.adam(1e-2)
  step = jax.jit(train.make_train_step(model, tx, labels, method=dgl.METHOD,
                                       loss_fn=dgl.METHOD.make_loss(None, None), seed=0))
  state = {"params": params, "model_state": {},
           "opt_state": tx.init(optim.trainable_subset(params, labels)), "step": 0}
  video, tokens = make_batch(4)
  batch = {"video": video, "caption_tokens": tokens}
  losses = []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  for name, leaf in common.flatten(params["clip"]).items():
    assert np.array_equal(leaf, common.flatten(state["params"]["clip"])[name]), name
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(optim.trainable_subset(params, labels)),
      jax.tree.leaves(optim.trainable_subset(state["params"], labels)))]
  assert all(moved) if latent_space == "transformer" else any(moved)
  if latent_space == "linear":
    latent, trained = params["shared_latent_space"], state["params"]["shared_latent_space"]
    for name in ("kernel", "bias"):
      assert np.array_equal(latent["postfix_proj"][name], trained["postfix_proj"][name])
      assert not np.array_equal(latent["prefix_proj"][name], trained["prefix_proj"][name])


def test_bad_settings_and_inputs():
  with pytest.raises(ValueError, match="latent_space='mlp'"):
    make_model("mlp")
  with pytest.raises(ValueError, match="num_text_prompts=6.*2 x num_local_prompts = 8"):
    make_model("linear", num_text_prompts=6)
  with pytest.raises(ValueError, match="num_global_prompts=0"):
    make_model("transformer", num_global_prompts=0)
  with pytest.raises(ValueError, match="same depth"):
    dgl.Model(variant="ViT-L/14").init(jax.random.PRNGKey(0), *make_batch())
  model = make_model("linear")
  video, tokens = make_batch()
  with pytest.raises(ValueError, match="num_frames=3.*shape \\(4, 2, 32, 32, 3\\)"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), video[:, :2], tokens)
  with pytest.raises(ValueError, match="\\(B, T, 32, 32, 3\\)"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), video[..., 0], tokens)
