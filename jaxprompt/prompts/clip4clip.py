"""CLIP4Clip (Luo et al., Neurocomputing 2022, arXiv 2104.08860): text-video retrieval on CLIP, and
the video-text contract that DGL and the video baselines share.

Follows ArrowLuo/CLIP4Clip `modules/modeling.py` (`CLIP4Clip.get_visual_output`,
`get_sequence_output`, `_loose_similarity` with `sim_header='meanP'`), `modules/until_module.py`
(`CrossEn`) and `main_task_retrieval.py` (the freezing and the optimizer), paper §3.2-3.3:

  * a video is T frames, each encoded by CLIP's image tower (ln_post + proj of the class token);
    'meanP' L2-normalises each frame feature, averages them over the valid frames and
    L2-normalises the mean;
  * a caption is encoded by CLIP's text tower at its EOT token (the argmax of the ids) and
    L2-normalised;
  * similarity = exp(logit_scale) · t_i · v_j over the global batch (B_text x B_video), and the
    loss is the symmetric InfoNCE ('CrossEn' on the matrix and on its transpose, averaged).

`Model` is CLIP4Clip-meanP, which adds no parameters to CLIP. Untrained it is zero-shot CLIP with
mean-pooled frames. Trained with `METHOD` it is CLIP4Clip's full fine-tuning: the README scripts
pass `--freeze_layer_num 0`, which trains every block of both towers, `visual/ln_post`,
`visual/proj`, `ln_final`, `text_projection` and `logit_scale`, and freezes the embeddings
(`visual/conv1`, `visual/class_embedding`, `visual/positional_embedding`, `visual/ln_pre`,
`token_embedding`, the text `positional_embedding`): `TRAINABLE_PARAMS`. Its recipe, for a
config: `BertAdam` (`modules/optimization.py`: Adam b1 0.9, b2 0.98, eps 1e-6 without bias
correction, decoupled weight decay, each param's gradient norm clipped to 1.0 besides the global
clip 1.0 of the loop) at lr 1e-4 x coef_lr 1e-3 = 1e-7 for every CLIP param (meanP adds no params,
so that is every trained one); linear warm-up over 10 % of the steps, then 0.5 (1 + cos(pi ·
progress)) with progress over the whole run; weight decay 0.2 except names containing 'bias'
(CLIP's LayerNorms are ln_*, not 'LayerNorm', so their gains decay, and so does logit_scale);
batch 128, 5 epochs, 12 frames, 32 words on MSR-VTT.

The logit scale trains, and the original clamps the parameter to <= ln 100 after every step
(`torch.clamp_`, openai/CLIP issue 46). Deliberate deviation: the trainer has no post-step hook, so
the similarity uses exp(min(logit_scale, ln 100)) instead; that is the same scale while the
parameter is <= ln 100 (OpenAI's released value is ln 100), and above it the parameter gets no
gradient from the loss. Second deviation: CLIP4Clip's loaders pad a video shorter than T frames
with zero frames that its video mask leaves out of the mean; video batches here carry no mask, and
a short video repeats its last frame (DGL's sampler), so the mean is over all T frames and that
last frame weighs more. Videos of at least T frames are pooled identically.

The video-text contract (what `make_loss`, `video_text_predict_fns` and the 'video_retrieval'
evaluator rely on): a video-text method's Linen model takes `(video (B, T, H, W, 3),
caption_tokens (B, L), *, train)` and returns `(similarity (B, B), aux)`, text rows x video
columns, already multiplied by the logit scale; it has the methods `embed_video(video)` and
`embed_text(caption_tokens)`, each returning L2-normalised float32 features (B, E), and the
fields `variant` and `vocab_path`. Its params hold CLIP under `clip/` (the `clip.Model` tree, so
`coop.load_clip` loads it).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import method
from jaxprompt.models import clip
from jaxprompt.prompts import coop

# What CLIP4Clip trains with `--freeze_layer_num 0` (module docstring); the embeddings stay frozen.
TRAINABLE_PARAMS = (r"clip/(visual/transformer/.*|visual/ln_post/.*|visual/proj|transformer/.*"
                    r"|ln_final/.*|text_projection|logit_scale)")
MAX_LOGIT_SCALE = math.log(100.0)  # the original's clamp of the trained logit scale


def frames_of(video, image_size: int):
  """video (B, T, S, S, 3) -> its frames (B·T, S, S, 3), video-major; a clear error otherwise."""
  if video.ndim != 5 or tuple(video.shape[2:]) != (image_size, image_size, 3):
    raise ValueError(f"A video batch must be (B, T, {image_size}, {image_size}, 3) (frames NHWC, "
                     f"CLIP-normalised); got {tuple(video.shape)}.")
  return video.reshape((-1,) + tuple(video.shape[2:]))


def mean_pool_frames(frame_features):
  """CLIP4Clip 'meanP': frame features (B, T, E) -> L2-normalised mean of the L2-normalised
  frame features, (B, E) float32 (every frame counts; see the module docstring)."""
  frame_features = clip.normalize(frame_features.astype(jnp.float32))
  return clip.normalize(jnp.mean(frame_features, axis=1))


def similarity_scale(logit_scale):
  """exp(min(logit_scale, ln 100)): the scale of the similarity (the clamp: module docstring)."""
  return jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))


def video_text_similarity(logit_scale, text_features, video_features):
  """(B_text, B_video) = `similarity_scale(logit_scale)` · t_i · v_j of normalised features."""
  return similarity_scale(logit_scale) * text_features @ video_features.T


def symmetric_info_nce(similarity):
  """0.5 · (mean_i -log softmax_j(S)_ii + mean_j -log softmax_i(S)_jj) for a square similarity
  S (B, B), text rows x video columns, pair i on the diagonal (CLIP4Clip `CrossEn` on S and S.T).
  """
  similarity = similarity.astype(jnp.float32)
  if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
    raise ValueError(f"The video-text similarity must be square (B, B); got {similarity.shape}.")
  labels = jnp.arange(similarity.shape[0])
  text_to_video = optax.softmax_cross_entropy_with_integer_labels(similarity, labels)
  video_to_text = optax.softmax_cross_entropy_with_integer_labels(similarity.T, labels)
  return 0.5 * (jnp.mean(text_to_video) + jnp.mean(video_to_text))


def make_loss(unused_config, unused_source):
  """The `Method.make_loss` of every video-text method: `symmetric_info_nce` of the model's
  similarity over the whole (global) batch; a scalar."""
  return lambda similarity, aux, batch: symmetric_info_nce(similarity)


def video_text_predict_fns(model, unused_config=None) -> dict:
  """The evaluators' predict functions of a video-text model: 'embed_video' (variables, video
  (B, T, H, W, 3)) -> (B, E), 'embed_text' (variables, token ids (N, L)) -> (N, E), both
  L2-normalised float32 from the model's own methods (prompts included); 'logit_scale'
  (variables) -> `similarity_scale(clip/logit_scale)`; 'tokenize' (list of str) -> int32 (N,
  context length of the model's CLIP), host-side, with the model's vocabulary."""
  model_class = type(model)

  def tokenize(texts):  # the tokenizer loads on first use
    tower = clip.Model(**coop.clip_config(model.variant, model.dtype))
    tokenizer = coop.get_tokenizer(model.vocab_path, tower.context_length)
    return np.asarray(tokenizer(list(texts)), np.int32)

  return {
      "embed_video": lambda variables, video: model.apply(
          variables, video, method=model_class.embed_video).astype(jnp.float32),
      "embed_text": lambda variables, ids: model.apply(
          variables, ids, method=model_class.embed_text).astype(jnp.float32),
      "logit_scale": lambda variables: similarity_scale(
          variables["params"]["clip"]["logit_scale"]),
      "tokenize": tokenize,
  }


class Model(nn.Module):
  """CLIP4Clip-meanP on CLIP (`variant`; ViT towers). `__call__(video, caption_tokens)` returns
  `(similarity (B, B), aux)` with aux 'text_features' and 'video_features' (normalised).
  Ignored fields: `num_classes` (the trainer passes it) and `num_frames` (meanP takes any T; a
  config's model settings then serve DGL and the baselines alike). Params: `clip/...`."""
  num_classes: int = 0
  variant: str = "ViT-B/32"
  vocab_path: str = ""
  num_frames: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.clip = clip.Model(**coop.clip_config(self.variant, self.dtype))

  def frame_block_hook(self):
    """The image tower's `block_hook` for every frame (`clip.Transformer`); None: plain CLIP.
    Prompt methods built on this model override it."""
    return None

  def caption_embeddings(self, caption_tokens):
    """token ids (N, L) -> (token embeddings (N, L', W), EOT positions (N,)) that the text tower
    runs on; here CLIP's own (L' = L, EOT at the argmax id). Prompt methods override it."""
    return self.clip.embed_tokens(caption_tokens), jnp.argmax(caption_tokens, axis=-1)

  def embed_video(self, video):
    """video (B, T, S, S, 3) -> meanP features (B, E), L2-normalised float32."""
    frames = frames_of(video, self.clip.image_size)
    features = self.clip.encode_image(frames, block_hook=self.frame_block_hook())  # (B·T, E)
    return mean_pool_frames(features.reshape(video.shape[:2] + features.shape[-1:]))

  def embed_text(self, caption_tokens):
    """token ids (N, L), L <= 77 -> EOT features (N, E), L2-normalised float32."""
    embeddings, eot_indices = self.caption_embeddings(caption_tokens)
    return clip.normalize(self.clip.encode_text_embeddings(embeddings, eot_indices))

  def __call__(self, video, caption_tokens, *, train: bool = False):
    del train  # no dropout in CLIP; the ViT towers have no batch statistics
    text_features, video_features = self.embed_text(caption_tokens), self.embed_video(video)
    similarity = video_text_similarity(self.clip.logit_scale, text_features, video_features)
    return similarity, {"text_features": text_features, "video_features": video_features}


METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, inputs=("video", "caption_tokens"),
                       make_loss=make_loss, predict_fns=video_text_predict_fns,
                       loaders={"model": coop.load_clip})
