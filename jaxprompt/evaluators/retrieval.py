"""Image <-> text retrieval (recall@K), on an exact inner-product top-k sharded over the mesh.

`sharded_top_k` is what RPL's retrieval (fcjian/RPL `tools/promptdet/retrieval_laion_image.py`)
asks of faiss' `IndexFlatIP`, in JAX: the index rows are split over the mesh's 'data' axis with a
NamedSharding, each device scores its own rows against the queries and keeps its top-k
(`jax.shard_map`), and a second top-k merges the per-device candidates. Exact, so the result is a
numpy argsort's up to the order of equal scores. Memory per device: one (query_batch,
rows / devices) score block.

The 'retrieval' evaluator follows the protocol of google-research/big_vision
`evaluators/proj/image_text/retrieval.py` and CLIP's (Radford et al. 2021, §3.1.5) with one
caption per image: the split's batches carry 'image' and 'caption_tokens' (pair i = image i and
caption i); all images and captions are embedded ('embed_image', 'embed_text'), and an image
(caption) counts towards img2txt (txt2img) R@K when its own caption (image) is among its K
nearest by cosine similarity.

  config.evals.coco = dict(type='retrieval', split='val', ks=(1, 5, 10))
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprompt import sharding
from jaxprompt.evaluators import common


def sharded_top_k(index: np.ndarray, queries: np.ndarray, k: int, mesh=None, *,
                  query_batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k: (scores, row ids), each (Q, min(k, N)), best first.

  The N index rows are split over the mesh's 'data' axis (NamedSharding, padded to a multiple of
  its size); each device scores its rows against the queries and keeps its own top-k, and the
  per-device candidates are merged by a second top-k. Queries go `query_batch` at a time.
  """
  mesh = mesh or sharding.make_mesh()
  n, data = len(index), mesh.shape[sharding.DATA]
  if n == 0:
    raise ValueError("The retrieval index is empty.")
  k = min(k, n)
  rows = -(-n // data)  # per device
  local_k = min(k, rows)
  padded = np.zeros((rows * data, index.shape[1]), np.float32)
  padded[:n] = index
  index_rows = jax.device_put(padded, NamedSharding(mesh, P(sharding.DATA, None)))

  def per_device(shard, query):  # shard (rows, E), query (q, E)
    ids = jax.lax.axis_index(sharding.DATA) * rows + jnp.arange(rows)
    scores = jnp.where(ids < n, query @ shard.T, -jnp.inf)  # (q, rows)
    top_scores, top = jax.lax.top_k(scores, local_k)
    return top_scores, ids[top]

  @jax.jit
  def search(index_rows, query):
    candidates, candidate_ids = jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(sharding.DATA, None), P()),
        out_specs=(P(None, sharding.DATA), P(None, sharding.DATA)))(index_rows, query)
    scores, best = jax.lax.top_k(candidates, k)  # (q, data * local_k) -> (q, k)
    return scores, jnp.take_along_axis(candidate_ids, best, axis=1)

  queries = np.asarray(queries, np.float32)
  scores, ids = [], []
  for start in range(0, len(queries), query_batch):
    part = queries[start:start + query_batch]
    batch = np.zeros((min(query_batch, len(queries)), queries.shape[1]), np.float32)
    batch[:len(part)] = part
    s, i = jax.device_get(search(index_rows, jnp.asarray(batch)))
    scores.append(s[:len(part)])
    ids.append(i[:len(part)])
  return np.concatenate(scores), np.concatenate(ids)


def recall_at_k(top_ids: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
  """{k: fraction of queries i whose own item i is in `top_ids[i, :k]`}; `top_ids` (Q, K)."""
  hit = top_ids == np.arange(len(top_ids))[:, None]
  return {k: float(hit[:, :k].any(axis=1).mean()) for k in ks}


def check_ks(ks) -> tuple[int, ...]:
  if isinstance(ks, int) and not isinstance(ks, bool):
    ks = (ks,)
  if not isinstance(ks, Sequence) or not ks or not all(
      isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
    raise ValueError(f"ks={ks!r}: expected a non-empty tuple of integers >= 1, e.g. (1, 5, 10).")
  return tuple(sorted(set(ks)))


@common.register("retrieval")
class RetrievalEvaluator(common.Evaluator):
  """'img2txt_R@k', 'txt2img_R@k' for k in `ks`, and 'examples' (pairs) on `split`."""
  NEEDS = ("embed_image", "embed_text")

  def __init__(self, ctx: common.EvalContext, *, split: str, ks=(1, 5, 10)):
    super().__init__(ctx, split=split)
    self.ks = check_ks(ks)
    fns = ctx.predict_fns
    self._step = self.jit(lambda variables, batch: (
        fns["embed_image"](variables, batch["image"]).astype(jnp.float32),
        fns["embed_text"](variables, batch["caption_tokens"]).astype(jnp.float32),
        batch["_mask"]), key="step")

  def embed(self, variables) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, E), captions (N, E)) of every real pair of the split."""
    return common.gather(self, self._step, self.ctx.batches(self.split), variables,
                         keys=("image", "caption_tokens"))

  def metric_names(self) -> tuple[str, ...]:
    return (*(f"{d}_R@{k}" for d in ("img2txt", "txt2img") for k in self.ks), "examples")

  def run(self, variables) -> dict[str, float]:
    images, texts = self.embed(variables)
    k = max(self.ks)
    metrics = {}
    for direction, queries, index in (("img2txt", images, texts), ("txt2img", texts, images)):
      _, top_ids = sharded_top_k(index, queries, k, self.ctx.mesh)
      metrics.update({f"{direction}_R@{k}": v for k, v in recall_at_k(top_ids, self.ks).items()})
    return {**metrics, "examples": int(len(images))}
