"""The video baselines: CLIP4Clip-meanP (zero-shot CLIP untrained, CLIP4Clip's full fine-tuning
trained) and separate VPT-deep + CoOp prompts, against references written here, on a tiny random
CLIP (ViT-mu/8: 32 px frames, patch 8, 2 blocks per tower), random videos and captions, and a
training batch of the generated 'embedded/moving_shapes' clips."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

import input_pipeline
from input_pipeline import embedded_video, pipeline, preprocess
from jaxprompt import optim
from jaxprompt.models import clip
from jaxprompt.prompts import clip4clip, video_vpt_coop
from conftest import assert_only_trainable_changed  # pylint: disable=import-error

VARIANT = "ViT-mu/8"
SIZES = clip.decode_variant(VARIANT)
SOT, EOT = 49406, 49407  # OpenAI's ids; EOT is the largest, as the text tower assumes
NUM_VIDEOS, NUM_FRAMES, NUM_WORDS = 4, 3, 10


def random_batch(seed: int = 0):
  """(videos (4, 3, 32, 32, 3) float32, captions (4, 10) int32: SOT, words, EOT, 0-padding)."""
  rng = np.random.default_rng(seed)
  size = SIZES["image_size"]
  videos = rng.normal(size=(NUM_VIDEOS, NUM_FRAMES, size, size, 3)).astype(np.float32)
  captions = np.zeros((NUM_VIDEOS, NUM_WORDS), np.int32)
  for i, eot in enumerate(rng.integers(2, NUM_WORDS, NUM_VIDEOS)):
    captions[i, 0], captions[i, 1:eot], captions[i, eot] = SOT, rng.integers(1, 1000, eot - 1), EOT
  return jnp.asarray(videos), jnp.asarray(captions)


def flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def clips_batch():
  """One training batch: 8 generated clips of 3 frames and their captions (32 tokens), through
  the demos' pp spec."""
  source = input_pipeline.get_source("embedded/moving_shapes", num_frames=NUM_FRAMES)
  pp_fn = preprocess.make_preprocess_fn(embedded_video.pp_spec(32))
  batches = pipeline.make_train_dataset(source, "train", pp_fn, global_batch_size=8, seed=0)
  batch = next(batches.as_numpy_iterator())
  return jnp.asarray(batch["video"]), jnp.asarray(batch["caption_tokens"])


@pytest.fixture(scope="module")
def meanp():
  """(CLIP4Clip-meanP model, its random variables)."""
  model = clip4clip.Model(variant=VARIANT)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), *random_batch())


def train_steps(model, variables, trainable_regex: str, batch, steps: int, learning_rate: float):
  """`steps` Adam steps of the video-text loss on one batch (videos, captions), over the params
  that `trainable_regex` names (the trainer's partition: `optim.param_labels`, frozen leaves
  passed through). Returns (params after, labels, losses)."""
  videos, captions = batch
  params, labels = variables["params"], optim.param_labels(variables["params"], trainable_regex)
  loss_fn = clip4clip.make_loss(None, None)
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state):
    def loss_of(trainable):
      similarity, aux = model.apply({"params": optim.with_trainable(params, trainable)}, videos,
                                    captions, train=True)
      return loss_fn(similarity, aux, {})

    trainable = optim.trainable_subset(params, labels)
    loss, grads = jax.value_and_grad(loss_of)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optim.with_trainable(params, optax.apply_updates(trainable, updates)), opt_state, loss

  opt_state, losses = tx.init(optim.trainable_subset(params, labels)), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return params, labels, losses


# ------------------------------------------------------------------------------------------------
# CLIP4Clip-meanP and its loss.


def test_meanp_equals_framewise_clip_mean_pooled(meanp):
  """CLIP4Clip `_loose_similarity` with meanP: normalise each frame's CLIP feature, average,
  normalise; text at EOT, normalised; S = exp(logit_scale) t v^T, clamped at ln 100."""
  model, variables = meanp
  videos, captions = random_batch()
  tower = clip.Model(**SIZES)
  clip_variables = {"params": variables["params"]["clip"]}
  frames = np.asarray(jax.jit(lambda v, x: tower.apply(v, x, method=clip.Model.encode_image))(
      clip_variables, videos.reshape((-1,) + videos.shape[2:]))).astype(np.float64)
  text = np.asarray(jax.jit(lambda v, t: tower.apply(v, t, method=clip.Model.encode_text))(
      clip_variables, captions)).astype(np.float64)
  frames = frames.reshape(NUM_VIDEOS, NUM_FRAMES, -1)
  frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
  video_features = frames.mean(axis=1)
  video_features /= np.linalg.norm(video_features, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  cosine = text @ video_features.T

  forward = jax.jit(lambda v: model.apply(v, videos, captions))
  predict = clip4clip.video_text_predict_fns(model)
  for logit_scale, scale in ((2.0, np.exp(2.0)), (5.0, 100.0)):  # 5 > ln 100: clamped
    params = dict(variables["params"], clip=dict(variables["params"]["clip"],
                                                 logit_scale=jnp.float32(logit_scale)))
    similarity, aux = forward({"params": params})
    np.testing.assert_allclose(similarity, scale * cosine, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(predict["logit_scale"]({"params": params}), scale, rtol=1e-6)
  np.testing.assert_allclose(aux["video_features"], video_features, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(predict["embed_video"])(variables, videos), video_features,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.jit(predict["embed_text"])(variables, captions), text,
                             rtol=1e-4, atol=1e-5)


def test_symmetric_info_nce_equals_crossen_on_both_directions():
  """CLIP4Clip `CrossEn`: -mean(diag(log_softmax(S, -1))), on S and S^T, averaged."""
  similarity = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32) * 10

  def cross_en(matrix):
    return -torch.diag(F.log_softmax(matrix, dim=-1)).mean()

  s = torch.from_numpy(similarity)
  reference = float((cross_en(s) + cross_en(s.T)) / 2)
  np.testing.assert_allclose(clip4clip.symmetric_info_nce(jnp.asarray(similarity)), reference,
                             rtol=1e-5)
  loss = clip4clip.make_loss(None, None)(jnp.asarray(similarity), {}, {})
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
  with pytest.raises(ValueError, match=r"square \(B, B\); got \(4, 5\)"):
    clip4clip.symmetric_info_nce(jnp.zeros((4, 5)))


def test_full_finetuning_trains_what_clip4clip_trains(meanp, clips_batch):
  """`--freeze_layer_num 0` (CLIP4Clip `main_task_retrieval.py`): ln_final, text_projection,
  logit_scale, visual ln_post and proj and every block of both towers train; the embeddings
  (patch conv, class and position embeddings, ln_pre, token embedding) stay frozen and bit-identical
  after steps, while every trained param moves and the loss falls."""
  model, variables = meanp
  always = ("ln_final/", "text_projection", "logit_scale", "visual/ln_post/", "visual/proj")
  blocks = ("visual/transformer/resblocks_", "transformer/resblocks_")
  names = flat(variables["params"])
  labels = flat(optim.param_labels(variables["params"], clip4clip.METHOD.trainable))
  for name in names:
    inner = name.removeprefix("clip/")
    trains = name.startswith("clip/") and inner.startswith(always + blocks)
    assert labels[name] == (optim.TRAIN if trains else optim.FROZEN), name
  assert {n for n, label in labels.items() if label == optim.FROZEN} >= {
      "clip/token_embedding/embedding", "clip/visual/conv1/kernel"}

  after, labels, losses = train_steps(model, variables, clip4clip.METHOD.trainable, clips_batch,
                                      steps=4, learning_rate=1e-3)
  assert losses[-1] < losses[0] - 0.1, losses
  # Attention key biases get no gradient but round-off (softmax is shift-invariant over keys), so
  # whether Adam moves them is left open.
  without_key_biases = lambda tree: {k: v for k, v in tree.items()
                                     if not k.endswith("attn/key/bias")}
  assert_only_trainable_changed(without_key_biases(names), without_key_biases(flat(after)),
                                flat(labels))


def test_bad_video_shape_is_a_clear_error(meanp):
  model, variables = meanp
  videos, _ = random_batch()
  with pytest.raises(ValueError, match=r"\(B, T, 32, 32, 3\).*got \(4, 32, 32, 3\)"):
    model.apply(variables, videos[:, 0], method=clip4clip.Model.embed_video)


# ------------------------------------------------------------------------------------------------
# Separate prompts: VPT-deep per frame + CoOp context.


@pytest.fixture(scope="module")
def prompted():
  """(VPT + CoOp model with 2 visual and 3 text prompts, its random variables)."""
  model = video_vpt_coop.Model(variant=VARIANT, num_visual_prompts=2, num_text_prompts=3)
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), *random_batch())


def test_prompts_off_equals_clip4clip_meanp(meanp):
  reference_model, variables = meanp
  model = video_vpt_coop.Model(variant=VARIANT, num_visual_prompts=0, num_text_prompts=0)
  videos, captions = random_batch()
  similarity, aux = jax.jit(lambda v: model.apply(v, videos, captions))(variables)
  expected, expected_aux = jax.jit(lambda v: reference_model.apply(v, videos, captions))(variables)
  np.testing.assert_allclose(similarity, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(aux["video_features"], expected_aux["video_features"], atol=1e-7)


def layer_norm(x, params):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + clip.LAYER_NORM_EPS) * params["scale"] + params["bias"]


def reference_vpt_frames(visual, frames, prompts):
  """VPT-deep in CLIP's ViT, block by block (KMnP/vpt `PromptedTransformer.forward_deep_prompt`):
  patch conv as a matmul, class token, positions, ln_pre; before block i the prompts of layer i
  after the class token (inserted at 0, replacing after); ln_post + proj of the class token."""
  p, width = SIZES["vision_patch_size"], SIZES["vision_width"]
  num, size = frames.shape[0], frames.shape[1]
  grid = size // p
  patches = frames.reshape(num, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(num, grid * grid, p * p * 3) @ visual["conv1"]["kernel"].reshape(-1, width)
  cls = jnp.broadcast_to(visual["class_embedding"], (num, 1, width))
  x = layer_norm(jnp.concatenate([cls, x], 1) + visual["positional_embedding"], visual["ln_pre"])
  block = clip.ResidualAttentionBlock(SIZES["vision_heads"])
  for i in range(SIZES["vision_layers"]):
    rest = x[:, 1:] if i == 0 else x[:, 1 + prompts.shape[1]:]
    x = jnp.concatenate([x[:, :1], jnp.broadcast_to(prompts[i], (num,) + prompts.shape[1:]), rest],
                        axis=1)
    x = block.apply({"params": visual["transformer"][f"resblocks_{i}"]}, x)
  return layer_norm(x[:, 0], visual["ln_post"]) @ visual["proj"]


def test_visual_prompts_equal_a_block_by_block_vpt_reference(prompted):
  model, variables = prompted
  videos, _ = random_batch()
  params = variables["params"]
  frames = jax.jit(reference_vpt_frames)(params["clip"]["visual"],
                                         videos.reshape((-1,) + videos.shape[2:]),
                                         params["visual_prompts"])
  frames = np.asarray(frames, np.float64).reshape(NUM_VIDEOS, NUM_FRAMES, -1)
  frames /= np.linalg.norm(frames, axis=-1, keepdims=True)
  expected = frames.mean(1) / np.linalg.norm(frames.mean(1), axis=-1, keepdims=True)
  embed_video = clip4clip.video_text_predict_fns(model)["embed_video"]
  np.testing.assert_allclose(jax.jit(embed_video)(variables, videos), expected, rtol=1e-4,
                             atol=1e-5)


def test_text_context_is_coop_after_sot(prompted, meanp):
  """Context vectors equal to the embeddings of three words give the feature of the caption with
  those words after SOT (positions and EOT shifted), through plain CLIP."""
  model, variables = prompted
  words = np.array([11, 22, 33], np.int32)
  _, captions = random_batch()
  table = variables["params"]["clip"]["token_embedding"]["embedding"]
  params = dict(variables["params"], prompt_learner={"ctx": table[words]})
  prompted_text = jax.jit(lambda v: model.apply(v, captions, method=type(model).embed_text))(
      {"params": params})
  with_words = np.concatenate([captions[:, :1], np.broadcast_to(words, (NUM_VIDEOS, 3)),
                               captions[:, 1:]], axis=1)
  meanp_model, _ = meanp
  expected = jax.jit(lambda v: meanp_model.apply(v, with_words, method=clip4clip.Model.embed_text))(
      {"params": {"clip": variables["params"]["clip"]}})
  np.testing.assert_allclose(prompted_text, expected, rtol=1e-4, atol=1e-5)


def test_only_the_prompts_train_and_clip_stays_bit_identical(prompted, clips_batch):
  model, variables = prompted
  after, labels, losses = train_steps(model, variables, video_vpt_coop.METHOD.trainable,
                                      clips_batch, steps=8, learning_rate=3e-3)
  labels = flat(labels)
  assert {n for n, label in labels.items() if label == optim.TRAIN} == {
      "visual_prompts", "prompt_learner/ctx"}
  # A random frozen CLIP leaves the prompts little to work with: 2.076 -> 1.980 measured.
  assert losses[-1] < losses[0] - 0.05, losses
  assert_only_trainable_changed(flat(variables["params"]), flat(after), labels)


def test_trainable_count_at_vit_b32():
  """12 layers x 4 prompts x 768 + 4 x 512 context (the module docstring's count)."""
  model = video_vpt_coop.Model(variant="ViT-B/32")
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 2, 224, 224, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 32), jnp.int32))
  labels = flat(optim.param_labels(shapes["params"], video_vpt_coop.METHOD.trainable))
  sizes = {name: int(np.prod(leaf.shape)) for name, leaf in flat(shapes["params"]).items()}
  assert sum(n for name, n in sizes.items() if labels[name] == optim.TRAIN) == 38_912
  assert sum(n for name, n in sizes.items() if labels[name] == optim.FROZEN) == 151_277_313


def test_bad_prompt_settings_are_clear_errors():
  videos, captions = random_batch()
  with pytest.raises(ValueError, match=r"num_text_prompts=-1; expected an integer >= 0"):
    video_vpt_coop.Model(variant=VARIANT, num_text_prompts=-1)
  resnet = video_vpt_coop.Model(variant="RN-mu", num_visual_prompts=2)
  with pytest.raises(ValueError, match=r"num_visual_prompts=2: VPT prompts need a ViT"):
    jax.eval_shape(resnet.init, jax.random.PRNGKey(0), videos, captions)
  model = video_vpt_coop.Model(variant=VARIANT, num_text_prompts=4)
  long_captions = jnp.zeros((2, 75), jnp.int32)
  with pytest.raises(ValueError, match=r"75 tokens plus 4 context vectors exceed .* 77"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), videos[:2], long_captions)
