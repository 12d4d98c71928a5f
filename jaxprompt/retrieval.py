"""Exact inner-product top-k over an embedding index sharded across the device mesh.

What RPL's retrieval (fcjian/RPL `tools/promptdet/retrieval_laion_image.py`) asks of faiss'
`IndexFlatIP`, in JAX: the index rows are split over the mesh's 'data' axis with a NamedSharding,
each device scores its own rows against the queries and keeps its top-k (`jax.shard_map`), and a
second top-k merges the per-device candidates. Exact, so the result is a numpy argsort's up to the
order of equal scores. Memory per device: one (query_batch, rows / devices) score block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprompt import sharding


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
