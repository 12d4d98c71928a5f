"""Image-text retrieval with RLCF test-time adaptation (`prompts/rlcf_retrieval.py`): R@K of the
zero-shot policy and of the per-query adapted one, by LAVIS's rules.

Follows mzhaoshuai/RLCF `retrieval/clip_ret_policy.py` (`test_time_tune`: candidate features
once, then every query adapted and scored against all candidates, one row of the score matrix) and
salesforce/LAVIS `tasks/retrieval.py` (`RetrievalTask._report_metrics`): an image query's rank is
the best rank among its ground-truth captions, a caption query's the rank of its image; R@K is the
percentage (0-100) of ranks < K. One direction per evaluator, as the original runs each direction
separately.

The split's batches carry 'image' (B, S, S, 3) (CLIP-normalised at the policy's input size) and
'caption_tokens' (B, C_max, L) (all-zero rows padding, `clip_tokenize(..., max_captions=C_max)`);
captions are numbered image by image in the split's order, as LAVIS's `txt_id`. The policy and
reward CLIPs come from the method's predict function 'tta_clips' ((variables) -> an object with
`policy` = (clip.Model, variables) and `rewards` = ((clip.Model, variables, weight), ...)).

  1. One pass embeds the candidates: i2t the captions (policy and reward text towers), t2i the
     images (policy and reward image towers); and the queries by the frozen policy for the
     zero-shot scores (exp(logit_scale) · cos, the unadapted episode's prediction).
  2. i2t: a second pass adapts each batch of images (`tta.adapt`, one view each); t2i: the
     captions' token ids are adapted in chunks of the batch size (`tta.adapt_queries`). Padding
     rows of the last batch / chunk are adapted too (one compiled shape) and dropped.

  config.evals.ret = dict(type='tta_retrieval', split='test', direction='i2t', top_k=20)

Metrics: '{direction}_R@k' (adapted) and 'zeroshot_{direction}_R@k' for k in `ks`, 'examples'
(images) and 'captions'.

Deviations: ties (equal scores) are counted in the query's favour (its rank is the number of
candidates scoring strictly above its best ground truth); LAVIS's `np.argsort` leaves their order
unspecified. One process: the adaptation reads whole global batches (`jax.device_get`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprompt.evaluators import common, retrieval
from jaxprompt.prompts import rlcf, rlcf_retrieval

ZERO_SHOT_ROWS = 1024  # query rows scored at once for the zero-shot ranks


def best_positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
  """Per query row: how many candidates score strictly above its best-scoring positive
  (0 = retrieved first). scores (Q, N) float, positive (Q, N) bool with a positive in every
  row."""
  best = np.max(np.where(positive, scores, -np.inf), axis=1, keepdims=True)
  return np.sum(scores > best, axis=1)


def recall_percentages(ranks: np.ndarray, ks) -> dict[int, float]:
  """{k: percentage of ranks < k} (LAVIS's R@K)."""
  return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


@common.register("tta_retrieval")
class TtaRetrievalEvaluator(common.Evaluator):
  """'{direction}_R@k', 'zeroshot_{direction}_R@k', 'examples', 'captions' (module docstring)."""
  NEEDS = ("tta_clips",)

  def __init__(self, ctx: common.EvalContext, *, split: str, direction: str, top_k: int,
               steps: int = rlcf_retrieval.STEPS, lr: float = rlcf_retrieval.LR,
               weight_decay: float = rlcf_retrieval.WEIGHT_DECAY, ks=(1, 5, 10),
               batched: bool = True):
    super().__init__(ctx, split=split)
    if direction not in rlcf_retrieval.DIRECTIONS:
      raise ValueError(f"direction={direction!r}: expected one of {rlcf_retrieval.DIRECTIONS}.")
    for key, value in (("top_k", top_k), ("steps", steps)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}: expected an integer >= 1.")
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{key}={value!r}: expected a number >= 0.")
    if not isinstance(batched, bool):
      raise ValueError(f"batched={batched!r}: expected True or False.")
    self.direction, self.top_k, self.steps = direction, top_k, steps
    self.lr, self.weight_decay, self.batched = float(lr), float(weight_decay), batched
    self.ks = retrieval.check_ks(ks)

  def metric_names(self) -> tuple[str, ...]:
    return (*(f"{prefix}{self.direction}_R@{k}" for prefix in ("", "zeroshot_") for k in self.ks),
            "examples", "captions")

  def _embed_step(self, policy_model, reward_models):
    """The jitted pass-1 step: (variables, batch) -> the features this direction needs."""
    def step(policy_vars, reward_vars, batch):
      tokens = batch["caption_tokens"]  # (B, C, L)
      flat_tokens = tokens.reshape(-1, tokens.shape[-1])

      def per_caption(x):
        return x.reshape(*tokens.shape[:2], -1)

      images = rlcf.encode_images(policy_model, policy_vars, batch["image"])
      texts = per_caption(rlcf.encode_texts(policy_model, policy_vars, flat_tokens))
      if self.direction == "i2t":  # reward features of the candidate captions
        rewards = tuple(per_caption(rlcf.encode_texts(m, v, flat_tokens))
                        for m, v in zip(reward_models, reward_vars))
      else:  # of the candidate images
        rewards = tuple(rlcf.encode_images(m, v, batch["image"])
                        for m, v in zip(reward_models, reward_vars))
      return images, texts, tokens, jnp.any(tokens != 0, axis=-1), *rewards, batch["_mask"]
    return self.jit(step, key=("embed", policy_model, reward_models, self.direction))

  def run(self, variables) -> dict[str, float]:
    clips = self.ctx.predict_fns["tta_clips"](variables)
    policy_model, policy_vars = clips.policy
    reward_models = tuple(m for m, _, _ in clips.rewards)
    reward_vars = tuple(v for _, v, _ in clips.rewards)
    step = self._embed_step(policy_model, reward_models)
    batch_sizes = []
    images, texts, tokens, valid, *rewards = common.gather(
        self, step, _recording_sizes(self.ctx.batches(self.split), batch_sizes), policy_vars,
        reward_vars, keys=("image", "caption_tokens"))
    empty = np.flatnonzero(~valid.any(axis=1))
    if len(empty):
      raise ValueError(f"The {self.TYPE!r} evaluator {self.name!r}: {len(empty)} image(s) of "
                       f"split {self.split!r} have no caption (all caption_tokens rows zero), "
                       f"e.g. example {int(empty[0])}.")
    caption_image, slot = np.nonzero(valid)  # captions numbered image by image (LAVIS txt_id)
    texts = texts[caption_image, slot]
    if self.direction == "i2t":
      candidates, queries, query_image = texts, images, np.arange(len(images))
      reward_candidates = tuple(r[caption_image, slot] for r in rewards)
      candidate_image = caption_image
    else:
      candidates, queries, query_image = images, texts, caption_image
      reward_candidates, candidate_image = rewards, np.arange(len(images))

    def ranks_of(scores, targets):  # targets: the queries' image ids
      return best_positive_ranks(np.asarray(scores), np.equal.outer(targets, candidate_image))

    scale = float(np.exp(jax.device_get(policy_vars["params"]["logit_scale"])))
    zero_shot = np.concatenate([
        ranks_of(scale * queries[i:i + ZERO_SHOT_ROWS] @ candidates.T,
                 query_image[i:i + ZERO_SHOT_ROWS])
        for i in range(0, len(queries), ZERO_SHOT_ROWS)])
    episode, tunable0, frozen = rlcf_retrieval.make_episode(
        clips.policy, clips.rewards, jnp.asarray(candidates),
        tuple(jnp.asarray(r) for r in reward_candidates), direction=self.direction,
        top_k=self.top_k, steps=self.steps, lr=self.lr, weight_decay=self.weight_decay)

    def adapt(batch_queries):  # (scores of every row, padding included)
      scores, _ = rlcf_retrieval.adapt(episode, tunable0, frozen, batch_queries,
                                       jax.random.PRNGKey(0), direction=self.direction,
                                       batched=self.batched)
      return np.asarray(jax.device_get(scores))

    adapted = []
    if self.direction == "i2t":
      for batch in self.ctx.batches(self.split):
        keep = np.asarray(jax.device_get(batch["_mask"])).astype(bool)
        scores = adapt(jax.device_get(batch["image"]))[keep]
        first = sum(len(ranks) for ranks in adapted)  # the batch's first image id
        adapted.append(ranks_of(scores, first + np.arange(len(scores))))
    else:
      caption_tokens, chunk = tokens[valid], batch_sizes[0]  # (N, L), in caption order
      for start in range(0, len(caption_tokens), chunk):
        part = caption_tokens[start:start + chunk]
        padded = np.zeros((chunk, part.shape[1]), part.dtype)
        padded[:len(part)] = part
        adapted.append(ranks_of(adapt(padded)[:len(part)], caption_image[start:start + chunk]))
    metrics = {f"{self.direction}_R@{k}": v
               for k, v in recall_percentages(np.concatenate(adapted), self.ks).items()}
    metrics.update({f"zeroshot_{self.direction}_R@{k}": v
                    for k, v in recall_percentages(zero_shot, self.ks).items()})
    return {**metrics, "examples": int(len(images)), "captions": int(len(texts))}


def _recording_sizes(batches, sizes: list):
  """`batches`, appending each batch's size (padding included) to `sizes`."""
  for batch in batches:
    sizes.append(int(batch["_mask"].shape[0]))
    yield batch
