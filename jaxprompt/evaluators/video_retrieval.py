"""Text <-> video retrieval (R@K, MdR, MnR) on the full similarity matrix, sharded by row blocks.

Follows the evaluation of ArrowLuo/CLIP4Clip (`main_task_retrieval.py` `eval_epoch`, `metrics.py`
`compute_metrics`, `tensor_text_to_video_metrics`, `tensor_video_to_text_sim`), which knightyxp/DGL
(`main.py` `eval_epoch`, `utils/metrics.py`) keeps unchanged:

  * every text and video of the split is embedded ('embed_text', 'embed_video': L2-normalised) and
    the similarity is S = logit_scale · t · v (texts x videos), as CLIP4Clip's
    `get_similarity_logits` returns it (the scale matters to DSL and QB-Norm only);
  * single caption per video (MSR-VTT 1k-A, LSMDC, ActivityNet paragraphs): pair i is caption i
    and video i. T2V ranks the diagonal entry in each row of S, V2T in each row of S^T;
  * multiple captions per video (VATEX; chosen by 'caption_tokens' of shape (C, L) per example,
    all-zero rows padding): every real caption is a T2V query of its own video
    (`tensor_text_to_video_metrics`), and a video query scores each gallery video by its best
    caption, max_c S[c, v] (`tensor_video_to_text_sim`), ranking its own video among them.

R@K is the percentage (0-100, unlike the 'retrieval' evaluator's fractions) of ranks < K,
MdR = median(rank) + 1, MnR = mean(rank) + 1, as CLIP4Clip prints them and the DGL paper reports
them; 'examples' counts the videos, 'captions' the text queries.

Ties (exactly equal similarities, e.g. duplicate captions in MSR-VTT's 1k-A test) are counted as
`compute_metrics` counts them: it looks the query's own score up in its sorted row and keeps every
position holding that value, so a query whose own item ties with t others contributes t + 1 ranks
(#better, #better + 1, ..., #better + t) and the ranks outnumber the queries. We reproduce that,
so numbers compare with published ones (DGL's released MSR-VTT ViT-B/16 similarity matrix gives
1012 V2T ranks for 1000 videos and V2T R@1 46.3, where one rank per video, #better, would give
46.9). Two exceptions follow the multi-sentence code: T2V there ranks by a double argsort, whose
order among ties is unspecified, so we count only the strictly better videos (one rank per
caption); and its MdR is `torch.median`, the lower of the two middle ranks when their count is
even.

Post-processing, each reported beside the plain numbers with a prefix, never replacing them:

  * `dsl=True` ('dsl/...'): CAMoE's dual softmax (Cheng et al. 2021, arXiv 2109.04290) as DGL's
    commented-out `_run_on_single_gpu` applies it to the flat caption x video matrix:
    S' = S ⊙ softmax over the captions (axis 0) of S; the temperature is the logit scale already
    in S. Both directions rank S'. (DGL also multiplies by the number of captions, a constant
    that changes no rank; we leave it out.)
  * `qb_norm=dict(beta=..., ...)` ('qb_norm/...'): querybank normalisation with the dynamic
    inverted softmax (Bogolin et al., CVPR 2022), as knightyxp/DGL
    `search_for_best_r1_with_qb_norm.py` computes it. A querybank of training queries (the
    captions of `query_split` for T2V, its videos for V2T) is scored against the test gallery;
    gallery items that are among the top `k` of at least theta bank queries (`t2v_theta`,
    `v2t_theta`) form the "retrieved" set. A test query whose best gallery item is in that set has
    its row replaced by exp(beta · S[q, g]) / sum_b exp(beta · B[b, g]) (B: bank x gallery); other
    rows keep S. Defaults are DGL's (k 1, theta 3 for T2V and 5 for V2T); beta has none: DGL's
    script picks it from a grid (0.50..1.00) by the test split's T2V R@1, which is tuning on the
    test set, so numbers chosen that way are not clean test results.

  config.evals.val = dict(type='video_retrieval', split='test')
  config.evals.val = dict(type='video_retrieval', split='test', dsl=True,
                          qb_norm=dict(query_split='train', max_queries=5000, beta=0.87))

Deliberate deviations:
  * The matrix is never materialised: the query rows go in blocks, sharded over the mesh's 'data'
    axis (`jax.shard_map`), the gallery replicated; each device holds one (rows, gallery) block and
    returns only per-query counts. DSL's column softmax and QB-Norm's per-gallery normaliser are
    per-item log-sum-exps computed the same way first.
  * QB-Norm runs in the log domain (beta · S - log sum_b exp(beta · B)): the same order within a
    row as DGL's exp(beta · S) / sum, without its float32 overflow for beta · S > 88.
  * V2T QB-Norm with several captions per video (not in DGL, whose script is MSR-VTT's single
    caption): the gallery is every test caption, normalised per caption, then the max per video.
  * The querybank's videos are de-duplicated (identical embeddings): a split that pairs each video
    with each of its captions (MSR-VTT 9k) would otherwise count one video's votes many times.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprompt import sharding
from jaxprompt.evaluators import common, retrieval

# Per-device score block: at most this many (query, gallery) similarities at once.
BLOCK_ELEMENTS = 1 << 22
QB_NORM_DEFAULTS = {"query_split": "train", "max_queries": None, "k": 1, "t2v_theta": 3,
                    "v2t_theta": 5}
QB_NORM_REQUIRED = ("beta",)


class Postprocess(NamedTuple):
  """A per-row rewrite of the scaled similarities before ranking. `transform(scores (rows, G),
  rows, columns, scalars)`: a module-level function (hashable: it is a jit static argument);
  `rows`: {name: (Q,)} per-query inputs; `columns`: {name: (G,)} per-gallery-item inputs;
  `scalars`: {name: float}."""
  transform: Callable
  rows: Mapping[str, np.ndarray] = {}
  columns: Mapping[str, np.ndarray] = {}
  scalars: Mapping[str, float] = {}


def _unchanged(scores, rows, columns, scalars):
  return scores


def _dual_softmax(scores, rows, columns, scalars):
  """S ⊙ softmax over captions; 'video_lse' (log sum over captions of exp S per video) is per row
  when the queries are videos, per column when they are captions."""
  if "video_lse" in rows:
    video_lse = rows["video_lse"][:, None]
  else:
    video_lse = columns["video_lse"][None, :]
  return scores * jnp.exp(scores - video_lse)


def _querybank_normalised(scores, rows, columns, scalars):
  """Rows whose best gallery item is 'retrieved' become beta · S - log_norm (gallery-wise)."""
  normalise = columns["retrieved"][jnp.argmax(scores, axis=1)]
  return jnp.where(normalise[:, None], scalars["beta"] * scores - columns["log_norm"][None, :],
                   scores)


PLAIN = Postprocess(_unchanged)


def _scaled_scores(queries, gallery, scale):
  return scale * jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)


def _shard_rows(per_device, mesh, queries, rows, gallery, columns, scalars):
  """`per_device` on each device's rows of `queries`/`rows` (split over 'data') against the whole
  replicated `gallery`/`columns`; the per-row outputs, replicated."""
  out = jax.shard_map(per_device, mesh=mesh,
                      in_specs=(P(sharding.DATA, None), P(sharding.DATA), P(), P(), P()),
                      out_specs=P(sharding.DATA))(queries, rows, gallery, columns, scalars)
  return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


@functools.partial(jax.jit, static_argnames=("transform", "num_groups", "mesh"))
def _rank_block(queries, rows, gallery, columns, scalars, *, transform, num_groups, mesh):
  """(#gallery entries scoring above the query's target, #others equal to it) per query row.
  With `num_groups`, gallery items are first max-pooled by their sorted 'group' id."""
  def per_device(q, r, g, c, s):
    scores = transform(_scaled_scores(q, g, s["scale"]), r, c, s)
    if num_groups:
      scores = jax.ops.segment_max(scores.T, c["group"], num_segments=num_groups,
                                   indices_are_sorted=True).T
    own = jnp.take_along_axis(scores, r["target"][:, None], axis=1)
    return jnp.sum(scores > own, axis=1), jnp.sum(scores == own, axis=1) - 1
  return _shard_rows(per_device, mesh, queries, rows, gallery, columns, scalars)


@functools.partial(jax.jit, static_argnames=("mesh",))
def _logsumexp_block(queries, rows, gallery, columns, scalars, *, mesh):
  """log sum_g exp(scale · q · g) per query row."""
  def per_device(q, r, g, c, s):
    return jax.nn.logsumexp(_scaled_scores(q, g, s["scale"]), axis=1)
  return _shard_rows(per_device, mesh, queries, rows, gallery, columns, scalars)


def _over_row_blocks(kernel: Callable, queries: np.ndarray, gallery: np.ndarray, mesh, *,
                     rows: Mapping | None = None, columns: Mapping | None = None,
                     scalars: Mapping | None = None):
  """`kernel(queries, rows, gallery, columns, scalars)` over blocks of query rows, each block
  sharded over the mesh's 'data' axis (at most BLOCK_ELEMENTS scores per device); the per-row
  outputs concatenated on the host (a tuple of arrays if the kernel returns a tuple)."""
  data = mesh.shape[sharding.DATA]
  n = len(queries)
  rows_per_device = max(1, min(-(-n // data), BLOCK_ELEMENTS // max(1, len(gallery))))
  block = rows_per_device * data
  row_sharding = NamedSharding(mesh, P(sharding.DATA))
  put = functools.partial(jax.device_put, device=NamedSharding(mesh, P()))
  gallery, columns = put(np.asarray(gallery, np.float32)), put(dict(columns or {}))
  scalars = put({k: np.float32(v) for k, v in (scalars or {}).items()})
  queries, rows = np.asarray(queries, np.float32), dict(rows or {})
  parts = []
  for start in range(0, n, block):
    count = min(block, n - start)

    def padded(array):
      out = np.zeros((block, *array.shape[1:]), array.dtype)
      out[:count] = array[start:start + count]
      return jax.device_put(out, row_sharding)

    out = kernel(padded(queries), {k: padded(np.asarray(v)) for k, v in rows.items()}, gallery,
                 columns, scalars)
    parts.append(jax.tree.map(lambda x: np.asarray(jax.device_get(x))[:count], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def similarity_ranks(queries: np.ndarray, gallery: np.ndarray, target: np.ndarray, *, scale: float,
                     mesh, gallery_group: np.ndarray | None = None,
                     post: Postprocess = PLAIN) -> tuple[np.ndarray, np.ndarray]:
  """(better, tied) per query, int (Q,): how many gallery entries of its row score strictly above
  the entry `target[q]`, and how many others score exactly the same. Scores are
  `post.transform(scale · queries @ gallery.T)`; with `gallery_group` (G,), sorted ids 0..M-1,
  an entry is the max over the gallery items of one group and `target` names a group."""
  rows = {**post.rows, "target": np.asarray(target, np.int32)}
  columns = dict(post.columns)
  num_groups = 0
  if gallery_group is not None:
    columns["group"] = np.asarray(gallery_group, np.int32)
    num_groups = int(columns["group"].max()) + 1
  kernel = functools.partial(_rank_block, transform=post.transform, num_groups=num_groups,
                             mesh=mesh)
  return _over_row_blocks(kernel, queries, gallery, mesh, rows=rows, columns=columns,
                          scalars={**post.scalars, "scale": scale})


def row_logsumexp(queries: np.ndarray, gallery: np.ndarray, *, scale: float, mesh) -> np.ndarray:
  """log sum_g exp(scale · q · g) for every query row q, float32 (Q,), sharded by row blocks."""
  kernel = functools.partial(_logsumexp_block, mesh=mesh)
  return _over_row_blocks(kernel, queries, gallery, mesh, scalars={"scale": scale})


def tie_expanded_ranks(better: np.ndarray, tied: np.ndarray) -> np.ndarray:
  """The ranks CLIP4Clip's `compute_metrics` counts: better[q] + 0..tied[q] for each query."""
  repeats = np.asarray(tied) + 1
  offsets = np.arange(repeats.sum()) - np.repeat(np.cumsum(repeats) - repeats, repeats)
  return np.repeat(better, repeats) + offsets


def rank_metrics(ranks: np.ndarray, ks, *, lower_median: bool = False) -> dict[str, float]:
  """{'R@k': % of ranks < k, 'MdR': median + 1, 'MnR': mean + 1} of 0-based `ranks`;
  `lower_median`: the lower middle value when their number is even (`torch.median`)."""
  ranks = np.asarray(ranks)
  metrics = {f"R@{k}": float(np.sum(ranks < k)) * 100 / len(ranks) for k in ks}
  median = np.sort(ranks)[(len(ranks) - 1) // 2] if lower_median else np.median(ranks)
  return {**metrics, "MdR": float(median) + 1, "MnR": float(np.mean(ranks)) + 1}


def retrieval_metrics(texts: np.ndarray, videos: np.ndarray, caption_video: np.ndarray, *,
                      scale: float, ks, multi_sentence: bool, mesh, t2v: Postprocess = PLAIN,
                      v2t: Postprocess = PLAIN) -> dict[str, float]:
  """'t2v_*' and 'v2t_*' metrics (`rank_metrics`) of captions `texts` (N, E) and `videos`
  (V, E); caption n describes video `caption_video[n]` (sorted). Single-caption (N = V, caption i
  of video i) or, with `multi_sentence`, VATEX's protocol (see the module docstring)."""
  better, tied = similarity_ranks(texts, videos, caption_video, scale=scale, mesh=mesh, post=t2v)
  if multi_sentence:
    t2v_metrics = rank_metrics(better, ks, lower_median=True)
  else:
    t2v_metrics = rank_metrics(tie_expanded_ranks(better, tied), ks)
  better, tied = similarity_ranks(videos, texts, np.arange(len(videos)), scale=scale, mesh=mesh,
                                  gallery_group=caption_video if multi_sentence else None,
                                  post=v2t)
  v2t_metrics = rank_metrics(tie_expanded_ranks(better, tied), ks)
  return {**{f"t2v_{k}": v for k, v in t2v_metrics.items()},
          **{f"v2t_{k}": v for k, v in v2t_metrics.items()}}


def dual_softmax(texts: np.ndarray, videos: np.ndarray, *, scale: float,
                 mesh) -> tuple[Postprocess, Postprocess]:
  """(T2V, V2T) post-processing for DSL over these captions and videos."""
  video_lse = row_logsumexp(videos, texts, scale=scale, mesh=mesh)  # over captions, per video
  return (Postprocess(_dual_softmax, columns={"video_lse": video_lse}),
          Postprocess(_dual_softmax, rows={"video_lse": video_lse}))


def querybank_normalisation(bank: np.ndarray, gallery: np.ndarray, *, scale: float, k: int,
                            beta: float, theta: float, mesh) -> Postprocess:
  """QB-Norm's dynamic inverted softmax for queries against `gallery` (G, E), from the querybank
  `bank` (B, E) of training queries of the same modality as the test queries."""
  _, top = retrieval.sharded_top_k(gallery, bank, k, mesh)  # (B, k) gallery ids
  votes = np.bincount(top.reshape(-1), minlength=len(gallery))
  log_norm = row_logsumexp(gallery, bank, scale=beta * scale, mesh=mesh)  # (G,)
  return Postprocess(_querybank_normalised, columns={"retrieved": votes >= theta,
                                                     "log_norm": log_norm},
                     scalars={"beta": beta})


def _is_count(value, minimum: float, integer: bool) -> bool:
  kinds = (int,) if integer else (int, float)
  return isinstance(value, kinds) and not isinstance(value, bool) and value >= minimum


def check_qb_norm(qb_norm, source) -> dict | None:
  """The `qb_norm` setting with defaults filled in, or None; ValueError naming a bad key."""
  if qb_norm is None:
    return None
  if hasattr(qb_norm, "to_dict"):
    qb_norm = qb_norm.to_dict()
  valid = sorted({*QB_NORM_DEFAULTS, *QB_NORM_REQUIRED})
  if not isinstance(qb_norm, Mapping):
    raise ValueError(f"qb_norm={qb_norm!r}: expected None or a dict with keys {valid}.")
  unknown = sorted(set(qb_norm) - set(valid))
  if unknown:
    raise ValueError(f"qb_norm: unknown key(s) {unknown}; valid: {valid}.")
  missing = [key for key in QB_NORM_REQUIRED if key not in qb_norm]
  if missing:
    raise ValueError(f"qb_norm needs {missing} (DGL picks beta from 0.50..1.00 by test R@1, "
                     "which is test-set tuning; e.g. beta=0.87).")
  settings = {**QB_NORM_DEFAULTS, **qb_norm}
  for key, minimum, integer in (("k", 1, True), ("t2v_theta", 1, False), ("v2t_theta", 1, False)):
    if not _is_count(settings[key], minimum, integer):
      raise ValueError(f"qb_norm.{key}={settings[key]!r}: expected "
                       f"{'an integer' if integer else 'a number'} >= {minimum}.")
  if not _is_count(settings["beta"], 0, False) or settings["beta"] == 0:
    raise ValueError(f"qb_norm.beta={settings['beta']!r}: expected a number > 0.")
  if settings["max_queries"] is not None and not _is_count(settings["max_queries"], 1, True):
    raise ValueError(f"qb_norm.max_queries={settings['max_queries']!r}: expected None (all) or "
                     "an integer >= 1.")
  try:
    source.check_split(settings["query_split"])
  except ValueError as e:
    raise ValueError(f"qb_norm.query_split: {e}") from None
  return settings


@common.register("video_retrieval")
class VideoRetrievalEvaluator(common.Evaluator):
  """'t2v_R@k', 't2v_MdR', 't2v_MnR', the same for 'v2t_', 'examples' (videos) and 'captions'
  (text queries) on `split`; with `dsl` / `qb_norm` also those metrics prefixed 'dsl/' /
  'qb_norm/' (see the module docstring)."""
  NEEDS = ("embed_video", "embed_text", "logit_scale")

  def __init__(self, ctx: common.EvalContext, *, split: str, ks=(1, 5, 10), dsl: bool = False,
               qb_norm=None):
    super().__init__(ctx, split=split)
    self.ks = retrieval.check_ks(ks)
    if not isinstance(dsl, bool):
      raise ValueError(f"dsl={dsl!r}: expected True or False.")
    self.dsl = dsl
    self.qb_norm = check_qb_norm(qb_norm, ctx.source)
    fns = ctx.predict_fns

    def embed_batch(variables, batch):  # caption_tokens (B, L) or (B, C, L), zero rows padding
      tokens = batch["caption_tokens"]
      texts = fns["embed_text"](variables, tokens.reshape(-1, tokens.shape[-1]))
      return (fns["embed_video"](variables, batch["video"]).astype(jnp.float32),
              texts.astype(jnp.float32).reshape(*tokens.shape[:-1], -1),
              jnp.any(tokens != 0, axis=-1), batch["_mask"])

    self._embed = self.jit(embed_batch, key="embed")
    self._count = self.jit(lambda mask: jnp.sum(mask.astype(jnp.int32)), key="count")

  def embed(self, variables, split: str, max_examples: int | None = None):
    """(videos (V, E), captions (N, E), caption_video (N,), multi_sentence) of the first
    `max_examples` (None: all) real examples of `split`."""
    batches = self.ctx.batches(split)
    if max_examples is not None:
      batches = self._first_examples(batches, max_examples)
    videos, texts, valid = common.gather(self, self._embed, batches, variables,
                                         keys=("video", "caption_tokens"))
    videos, texts, valid = videos[:max_examples], texts[:max_examples], valid[:max_examples]
    if texts.ndim == 2:
      return videos, texts, np.arange(len(videos)), False
    empty = np.flatnonzero(~valid.any(axis=1))
    if len(empty):
      raise ValueError(f"The {self.TYPE!r} evaluator {self.name!r}: {len(empty)} video(s) of "
                       f"split {split!r} have no caption (all caption_tokens rows zero), e.g. "
                       f"example {int(empty[0])}.")
    caption_video, caption = np.nonzero(valid)
    return videos, texts[caption_video, caption], caption_video, True

  def _first_examples(self, batches, limit: int):
    seen = 0
    for batch in batches:
      if seen >= limit:
        return
      yield batch
      seen += int(jax.device_get(self._count(batch["_mask"])))

  def metric_names(self) -> tuple[str, ...]:
    plain = tuple(f"{d}_{m}" for d in ("t2v", "v2t")
                  for m in (*(f"R@{k}" for k in self.ks), "MdR", "MnR"))
    prefixes = [""] + ["dsl/"] * self.dsl + ["qb_norm/"] * bool(self.qb_norm)
    return (*(p + m for p in prefixes for m in plain), "examples", "captions")

  def run(self, variables) -> dict[str, float]:
    videos, texts, caption_video, multi_sentence = self.embed(variables, self.split)
    scale = float(jax.device_get(self.predict("logit_scale")(variables)))
    mesh = self.ctx.mesh
    metrics = functools.partial(retrieval_metrics, texts, videos, caption_video, scale=scale,
                                ks=self.ks, multi_sentence=multi_sentence, mesh=mesh)
    out = metrics()
    if self.dsl:
      t2v, v2t = dual_softmax(texts, videos, scale=scale, mesh=mesh)
      out.update({f"dsl/{k}": v for k, v in metrics(t2v=t2v, v2t=v2t).items()})
    if self.qb_norm:
      qb = self.qb_norm
      bank_videos, bank_texts, _, _ = self.embed(variables, qb["query_split"], qb["max_queries"])
      bank_videos = np.unique(bank_videos, axis=0)
      shared = dict(scale=scale, k=qb["k"], beta=qb["beta"], mesh=mesh)
      t2v = querybank_normalisation(bank_texts, videos, theta=qb["t2v_theta"], **shared)
      v2t = querybank_normalisation(bank_videos, texts, theta=qb["v2t_theta"], **shared)
      out.update({f"qb_norm/{k}": v for k, v in metrics(t2v=t2v, v2t=v2t).items()})
    return {**out, "examples": int(len(videos)), "captions": int(len(texts))}
