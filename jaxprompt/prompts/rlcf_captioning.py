"""RLCF for image captioning (Zhao et al., ICLR 2024, arXiv 2305.18010, §3.2 and §4.3): every
test image adapts its own copy of a captioner's mapping network by REINFORCE with a frozen reward
CLIP, then is captioned by the adapted captioner.

Follows mzhaoshuai/RLCF `caption/capdec_tta.py` (`make_preds_policy_batch`),
`caption/clip_reward.py` (`CLIPRewards.CLIPScore(pairwise=False)`, `rewards_post_process`,
`extract_text_features`), `caption/image_llm/custom_models.py` (`CAP_TTA`: only `clip_project`,
the mapper, trains and is reset after every image) and `caption/image_llm/models/generate_opt.py`, with the settings of
`caption/scripts/tta_{clipcap,capdec}_{c2f,c2n}.sh`. The captioner is ClipCap or CapDec
(`jaxprompt/prompts/clipcap.py`): frozen CLIP ViT-B/16 -> normalised image embedding -> mapper ->
prefix -> frozen OPT-125m. Per test image, from the trained mapper and a fresh AdamW state:

  1. the reward CLIP's image features, once (`set_image_features`; the image resized bicubically
     with align_corners=True when the reward CLIP's input size differs);
  2. S = 4 times: K captions = the K beams of a beam search with K beams (prompt "" = '</s>'
     after the prefix, at most 50 new tokens, EOS the newline token), decoded without special
     tokens and stripped; reward r_k = CLIP-S(caption_k, image) = 2.5 · max(cos, 0) in the reward
     CLIP's space (the caption CLIP-tokenised with truncation, no "A photo depicts" prefix; several
     reward CLIPs: their weighted sum, RLCF-S, `rlcf.effective_reward_weights`) minus the mean of
     the K (`reward_process=1`, `process_batch=0`, `reward_amplify=0`); the K captions are
     re-tokenised by OPT's tokenizer ('</s>' + BPE, right-padded with '<pad>' (id 1) to the
     longest of the K) and teacher-forced through mapper + OPT; a caption's loss is the mean over
     ALL its L padded positions of the token cross-entropy with ignore_index 0: '</s>' and the
     pads (id 1) count, only id 0 ('<s>') is zeroed and still divides; loss = mean_k r_k · loss_k;
     one AdamW step (eps 1e-6, weight decay 0, PyTorch's betas) on the mapper;
  3. the caption: a 5-beam search with the adapted mapper, the best beam, lower-cased;
  4. reset the mapper and the optimizer state.

Settings of the scripts (case 01; K = `sample_k` = the beams sampled, lr = `tta_lr`):
`SCRIPT_SETTINGS`. RLCF-S (case 02, `multiple_reward_models=1`) uses the reward CLIPs
("ViT-L/14@336px", "RN50x64", "ViT-L/14").

Batching (what no original has): a batch of B images adapts B mapper copies at once. A step's
samples are text (the reward reads strings, the loss re-tokenises them), so the S steps run from
the host: one jitted beam search over the B images (each image's prompt from its own mapper, the
OPT shared), decoding and tokenisation on the host, then one jitted update vmapped over the B
(mapper copies, optimizer states). `batched=False` runs the same functions on one image at a time.
Either way every image starts from the same mapper and a fresh optimizer state, so the captions do
not depend on the batch.

Deliberate deviations:
  * fp32 throughout (the original runs under autocast with a GradScaler(init_scale=1000), whose
    skipped steps on fp16 overflow have no counterpart; its scale cancels in AdamW otherwise).
  * The teacher-forced ids are padded to a multiple of 8 beyond the K captions' longest, L (one
    compile per bucket); positions past L are masked out of the attention and the loss, so the
    numbers are those of the original's padding to L.
  * No momentum buffer (`momentum_update=0` in every script).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprompt import method
from jaxprompt.models import clip, opt
from jaxprompt.prompts import clipcap, coop, rlcf, tpt

# (captioner mode, target) -> (K, lr) of `caption/scripts/tta_{mode}_c2{f,n}.sh`, case 01.
SCRIPT_SETTINGS = {("clipcap", "flickr"): (10, 2e-6), ("clipcap", "nocaps"): (10, 2e-6),
                   ("capdec", "flickr"): (6, 5e-6), ("capdec", "nocaps"): (6, 3e-6)}
STEPS = 4  # tta_steps of every script
WEIGHT_DECAY = 0.0  # tta_weight_decay
ADAM_EPS = 1e-6  # `torch.optim.AdamW(..., eps=1e-06)` in `capdec_tta.py`
FINAL_BEAMS = 5  # the caption after adaptation: `opt_generate(..., num_beams=5, num_captions=1)`
MAX_NEW_TOKENS = 50  # `generate(max_length=50)`, passed as max_new_tokens
PAD_BUCKET = 8  # teacher-forced ids are padded to a multiple of this (module docstring)
# The embedded demo pre-fits the captioner (as configs/clipcap_coco.py) and the reward CLIPs.
TRAINABLE_PARAMS = r"(mapper|reward_\d+)/.*"


class Model(clipcap.Model):
  """ClipCap / CapDec (`clipcap.Model`: 'clip', 'mapper', 'opt') plus the reward CLIPs
  'reward_0', ... of `reward_variants`. With `caption_tokens` (B, 1, L) or (B, L), aux also has
  'reward_logits': per reward CLIP the image-caption logits (B, B) of the batch,
  exp(logit_scale) · cos (what the embedded demo pre-fits the reward CLIPs with, CLIP's contrastive
  loss; the real runs load OpenAI weights and never train)."""
  reward_variants: tuple[str, ...] = ("ViT-L/14",)
  reward_weights: tuple[float, ...] = ()

  def __post_init__(self):
    rlcf.effective_reward_weights(self.reward_variants, self.reward_weights)
    super().__post_init__()

  def setup(self):
    super().setup()
    self.reward = [clip.Model(**coop.clip_config(v, self.dtype)) for v in self.reward_variants]

  def __call__(self, images, *, train: bool = False, caption_ids=None, caption_tokens=None):
    logits, aux = super().__call__(images, train=train, caption_ids=caption_ids,
                                   caption_tokens=caption_tokens)
    if self.is_initializing():
      for reward in self.reward:
        reward.encode_text(jnp.zeros((1, reward.context_length), jnp.int32))
    reward_logits = []
    if caption_tokens is not None or self.is_initializing():
      for reward in self.reward:
        image_features = clip.normalize(reward.encode_image(_resized(images, reward.image_size)))
        if caption_tokens is None:
          continue
        tokens = caption_tokens[:, 0] if caption_tokens.ndim == 3 else caption_tokens
        text_features = clip.normalize(reward.encode_text(tokens))
        scale = jnp.exp(reward.variables["params"]["logit_scale"])
        reward_logits.append(scale * image_features @ text_features.T)
    return logits, {**aux, "reward_logits": tuple(reward_logits)}


def _resized(images, size: int):
  return images if images.shape[1] == size else rlcf.resize_bicubic_align_corners(images, size)


def make_loss(config, source):
  """The embedded demo's pre-fit: the captioning loss (`clipcap.caption_loss`) plus, per reward
  CLIP, CLIP's symmetric contrastive loss over the batch's (image, caption) pairs."""
  caption_loss = clipcap.make_loss(config, source)

  def loss(logits, aux, batch):
    total = caption_loss(logits, aux, batch)
    for pair_logits in aux["reward_logits"]:
      labels = jnp.arange(pair_logits.shape[0])
      total += 0.5 * (optax.softmax_cross_entropy_with_integer_labels(pair_logits, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(pair_logits.T,
                                                                        labels).mean())
    return total
  return loss


# ------------------------------------------------------------------------------------------------
# The adaptation.


@dataclasses.dataclass(frozen=True)
class Settings:
  """One run's RLCF captioning settings (module docstring; `SCRIPT_SETTINGS` for K and lr)."""
  num_samples: int = 10  # K, the beams sampled per step
  steps: int = STEPS
  lr: float = 2e-6
  weight_decay: float = WEIGHT_DECAY
  max_new_tokens: int = MAX_NEW_TOKENS
  final_beams: int = FINAL_BEAMS

  def __post_init__(self):
    for name in ("num_samples", "steps", "max_new_tokens", "final_beams"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RLCF captioning: {name}={value!r}; expected an integer >= 1.")
    for name in ("lr", "weight_decay"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"RLCF captioning: {name}={value!r}; expected a number >= 0.")


def make_optimizer(lr: float, weight_decay: float = WEIGHT_DECAY):
  """torch.optim.AdamW(mapper params, lr, eps=1e-6, weight_decay) with PyTorch's default betas."""
  return tpt.make_optimizer(lr, weight_decay, eps=ADAM_EPS)


def rewarded_caption_loss(logits, token_ids, length, rewards):
  """RLCF's captioning loss of one image: mean_k rewards[k] · loss_k.

  logits (K, L', V) of the teacher-forced captions token_ids (K, L') (pad id 1 after each caption,
  anything past column `length`); loss_k = Σ_{j < length, id != 0} CE(logits[k, j], ids[k, j]) /
  length: torch's cross_entropy(ignore_index=0, reduction='none') averaged over the `length`
  columns of the original's padding; rewards (K,) already baseline-subtracted, no gradient."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  token_ce = -jnp.take_along_axis(log_probs, token_ids[..., None], axis=-1)[..., 0]
  counted = (token_ids != 0) & (jnp.arange(token_ids.shape[1]) < length)[None]
  caption_losses = jnp.sum(jnp.where(counted, token_ce, 0.0), axis=1) / length
  return jnp.mean(jax.lax.stop_gradient(rewards) * caption_losses)


def centred_rewards(scores):
  """`rewards_post_process` for one image: scores (K,) minus their mean when K > 1."""
  return scores - jnp.mean(scores) if scores.shape[-1] > 1 else scores


@dataclasses.dataclass(frozen=True)
class Captioner:
  """The pure pieces of a captioner + reward CLIPs that the adaptation runs (`adapt`): built by
  the method's predict function 'rlcf_captioner' from the model."""
  model: Model
  weights: tuple[float, ...]

  @property
  def rewards(self) -> tuple[clip.Model, ...]:
    return tuple(clip.Model(**coop.clip_config(v, self.model.dtype))
                 for v in self.model.reward_variants)

  def split(self, variables):
    """(tunable0 = params['mapper'], frozen = the variables without it)."""
    params = dict(variables["params"])
    return params.pop("mapper"), {**variables, "params": params}

  @staticmethod
  def _with_mapper(frozen, mapper):
    return {**frozen, "params": {**frozen["params"], "mapper": mapper}}

  def prompts(self, mapper, frozen, embeddings):
    """Decoding prompts (B, P + 1, D) of embeddings (B, E), each row with its own mapper copy
    (a leading B axis on every mapper leaf)."""
    def one(mapper_b, embedding):
      return self.model.apply(self._with_mapper(frozen, mapper_b), embedding[None],
                              method=Model.embedding_prompt)[0]
    return jax.vmap(one)(mapper, embeddings)

  def beams(self, mapper, frozen, embeddings, *, num_beams: int, num_return: int,
            max_new_tokens: int, eos_token_id: int):
    """Beam search after each row's prompt: dict(tokens (B, R, T), lengths (B, R), scores)."""
    decoder = opt.Model(self.model.opt_variant, self.model.opt_vocab_size, self.model.dtype)
    prompts = self.prompts(mapper, frozen, embeddings)
    return opt.generate_beams(decoder, frozen["params"]["opt"], prompts,
                              num_beams=num_beams, num_return_sequences=num_return,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)

  def embed(self, frozen, images):
    """(policy embeddings (B, E), normalised, the prefix input; per reward CLIP the image
    features (B, E_m))."""
    embeddings = clip.normalize(self.model.apply(
        frozen, images, method=lambda m, x: m.clip.encode_image(x)))
    rewards = tuple(rlcf.encode_images(r, tpt.clip_variables(frozen, f"reward_{i}"), images)
                    for i, r in enumerate(self.rewards))
    return embeddings, rewards

  def rewards_of(self, frozen, reward_images, reward_tokens):
    """Centred rewards (B, K): Σ_m w_m · CLIP-S_m(caption, image) minus the mean over K.
    reward_images: per reward CLIP (B, E_m); reward_tokens: per reward CLIP (B, K, L_m)."""
    scores = 0.0
    for i, (r, weight) in enumerate(zip(self.rewards, self.weights)):
      tokens = reward_tokens[i]
      texts = rlcf.encode_texts(r, tpt.clip_variables(frozen, f"reward_{i}"),
                                tokens.reshape(-1, tokens.shape[-1]))
      texts = texts.reshape(*tokens.shape[:2], -1)
      scores = scores + weight * rlcf.clip_score(texts, reward_images[i][:, None])
    return jax.vmap(centred_rewards)(scores)

  def loss(self, mapper, frozen, embedding, token_ids, token_mask, length, rewards):
    """One image's loss (`rewarded_caption_loss`) for its mapper copy; embedding (E,), token_ids
    and token_mask (K, L')."""
    def logits_fn(m):
      # The mapper runs once and its prefix serves the K captions; the original maps K copies
      # of the embedding (`prefix.repeat(sample_k, 1)`): the same prefix and gradients.
      prefix = m.mapper(embedding[None])
      prefix = jnp.broadcast_to(prefix, (token_ids.shape[0], *prefix.shape[1:]))
      return m.caption_logits(prefix, token_ids, token_mask)
    logits = self.model.apply(self._with_mapper(frozen, mapper), method=logits_fn)
    return rewarded_caption_loss(logits, token_ids, length, rewards)


@functools.lru_cache(maxsize=16)
def _jitted(captioner: Captioner, settings: Settings, eos_token_id: int):
  """(embed, start, sample, update, caption) compiled for one captioner and settings."""
  optimizer = make_optimizer(settings.lr, settings.weight_decay)

  def start(mapper0, count: int):
    mapper = jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), mapper0)
    return mapper, jax.vmap(optimizer.init)(mapper)

  def sample(mapper, frozen, embeddings):
    out = captioner.beams(mapper, frozen, embeddings, num_beams=settings.num_samples,
                          num_return=settings.num_samples,
                          max_new_tokens=settings.max_new_tokens, eos_token_id=eos_token_id)
    return out["tokens"], out["lengths"]

  def update(mapper, opt_state, frozen, embeddings, reward_images, reward_tokens, token_ids,
             token_mask, lengths):
    rewards = captioner.rewards_of(frozen, reward_images, reward_tokens)

    def one(mapper_b, opt_state_b, embedding, ids, mask, length, rewards_b):
      loss, grads = jax.value_and_grad(captioner.loss)(mapper_b, frozen, embedding, ids, mask,
                                                      length, rewards_b)
      updates, opt_state_b = optimizer.update(grads, opt_state_b, mapper_b)
      return optax.apply_updates(mapper_b, updates), opt_state_b, loss

    mapper, opt_state, losses = jax.vmap(one)(mapper, opt_state, embeddings, token_ids,
                                              token_mask, lengths, rewards)
    return mapper, opt_state, losses, rewards

  def caption(mapper, frozen, embeddings):
    out = captioner.beams(mapper, frozen, embeddings, num_beams=settings.final_beams,
                          num_return=1, max_new_tokens=settings.max_new_tokens,
                          eos_token_id=eos_token_id)
    return out["tokens"][:, 0], out["lengths"][:, 0]

  return (jax.jit(captioner.embed), jax.jit(start, static_argnums=1), jax.jit(sample),
          jax.jit(update), jax.jit(caption))


def _pad_bucket(length: int) -> int:
  return -(-length // PAD_BUCKET) * PAD_BUCKET


@dataclasses.dataclass(frozen=True)
class Episodes:
  """B images under adaptation: each image's mapper copy and optimizer state (a leading B axis),
  the frozen variables, the images' policy embeddings (B, E) and reward image features."""
  mapper: Any
  opt_state: Any
  frozen: Any
  embeddings: Any
  reward_images: tuple


class Adapter:
  """The host side of RLCF captioning (module docstring): `start` B images, `step` S times,
  `captions`; `adapt` does all of it.

  captioner: the method's `Captioner` (predict function 'rlcf_captioner'); caption_tokenizer: the
  OPT `gpt2_tokenizer.Tokenizer` (decoding and re-tokenisation); reward_tokenizers: per reward
  CLIP its `clip_tokenizer.Tokenizer` (predict function 'reward_tokenizers').
  """

  def __init__(self, captioner: Captioner, settings: Settings, caption_tokenizer,
               reward_tokenizers: Sequence[Any]):
    if len(reward_tokenizers) != len(captioner.weights):
      raise ValueError(f"{len(reward_tokenizers)} reward tokenizers for "
                       f"{len(captioner.weights)} reward CLIPs.")
    self.captioner, self.settings = captioner, settings
    self.caption_tokenizer, self.reward_tokenizers = caption_tokenizer, tuple(reward_tokenizers)
    (self._embed, self._start, self._sample, self._update,
     self._caption) = _jitted(captioner, settings, caption_tokenizer.newline_token_id)

  def start(self, variables, images) -> Episodes:
    """Every image from the model's mapper and a fresh optimizer state; images (B, S, S, 3)
    CLIP-normalised at the policy's input size."""
    mapper0, frozen = self.captioner.split(variables)
    embeddings, reward_images = self._embed(frozen, jnp.asarray(images))
    mapper, opt_state = self._start(mapper0, len(images))
    return Episodes(mapper, opt_state, frozen, embeddings, reward_images)

  def _texts(self, tokens, lengths) -> list[str]:
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [self.caption_tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]

  def captions(self, episodes: Episodes) -> list[str]:
    """Each image's caption by its current mapper: the best of `final_beams` beams, lower-cased."""
    return [c.lower() for c in self._texts(*self._caption(episodes.mapper, episodes.frozen,
                                                           episodes.embeddings))]

  def step(self, episodes: Episodes) -> tuple[Episodes, dict]:
    """One REINFORCE step of every image. Returns the updated episodes and the step's record:
    samples (B, K) captions, rewards (B, K) centred, losses (B,), and the teacher-forced
    token_ids / token_mask (B, K, L') with each image's padded length lengths (B,)."""
    tokens, lengths = self._sample(episodes.mapper, episodes.frozen, episodes.embeddings)
    samples = [self._texts(t, n) for t, n in zip(np.asarray(tokens), np.asarray(lengths))]
    encoded = [self.caption_tokenizer(texts) for texts in samples]  # padded to the longest
    count = len(samples)
    width = _pad_bucket(max(ids.shape[1] for ids, _ in encoded))
    token_ids = np.full((count, self.settings.num_samples, width),
                        self.caption_tokenizer.pad_token_id, np.int32)
    token_mask = np.zeros_like(token_ids)
    for b, (ids, mask) in enumerate(encoded):
      token_ids[b, :, :ids.shape[1]], token_mask[b, :, :ids.shape[1]] = ids, mask
    caption_lengths = np.array([ids.shape[1] for ids, _ in encoded], np.int32)
    reward_tokens = tuple(
        np.stack([np.asarray(tokenizer(texts, truncate=True), np.int32) for texts in samples])
        for tokenizer in self.reward_tokenizers)
    mapper, opt_state, losses, rewards = self._update(
        episodes.mapper, episodes.opt_state, episodes.frozen, episodes.embeddings,
        episodes.reward_images, reward_tokens, token_ids, token_mask, caption_lengths)
    record = {"samples": np.array(samples, dtype=object), "rewards": np.asarray(rewards),
              "losses": np.asarray(losses), "token_ids": token_ids, "token_mask": token_mask,
              "lengths": caption_lengths}
    return dataclasses.replace(episodes, mapper=mapper, opt_state=opt_state), record

  def adapt(self, variables, images, *, batched: bool = True) -> dict:
    """Adapts and captions B images; batched=False: one image at a time (the same results).

    Returns dict(zeroshot=B captions of the unadapted captioner, adapted=B captions after the S
    steps, mapper=the adapted mapper params (leading B axis), reward_image_features=(B, E_0) of
    the first reward CLIP, steps=the S step records of `step`)."""
    if not batched and len(images) > 1:
      parts = [self.adapt(variables, images[b:b + 1]) for b in range(len(images))]
      merged = {key: [c for p in parts for c in p[key]] for key in ("zeroshot", "adapted")}
      merged["reward_image_features"] = np.concatenate(
          [p["reward_image_features"] for p in parts])
      merged["mapper"] = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                                      *[p["mapper"] for p in parts])
      merged["steps"] = [{key: np.concatenate([p["steps"][s][key] for p in parts])
                          for key in ("samples", "rewards", "losses", "lengths")}
                         for s in range(self.settings.steps)]
      return merged
    episodes = self.start(variables, images)
    zeroshot, records = self.captions(episodes), []
    for _ in range(self.settings.steps):
      episodes, record = self.step(episodes)
      records.append(record)
    return {"zeroshot": zeroshot, "adapted": self.captions(episodes), "mapper": episodes.mapper,
            "reward_image_features": np.asarray(episodes.reward_images[0]), "steps": records}


def predict_fns(model: Model, config=None) -> dict:
  """ClipCap's (`clipcap.predict_fns`) plus 'rlcf_captioner' () -> `Captioner` and
  'reward_tokenizers' () -> the reward CLIPs' truncating tokenizers (host-side)."""
  weights = rlcf.effective_reward_weights(model.reward_variants, model.reward_weights)
  captioner = Captioner(model, weights)

  def reward_tokenizers():
    return tuple(coop.get_tokenizer(model.vocab_path, r.context_length)
                 for r in captioner.rewards)

  return {**clipcap.predict_fns(model, config), "rlcf_captioner": lambda: captioner,
          "reward_tokenizers": reward_tokenizers}


def load_captioner(variables, path: str):
  """The `config.model_init` part 'captioner': the trained mapper of a ClipCap / CapDec run of
  this library (its workdir, `checkpointing.read_run`) into params['mapper']."""
  from jaxprompt import checkpointing, models  # pylint: disable=g-import-not-at-top
  _, state = checkpointing.read_run(path)
  trained = state.get("params", {})
  if "mapper" not in trained:
    raise ValueError(f"config.model_init.captioner={path!r}: its checkpoint has no trained "
                     f"'mapper' params (it trained {sorted(trained)}); expected the workdir of a "
                     f"prompts.clipcap run.")
  params = variables["params"]
  return {**variables, "params": {
      **params, "mapper": models.common.merge_params(trained["mapper"], params["mapper"],
                                                     source=path)}}


METHOD = method.Method(
    model=Model, trainable=TRAINABLE_PARAMS,
    loaders={"clip": coop.load_clip, "opt": clipcap.load_opt, "captioner": load_captioner,
             **{f"reward_{i}": rlcf.reward_loader(i) for i in range(rlcf.MAX_REWARDS)}},
    optional_inputs=("caption_ids", "caption_tokens"), make_loss=make_loss,
    predict_fns=predict_fns)
