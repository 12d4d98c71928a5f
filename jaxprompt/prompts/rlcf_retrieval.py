"""RLCF for zero-shot image-text retrieval (Zhao et al., ICLR 2024, arXiv 2305.18010, paper §3.2
and §4.2): every query adapts its own copy of the policy CLIP by REINFORCE with a frozen reward
CLIP, then scores all candidates with the adapted weights.

Follows mzhaoshuai/RLCF `retrieval/clip_ret_policy.py` (`tune_image`, `tune_text`,
`test_time_tune`), `retrieval/custom_models.py` (`CLIPRet_TTA`: which parameters train, the logits)
and `retrieval/clip_reward.py` (`CLIPRewards.CLIPScore(pairwise=False)`, `rewards_post_process`),
with the hyper-parameters of `retrieval/scripts/tta_{coco,flickr}_ret.sh`. One query is one
`tta.Episode`:

  * image -> text (query = an image; `retrieval_task=image2text`, `only_visual=True`): the whole
    visual tower of the policy trains (`CLIPRet_TTA.parameters()` = `visual.parameters()`); the
    candidate features of all captions are computed once by the frozen policy text tower and by
    each reward CLIP (`set_many_text_features`); the reward CLIPs' image features of the query are
    computed once per query (`set_image_features(images=image)`).
  * text -> image (query = a caption; `retrieval_task=text2image`): every non-visual parameter
    trains: token and positional embeddings, the text transformer, ln_final, text_projection AND
    logit_scale (`CLIPRet_TTA.parameters()`: every name without 'visual'); the candidate features
    of all images are computed once by the frozen policy image tower and by each reward CLIP
    (`set_image_features_with_dataloder`); the reward CLIPs' text features of the query once per
    query (`set_text_features(captions=text)`).
  * every step: the policy's logits exp(logit_scale) · cos of the query against ALL candidates
    (1, N); the top-K candidates (re-computed every step); reward CLIP-S = 2.5 · max(cos, 0) of
    (candidate, query) in each reward CLIP's own space (several reward CLIPs: their weighted sum,
    RLCF-S, as `rlcf.sampled_rewards`), minus the mean over the K (`reward_process=1`,
    `process_batch=0`, `reward_amplify=0`); loss = mean over the K of r · CE(logits, candidate)
    (`rlcf.reinforce_loss`); one AdamW step with lr 1e-6, eps 1e-6, weight decay 5e-4 and
    PyTorch's default betas (0.9, 0.999) (`torch.optim.AdamW(model.parameters(), lr, eps=1e-06,
    weight_decay)`), S = 8 steps;
  * predict: the adapted policy's logits of the query against all N candidates: one row of the
    score matrix (i2t: `score_matrix_i2t[i] = logits_per_image[0]`; t2i: `logits_per_text[0]`,
    scaled by the adapted logit_scale, which changes no rank).

The query is a single view: the image as LAVIS's eval processor makes it (`clip_image_eval`:
bicubic resize to 224, centre crop, CLIP normalisation; `tune_image` gets the test loader's batch of
one) and the caption as `blip_caption` cleans it; no augmentation and no confidence selection (the
retrieval code has neither). Top-K per script: K = 20 (COCO i2t), 16 (Flickr30K i2t), 12 (t2i,
both). A reward CLIP of another input size sees the query image resized bicubically with
align_corners=True (`CLIPRewards.extract_image_features`), as `rlcf.resize_bicubic_align_corners`.

Deliberate deviations and choices:
  * fp32 throughout: no autocast and no GradScaler (`init_scale=1000`; its scale cancels in AdamW,
    but it skips the steps whose scaled gradients overflow in fp16, which has no counterpart here).
  * No RLCF-S-M momentum buffer here (`momentum_update=0` in the scripts' first case; the buffer
    for classification is `rlcf.momentum_update`).
  * Image -> text needs a ViT policy: `model.train()` would run a ResNet tower's BatchNorm on the
    single query's statistics, which is not reproduced.
  * Queries are adapted in batches (vmapped, `tta.adapt` / `tta.adapt_queries`); each one starts
    from the same initial weights and a fresh optimizer state, as the original's reset after every
    query (`reset_initial`, `optimizer.load_state_dict(optim_state)`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprompt import tta
from jaxprompt.prompts import rlcf, tpt

DIRECTIONS = ("i2t", "t2i")
# K of `retrieval/scripts/tta_{coco,flickr}_ret.sh` (sample_k_i2t, sample_k_t2i).
TOP_K = {("coco", "i2t"): 20, ("coco", "t2i"): 12, ("flickr", "i2t"): 16, ("flickr", "t2i"): 12}
STEPS, LR, WEIGHT_DECAY = 8, 1e-6, 5e-4  # tta_steps, lr, weight_decay of the scripts
ADAM_EPS = 1e-6  # `torch.optim.AdamW(..., eps=1e-06)` in `clip_ret_policy.py`


def make_optimizer(lr: float = LR, weight_decay: float = WEIGHT_DECAY):
  """torch.optim.AdamW(params, lr, eps=1e-6, weight_decay) with PyTorch's default betas."""
  return tpt.make_optimizer(lr, weight_decay, eps=ADAM_EPS)


def split_params(variables, direction: str):
  """(tunable0, frozen variables): i2t tunes params['visual']; t2i every other param."""
  params = dict(variables["params"])
  visual = params.pop("visual")
  if direction == "i2t":
    return visual, {**variables, "params": params}
  return params, {**variables, "params": {"visual": visual}}


def make_episode(policy_clip, reward_clips, candidate_features, reward_candidate_features, *,
                 direction: str, top_k: int, steps: int = STEPS, lr: float = LR,
                 weight_decay: float = WEIGHT_DECAY):
  """RLCF retrieval as (episode, tunable0, frozen) for `tta.adapt` (i2t) / `tta.adapt_queries`.

  Args:
    policy_clip: (clip.Model, variables) of the policy CLIP.
    reward_clips: sequence of (clip.Model, variables, weight) of the frozen reward CLIPs (one with
      weight 1.0: RLCF; several with `rlcf.reward_weights`: RLCF-S).
    candidate_features: (N, E) L2-normalised features of all candidates by the frozen policy
      (i2t: the captions' text features; t2i: the images' image features), e.g.
      `rlcf.encode_texts` / `rlcf.encode_images`.
    reward_candidate_features: per reward CLIP, the candidates' features (N, E_m) in its space.
    direction: 'i2t' (queries are images) or 't2i' (queries are captions).
    top_k, steps, lr, weight_decay: as the scripts (`TOP_K`, `STEPS`, `LR`, `WEIGHT_DECAY`).

  Returns:
    (episode, tunable0, frozen). i2t: adapt query images (B, 1, S, S, 3) with `tta.adapt`
    (S = the policy's image_size; only view 0 is used); tunable0 = params['visual']. t2i: adapt
    caption token ids (B, L) with `tta.adapt_queries`; tunable0 = every non-visual param,
    logit_scale included. Both predict the query's logits against all N candidates (N,).
  """
  model, variables = policy_clip
  if direction not in DIRECTIONS:
    raise ValueError(f"direction={direction!r}: expected one of {DIRECTIONS}.")
  if not reward_clips:
    raise ValueError("RLCF needs at least one reward CLIP (reward_clips is empty).")
  if len(reward_candidate_features) != len(reward_clips):
    raise ValueError(f"Got candidate features of {len(reward_candidate_features)} reward CLIPs "
                     f"for {len(reward_clips)} reward CLIPs.")
  num_candidates = candidate_features.shape[0]
  for m, features in enumerate(reward_candidate_features):
    if features.shape[0] != num_candidates:
      raise ValueError(f"Reward CLIP {m} has features of {features.shape[0]} candidates; the "
                       f"policy's cover {num_candidates}.")
  if not 1 <= top_k <= num_candidates:
    raise ValueError(f"top_k={top_k} must be in [1, {num_candidates}] (the number of "
                     f"candidates).")
  for m, (r_model, _, _) in enumerate(reward_clips):
    if r_model.context_length != model.context_length:
      raise ValueError(f"Reward CLIP {m} has context length {r_model.context_length}; it reads "
                       f"the captions tokenised for the policy, {model.context_length} tokens.")
  if direction == "i2t" and model.is_resnet:
    raise ValueError("Image -> text RLCF tunes a ViT visual tower; this policy CLIP has a ResNet "
                     "one (the original's train-mode BatchNorm is not reproduced).")
  reward_models = tuple(r_model for r_model, _, _ in reward_clips)
  weights = tuple(float(weight) for _, _, weight in reward_clips)
  tunable0, policy_frozen = split_params(variables, direction)
  frozen = {"clip": policy_frozen, "candidates": candidate_features,
            "reward_candidates": tuple(reward_candidate_features),
            "rewards": tuple(r_variables for _, r_variables, _ in reward_clips)}

  if direction == "i2t":
    def logits_of(tunable, frozen, query):  # query: images (1, S, S, 3)
      variables = {**frozen["clip"], "params": {**frozen["clip"]["params"], "visual": tunable}}
      return tpt.image_logits(model, variables, query, frozen["candidates"])

    def reward_query_features(frozen, query):
      return tuple(rlcf.encode_images(r_model, r_variables, query)
                   for r_model, r_variables in zip(reward_models, frozen["rewards"]))

    def query_of(views):
      return views[:1]
  else:
    def logits_of(tunable, frozen, query):  # query: token ids (1, L)
      text = rlcf.encode_texts(model, {**frozen["clip"], "params": tunable}, query)
      return jnp.exp(tunable["logit_scale"]) * text @ frozen["candidates"].T

    def reward_query_features(frozen, query):
      return tuple(rlcf.encode_texts(r_model, r_variables, query)
                   for r_model, r_variables in zip(reward_models, frozen["rewards"]))

    def query_of(token_ids):
      return token_ids[None]

  def prepare(tunable0, frozen, query, rng):
    del tunable0, rng
    query = query_of(query)
    return {"query": query, "reward_query": reward_query_features(frozen, query)}

  def loss(tunable, frozen, context, rng):
    del rng
    logits = logits_of(tunable, frozen, context["query"])  # (1, N)
    sampled = jax.lax.top_k(logits, top_k)[1]  # (1, K), re-computed every step
    # CLIP-S is symmetric in its two features: (candidates[sampled], query) per reward CLIP.
    features = list(zip(frozen["reward_candidates"], context["reward_query"]))
    return rlcf.reinforce_loss(logits, sampled, rlcf.sampled_rewards(sampled, features, weights))

  def predict(tunable, frozen, context):
    return logits_of(tunable, frozen, context["query"])[0]

  episode = tta.Episode(prepare=prepare, loss=loss, predict=predict,
                        optimizer=make_optimizer(lr, weight_decay), steps=steps)
  return episode, tunable0, frozen


def adapt(episode: tta.Episode, tunable0, frozen, queries, rng, *, direction: str,
          batched: bool = True):
  """(scores (B, N) of each query against all candidates after its adaptation, adapted params)
  for B queries: images (B, S, S, 3) (i2t) or caption token ids (B, L) (t2i)."""
  if direction == "i2t":
    return tta.adapt(episode, tunable0, frozen, queries[:, None], rng, batched=batched)
  return tta.adapt_queries(episode, tunable0, frozen, queries, rng, batched=batched)
