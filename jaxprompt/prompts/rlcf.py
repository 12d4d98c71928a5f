"""RLCF (Zhao et al., ICLR 2024, "Test-Time Adaptation with CLIP Reward for Zero-Shot Generalization
in Vision-Language Models", arXiv 2305.18010): test-time adaptation of a CLIP policy by REINFORCE
with a frozen reward CLIP, classification (paper §3.1–3.2, §4.1).

Follows mzhaoshuai/RLCF `TPT/tpt_cls_rl.py` (`test_time_tuning`, prompt mode),
`TPT/tune_cls_rl.py` + `TPT/clip/custom_clip.py` `CLIPCLS_TTA` (image-encoder mode and the
momentum buffer), `TPT/clip_reward.py` (`CLIPRewards`, `CLIPRewardsMultiple`) and
`TPT/tune_cls_kd.py` + `TPT/utils/KD.py` (the KD baseline). One test sample is one `tta.Episode`
built on TPT's (`prompts/tpt.py`, whose tunable params, confident-view selection, cached
features, prediction and AdamW RLCF shares, as its code shares TPT's):

  * prepare (initial params): TPT's: the policy's logits of all V views, the int(V · selection)
    views of lowest entropy kept; then the reward CLIPs' L2-normalised image features of those
    views are cached (views bicubically resized, align_corners=True, when a reward CLIP's input
    size differs, as `extract_image_features`);
  * every step: the policy's logits (exp(logit_scale) · cos) of the selected views; the top-K
    classes of each view (deterministic "sampling", re-computed every step); reward
    CLIP-S = 2.5 · max(cos, 0) in each reward CLIP's own embedding space (its width may differ
    from the policy's); RLCF-S sums several reward CLIPs' clipped scores with fixed weights; the
    baseline is the mean over the K samples of the same view (`rewards_post_process`:
    reward_process=1, process_batch=0, reward_amplify=0: no std division; none when K = 1);
    loss = mean over the (view, class) pairs of r · CE(logits_view, class) (`reinforce_loss`);
    one AdamW step (PyTorch defaults: betas (0.9, 0.999), eps 1e-8; wd 5e-4);
  * predict: the adapted policy's logits of view 0.

Modes (scripts `rlcf-prompt.sh`, `rlcf-tune.sh`): 'prompt' tunes TPT's shared context
`{'ctx': (n_ctx, W)}` (init: the token embeddings of `ctx_init`, or `init_ctx`, e.g. a CoOp
checkpoint's ctx), lr 7e-3; 'image' tunes the whole visual tower `params['visual']` on
precomputed class text features, lr 1e-5. The reward text is the hard prompt
'{ctx_init} {class}.' (classes '_' -> ' '), tokenised with the policy's vocabulary and encoded by
each reward CLIP (`set_class_features(tokenized_classes=...)`). In image mode the original builds
the class prompts from the raw `--ctx_init a_photo_of_a` string: `image_prompt_quirk=True`
reproduces 'a_photo_of_a {class}.' for both the policy's class features and the reward text
(prompt mode replaces '_' by ' ', as TPT's `PromptLearner`).

RLCF-S-M's momentum buffer (`CLIPCLS_TTA.momentum_update_model`) is `momentum_update`, a host-side
function over the adapted params that `tta.adapt` returns. `objective='kd'` is the paper's KD
baseline: the cross-entropy -Σ_c p_teacher log p_policy (`kd_distill_loss_v2`, T = 1; the KL
divergence up to the teacher's entropy, the same gradient), teacher logits = the reward CLIP's
exp(logit_scale) · cos over all classes on the selected views, cached at prepare.
`objective='pseudo_label'` is the paper's pseudo-label baseline (§4, Table 1), for which the
repository has no code; our definition: the pseudo-label of each selected view is the policy's
own top-1 class at the initial (reset) params, fixed at prepare, and the loss is the mean
cross-entropy of the selected views' logits against them (no reward CLIP is used).

As a method (`METHOD`, `config.model_name='prompts.rlcf'`): `Model` is TPT's (`tpt.Model`: the
policy CLIP 'clip', zero-shot on "{ctx_init} {name}.") plus the frozen reward CLIPs 'reward_0',
'reward_1', ... of `reward_variants`, each loaded from its own `config.model_init` part; the
'tta' evaluator gets them with their weights through the predict function 'tta_clips'. Only the
embedded demos train it: they pre-fit the policy and the rewards, each by cross-entropy on the
class prompts (`make_loss`).

Deliberate deviations and choices:
  * Reward text features of ALL C classes are encoded once when the episode is made; the original
    encodes the whole class list once per dataset too (`set_class_features`) and indexes the
    top-K rows each step, so the numbers are the same.
  * Prompt mode keeps the frozen policy image features of the selected views and of view 0 from
    prepare (TPT's episode); the original re-runs the frozen image tower each step, same numbers.
  * fp32 throughout: no autocast and no GradScaler (whose scale cancels in AdamW).
  * The momentum buffer updates after a batch of B samples, once per sample in order; the B
    samples of that batch all started from the reset target as it was before the batch (the
    original's one-at-a-time loop may refresh the target between two of them). B = 1 is exact.
  * Image mode needs a ViT policy: the original tunes a ResNet tower in train mode (BatchNorm on
    the views' batch statistics), which is not reproduced.
  * `ctx_init` is required: it is the reward prompts' prefix (the original's random-init prefix
    'X X X X' would be the reward text too).
  * The pseudo-label baseline is our definition (above): the repository has no code for it.
    ATKD and DKD (`utils/ATKD.py`, `utils/DKD.py`) are not implemented here.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxprompt import method, optim, tta
from jaxprompt.models import clip, common
from jaxprompt.prompts import coop, tpt

CLIP_SCORE_WEIGHT = 2.5  # `CLIPRewards(clipscore_weight=2.5)`
# Raw confidences of the reward CLIPs (`clip_reward.py` CONFIDECES); RLCF-S uses the first three.
REWARD_CONFIDENCES = {"ViT-L/14@336px": 10, "RN50x64": 3, "ViT-L/14": 5, "ViT-B/16": 1}
RLCF_S_REWARD_ARCHS = ("ViT-L/14@336px", "RN50x64", "ViT-L/14")
OBJECTIVES = ("rlcf", "kd", "pseudo_label")
DEFAULT_LR = {"prompt": 7e-3, "image": 1e-5}


# ------------------------------------------------------------------------------------------------
# Rewards and losses (pure).


def clip_score(text_features, image_features, weight: float = CLIP_SCORE_WEIGHT):
  """CLIP-S = weight · max(cos, 0) of L2-normalised features (..., E), broadcast -> (...)."""
  return weight * jnp.maximum(jnp.sum(text_features * image_features, axis=-1), 0.0)


def reward_weights(archs: Sequence[str]) -> tuple[float, ...]:
  """RLCF-S's weights: the confidences of `archs` normalised and rounded to 2 decimals (Python's
  round, as the original; (0.56, 0.17, 0.28) for `RLCF_S_REWARD_ARCHS`, which sum to 1.01)."""
  unknown = [a for a in archs if a not in REWARD_CONFIDENCES]
  if unknown:
    raise ValueError(f"No RLCF confidence for reward CLIP(s) {unknown}; known: "
                     f"{list(REWARD_CONFIDENCES)}.")
  confidences = [REWARD_CONFIDENCES[a] for a in archs]
  return tuple(round(c / sum(confidences), 2) for c in confidences)


def sampled_rewards(sampled, reward_features, weights: Sequence[float]):
  """Σ_m weight_m · CLIP-S_m(class sampled[n, k], view n) -> (N, K).

  sampled: (N, K) class indices; reward_features: per reward CLIP m, (text (C, E_m), image
  (N, E_m)), both L2-normalised, in that model's own space. Each score is clipped at 0 before the
  weighting (`CLIPRewardsMultiple.CLIPScore`).
  """
  return sum(weight * clip_score(text[sampled], image[:, None])
             for (text, image), weight in zip(reward_features, weights))


def reinforce_loss(logits, sampled, rewards):
  """RLCF's REINFORCE loss: mean over the N·K (row, sample) pairs of (r - b) · CE.

  logits (N, C); sampled (N, K) class indices; rewards (N, K) raw scores, no gradient. The
  baseline b is the mean of the row's K rewards when K > 1 (K = 1: the raw score, as
  `rewards_post_process`).
  """
  rewards = jax.lax.stop_gradient(rewards)
  if rewards.shape[-1] > 1:
    rewards = rewards - rewards.mean(axis=-1, keepdims=True)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  cross_entropy = -jnp.take_along_axis(log_probs, sampled, axis=-1)  # (N, K)
  return jnp.mean(rewards * cross_entropy)


def kd_loss(logits, teacher_logits):
  """-mean_n Σ_c softmax(teacher)_nc · log_softmax(logits)_nc (T = 1, `kd_distill_loss_v2`)."""
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  return -jnp.mean(jnp.sum(teacher * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def pseudo_label_loss(logits, pseudo_labels):
  """mean_n CE(logits_n, pseudo_labels_n): logits (N, C), pseudo_labels (N,) int (module
  docstring: the pseudo-label baseline as defined here)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, pseudo_labels[:, None], axis=-1))


def resize_bicubic_align_corners(images, size: int):
  """(N, h, w, 3) -> (N, size, size, 3) as `F.interpolate(mode='bicubic', align_corners=True)`
  (what the original feeds a reward CLIP of another input size)."""
  rows, cols = (jnp.asarray(common.torch_bicubic_matrix(n, size, align_corners=True), images.dtype)
                for n in images.shape[1:3])
  return jnp.einsum("oh,pw,nhwc->nopc", rows, cols, images)


# ------------------------------------------------------------------------------------------------
# RLCF-S-M: the momentum buffer over the reset target.


class MomentumState(NamedTuple):
  """ema: the EMA of adapted params; target: the reset target; count: samples since the last
  refresh of the target."""
  ema: Any
  target: Any
  count: int


def momentum_init(original) -> MomentumState:
  """The buffer before any sample: EMA and reset target are the original params."""
  return MomentumState(original, original, 0)


@functools.partial(jax.jit, static_argnames="momentum")
def _ema_step(ema, adapted, momentum: float):
  return jax.tree.map(lambda e, x: momentum * e + (1.0 - momentum) * x, ema, adapted)


def momentum_update(state: MomentumState, original, adapted, *, momentum: float = 0.9998,
                    update_freq: int = 64, update_w: float = 1.0) -> MomentumState:
  """RLCF-S-M after a batch: `adapted` is `tta.adapt`'s adapted params (leading axis B).

  Per sample b in order (`momentum_update_model`): EMA <- m · EMA + (1 - m) · adapted[b]; after
  every `update_freq` samples the reset target becomes (1 - w) · original + w · EMA. Returns the
  new state; its `target` is the tunable0 of the next batch (scripts: m = 0.9998, 64, w = 1).
  """
  ema, target, count = state
  for b in range(jax.tree.leaves(adapted)[0].shape[0]):
    ema = _ema_step(ema, jax.tree.map(lambda x, b=b: x[b], adapted), momentum)
    count += 1
    if count >= update_freq:
      count = 0
      target = jax.tree.map(lambda o, e: (1.0 - update_w) * o + update_w * e, original, ema)
  return MomentumState(ema, target, count)


# ------------------------------------------------------------------------------------------------
# The episode.


def reward_prompt_prefix(ctx_init: str, mode: str, image_prompt_quirk: bool) -> str:
  """The words before '{class}.' in the class prompts: `ctx_init` with '_' -> ' ', except in
  image mode with the quirk, where the original's raw 'a_photo_of_a' is kept (' ' -> '_')."""
  if mode == "image" and image_prompt_quirk:
    return ctx_init.replace(" ", "_")
  return ctx_init.replace("_", " ")


def make_episode(policy_clip, reward_clips, class_names: Sequence[str], vocab_path: str, *,
                 mode: str = "prompt", objective: str = "rlcf", n_ctx: int = 4,
                 ctx_init: str = "a photo of a", init_ctx=None, top_k: int = 3, steps: int = 3,
                 lr: float | None = None, weight_decay: float = 5e-4, selection: float = 0.1,
                 image_prompt_quirk: bool = True):
  """RLCF (or its KD baseline) as a `tta.Episode`, on TPT's episode (`tpt.make_episode`: the
  same context or visual tower, confident-view selection, cached features, prediction, AdamW).

  Args:
    policy_clip: (clip.Model, variables) of the policy CLIP; its views' size is its image_size.
    reward_clips: sequence of (clip.Model, variables, weight): the frozen reward CLIPs; one with
      weight 1.0 is plain RLCF (the original applies no weight), several with `reward_weights`
      RLCF-S. 'kd' takes exactly one (the teacher).
    class_names: the label space, in label order.
    vocab_path: the CLIP BPE vocabulary (`coop.get_tokenizer`), shared by all models.
    mode: 'prompt' (TPT's context) or 'image' (the whole visual tower).
    objective: 'rlcf', 'kd' or 'pseudo_label' (no reward CLIP needed; module docstring).
    n_ctx, ctx_init: the prompt context (`coop.coop_prompts`: with `ctx_init`, its token count
      is n_ctx); `ctx_init` is also the class prompts' prefix (`reward_prompt_prefix`).
    init_ctx: optional (n_ctx, W) reset target of the context (a CoOp checkpoint's ctx,
      `tpt.load_coop_context`).
    top_k, steps, lr (None: 7e-3 prompt, 1e-5 image), weight_decay, selection: as the scripts.
    image_prompt_quirk: image mode's 'a_photo_of_a {class}.' class prompts (module docstring).

  Returns:
    (episode, tunable0, frozen): `tta.adapt(episode, tunable0, frozen, views, rng)` adapts a batch
    of samples' views (B, V, S, S, 3), S = the policy's image_size, normalised as CLIP's.
    tunable0 and frozen are TPT's ({'ctx': (n_ctx, W)} or the visual tower's params; {'clip',
    image mode: 'text_features'}) with frozen['rewards'] added: per reward CLIP {'variables',
    'text_features' (C, E_m) of the class prompts}.
  """
  model, variables = policy_clip
  if mode not in tpt.MODES:
    raise ValueError(f"mode={mode!r}: expected one of {tpt.MODES}.")
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}.")
  num_classes = len(class_names)
  if not 1 <= top_k <= num_classes:
    raise ValueError(f"top_k={top_k} must be in [1, {num_classes}] (the number of classes).")
  if not reward_clips and objective != "pseudo_label":
    raise ValueError(f"objective={objective!r} needs at least one reward CLIP (reward_clips is "
                     f"empty).")
  if objective == "kd" and len(reward_clips) != 1:
    raise ValueError(f"The KD baseline distils one teacher; got {len(reward_clips)} reward CLIPs.")
  if mode == "image" and model.is_resnet:
    raise ValueError("mode='image' tunes a ViT visual tower; this policy CLIP has a ResNet one "
                     "(the original's train-mode BatchNorm is not reproduced).")
  if not ctx_init:
    raise ValueError("ctx_init is the class prompts' prefix ('{ctx_init} {class}.' for the "
                     "reward CLIPs): set it, e.g. 'a photo of a'.")

  prefix = reward_prompt_prefix(ctx_init, mode, image_prompt_quirk)
  base, tunable0, frozen = tpt.make_episode(
      model, variables, class_names, vocab_path, mode=mode, n_ctx=n_ctx,
      ctx_init=ctx_init if mode == "prompt" else prefix, ctx=init_ctx,
      keep_underscores=mode == "image", selection=selection, steps=steps,
      lr=DEFAULT_LR[mode] if lr is None else lr, weight_decay=weight_decay)
  reward_models = tuple(r_model for r_model, _, _ in reward_clips)
  weights = tuple(float(weight) for _, _, weight in reward_clips)
  frozen = {**frozen, "rewards": tuple(
      {"variables": r_variables,
       "text_features": _encode_texts(r_model, r_variables, tpt.hard_prompt_ids(
           vocab_path, class_names, prefix, r_model.context_length))}
      for r_model, r_variables, _ in reward_clips)}

  if mode == "prompt":
    policy = tpt.prompt_policy(model, class_names, vocab_path, n_ctx=n_ctx, ctx_init=ctx_init)

    def policy_logits(tunable, frozen, context):  # of the cached selected views' features
      return policy.logits(tunable, frozen, context["image_features"])
  else:
    def policy_logits(tunable, frozen, context):  # the tuned tower re-encodes the views
      clip_variables = {**frozen["clip"], "params": {**frozen["clip"]["params"],
                                                     "visual": tunable}}
      return tpt.image_logits(model, clip_variables, context["views"], frozen["text_features"])

  def prepare(tunable0, frozen, views, rng):
    context = base.prepare(tunable0, frozen, views, rng)
    chosen = views[context["selected"]]  # (S, size, size, 3)
    reward_images = [encode_images(r_model, reward["variables"], chosen)
                     for r_model, reward in zip(reward_models, frozen["rewards"])]
    context = {**context, "reward_image_features": tuple(reward_images)}
    if objective == "kd":
      teacher = frozen["rewards"][0]
      context["teacher_logits"] = (jnp.exp(teacher["variables"]["params"]["logit_scale"]) *
                                   reward_images[0] @ teacher["text_features"].T)
    if objective == "pseudo_label":
      context["pseudo_labels"] = jnp.argmax(policy_logits(tunable0, frozen, context), axis=-1)
    return context

  def loss(tunable, frozen, context, rng):
    del rng
    logits = policy_logits(tunable, frozen, context)  # (S, C)
    if objective == "kd":
      return kd_loss(logits, context["teacher_logits"])
    if objective == "pseudo_label":
      return pseudo_label_loss(logits, context["pseudo_labels"])
    sampled = jax.lax.top_k(logits, top_k)[1]  # (S, K), re-computed every step
    features = [(reward["text_features"], image) for reward, image in
                zip(frozen["rewards"], context["reward_image_features"])]
    return reinforce_loss(logits, sampled, sampled_rewards(sampled, features, weights))

  episode = tta.Episode(prepare=prepare, loss=loss, predict=base.predict,
                        optimizer=base.optimizer, steps=base.steps)
  return episode, tunable0, frozen


def encode_images(model: clip.Model, variables, images):
  """L2-normalised image features (N, E) of `images` (N, S, S, 3) (CLIP-normalised), resized
  bicubically (align_corners=True) to the model's input size when S differs from it, as the
  original feeds a reward CLIP (`CLIPRewards.extract_image_features`)."""
  if images.shape[1] != model.image_size:
    images = resize_bicubic_align_corners(images, model.image_size)
  return clip.normalize(model.apply(variables, images, method=clip.Model.encode_image))


def encode_texts(model: clip.Model, variables, token_ids):
  """L2-normalised text features (N, E) of token ids (N, L)."""
  return clip.normalize(model.apply(variables, token_ids, method=clip.Model.encode_text))


def _encode_texts(model: clip.Model, variables, token_ids):
  """`encode_texts` jitted, for the reward text features computed once per episode."""
  return jax.jit(encode_texts, static_argnums=0)(model, variables, jnp.asarray(token_ids))


# ------------------------------------------------------------------------------------------------
# The method: TPT's model plus the reward CLIPs.

TRAINABLE_PARAMS = r"(clip|reward_\d+)/.*"  # the embedded demos pre-fit policy and rewards
MAX_REWARDS = 3  # RLCF-S's three reward CLIPs: loaders 'reward_0' .. 'reward_2'


def effective_reward_weights(variants: Sequence[str], weights: Sequence[float]) -> tuple:
  """The reward CLIPs' weights: `weights` when given (one per variant), else 1.0 for one reward
  (plain RLCF) and `reward_weights(variants)` for several (RLCF-S)."""
  if not variants:
    raise ValueError("prompts.rlcf needs at least one reward CLIP: config.model.reward_variants is "
                     "empty (prompts.tpt is the method without rewards).")
  if len(variants) > MAX_REWARDS:
    raise ValueError(f"reward_variants={tuple(variants)}: at most {MAX_REWARDS} reward CLIPs.")
  if weights:
    if len(weights) != len(variants):
      raise ValueError(f"reward_weights={tuple(weights)} has {len(weights)} weights for "
                       f"{len(variants)} reward_variants {tuple(variants)}: give one per reward "
                       f"CLIP, or none.")
    return tuple(float(w) for w in weights)
  return (1.0,) if len(variants) == 1 else reward_weights(variants)


class Model(tpt.Model):
  """TPT's zero-shot CLIP (`tpt.Model`, submodule 'clip') plus the reward CLIPs 'reward_0', ... of
  `reward_variants`. Returns (policy logits (B, C), aux {'reward_logits': per reward CLIP (B, C),
  zero-shot on the same hard prompts, the images resized bicubically (align_corners=True) to its
  input size when it differs})."""
  reward_variants: tuple[str, ...] = ("ViT-L/14",)
  reward_weights: tuple[float, ...] = ()

  def __post_init__(self):
    effective_reward_weights(self.reward_variants, self.reward_weights)
    super().__post_init__()

  def setup(self):
    super().setup()
    self.reward = [clip.Model(**coop.clip_config(v, self.dtype)) for v in self.reward_variants]
    self.reward_token_ids = [self.class_prompts(reward.context_length) for reward in self.reward]

  def __call__(self, images, *, train: bool = False):
    logits, _ = super().__call__(images, train=train)
    reward_logits = []
    for reward, token_ids in zip(self.reward, self.reward_token_ids):
      resized = images if reward.image_size == images.shape[1] else \
          resize_bicubic_align_corners(images, reward.image_size)
      reward_logits.append(self.class_logits(reward, resized, token_ids))
    return logits, {"reward_logits": tuple(reward_logits)}


def make_loss(config, source):
  """The demos' pre-fit: per example, CE(policy logits) + Σ_m CE(reward m's logits), softmax
  cross-entropy on batch['label'] (config.label_smoothing)."""
  smoothing = config.get("label_smoothing", 0.0)

  def loss(logits, aux, batch):
    return sum(optim.cross_entropy(out, batch["label"], source.num_classes, smoothing)
               for out in (logits, *aux["reward_logits"]))
  return loss


def predict_fns(model: Model, config=None) -> dict:
  """TPT's (`tpt.predict_fns`: the policy CLIP's functions and 'tta_clips') with the reward CLIPs
  and their weights (`effective_reward_weights`) in 'tta_clips'."""
  weights = effective_reward_weights(model.reward_variants, model.reward_weights)
  return tpt.predict_fns(model, config, rewards=tuple(
      (f"reward_{i}", variant, weight)
      for i, (variant, weight) in enumerate(zip(model.reward_variants, weights))))


def reward_loader(index: int):
  """The `config.model_init` part 'reward_{index}': CLIP weights (`clip.load`) into that subtree of
  every collection; a model with fewer reward CLIPs is an error."""
  subtree = f"reward_{index}"

  def load(variables, path: str):
    if subtree not in variables["params"]:
      raise ValueError(f"config.model_init[{subtree!r}]={path!r}: the model has no reward CLIP "
                       f"{subtree!r} (its reward CLIPs: "
                       f"{sorted(k for k in variables['params'] if k.startswith('reward_'))}).")
    loaded = clip.load(tpt.clip_variables(variables, subtree), path)
    return {c: {**tree, subtree: loaded[c]} if c in loaded else tree
            for c, tree in variables.items()}
  return load


METHOD = method.Method(
    model=Model, trainable=TRAINABLE_PARAMS,
    loaders={"model": coop.load_clip, **{f"reward_{i}": reward_loader(i)
                                         for i in range(MAX_REWARDS)}},
    make_loss=make_loss, predict_fns=predict_fns)
