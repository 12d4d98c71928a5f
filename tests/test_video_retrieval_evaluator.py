"""The 'video_retrieval' evaluator (`jaxprompt/evaluators/video_retrieval.py`) against references
written here from ArrowLuo/CLIP4Clip `metrics.py` (`compute_metrics` by sorting,
`tensor_text_to_video_metrics` by a torch double argsort, `tensor_video_to_text_sim`),
knightyxp/DGL's commented-out dual softmax and its QB-Norm script (exp domain, float64):
hand-made similarity matrices with ties, the multi-sentence protocol, DSL, QB-Norm; the evaluator
end to end on fake embedders with padding rows, on 1 device and on 8 devices with small row
blocks."""
import functools
import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxprompt import sharding
from jaxprompt.evaluators import common, video_retrieval
from conftest import run_on_cpu_devices  # pylint: disable=import-error

KS = (1, 2, 5)


# ------------------------------------------------------------------------------------------------
# References.

def reference_compute_metrics(sim):
  """CLIP4Clip `compute_metrics`: rows are queries, the diagonal their own item; every position of
  the sorted row equal to the own score counts as a rank."""
  descending = -np.sort(-sim, axis=1)
  _, ranks = np.nonzero(descending == np.diag(sim)[:, None])
  return {**{f"R@{k}": 100.0 * np.mean(ranks < k) for k in KS},
          "MdR": float(np.median(ranks)) + 1, "MnR": float(np.mean(ranks)) + 1}


def reference_multi_sentence(t2v_flat, v2t_flat, caption_video):
  """CLIP4Clip's multi-sentence metrics. t2v_flat (N, V): caption rows; v2t_flat (V, N): video
  rows (S.T unless post-processed per direction)."""
  import torch  # pylint: disable=import-outside-toplevel  (not in the 8-device subprocess)
  num_videos = int(caption_video.max()) + 1
  counts = np.bincount(caption_video, minlength=num_videos)
  padded = np.full((num_videos, counts.max(), num_videos), -np.inf)  # (video, caption, video)
  for v in range(num_videos):
    padded[v, :counts[v]] = t2v_flat[caption_video == v]
  stacked = torch.tensor(padded).permute(1, 0, 2)  # (caption slot, video, video)
  order = torch.argsort(stacked, dim=-1, descending=True)
  ranks = torch.diagonal(torch.argsort(order, dim=-1), dim1=1, dim2=2).flatten()
  own = torch.diagonal(torch.tensor(padded), dim1=0, dim2=2).flatten()
  ranks = ranks[torch.isfinite(own)]
  t2v = {**{f"R@{k}": 100.0 * float(torch.sum(ranks < k)) / len(ranks) for k in KS},
         "MdR": float(torch.median(ranks + 1)), "MnR": float(torch.mean(ranks.double())) + 1}
  best_caption = np.stack([v2t_flat[:, caption_video == v].max(axis=1)
                           for v in range(num_videos)], axis=1)  # (query video, video)
  return t2v, reference_compute_metrics(best_caption)


def reference_dsl(sim):
  """DGL's commented-out CAMoE dual softmax: S · softmax over captions (axis 0) · #captions."""
  softmax = np.exp(sim - sim.max(axis=0)) / np.exp(sim - sim.max(axis=0)).sum(axis=0)
  return sim * softmax * len(sim)


def reference_qb_norm(bank_by_gallery, query_by_gallery, k, beta, theta):
  """DGL `qb_norm`: rows whose best gallery item is among the top-k of >= theta bank queries
  become exp(beta s) / sum over the bank of exp(beta b)."""
  top = np.argsort(-bank_by_gallery, axis=1, kind="stable")[:, :k]
  ids, votes = np.unique(top, return_counts=True)
  retrieved = ids[votes >= theta]
  rows = np.isin(np.argmax(query_by_gallery, axis=1), retrieved)
  out = query_by_gallery.copy()
  out[rows] = np.exp(beta * query_by_gallery[rows]) / np.exp(beta * bank_by_gallery).sum(axis=0)
  return out, rows


def prefixed(t2v, v2t, prefix=""):
  return {**{f"{prefix}t2v_{k}": v for k, v in t2v.items()},
          **{f"{prefix}v2t_{k}": v for k, v in v2t.items()}}


def assert_metrics_equal(got, expected):
  assert set(expected) <= set(got), sorted(set(expected) - set(got))
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, rel=1e-9), key


def metrics_of(sim, caption_video, multi_sentence, **kwargs):
  """The evaluator's metrics of a given caption x video matrix: captions = its rows, videos = the
  identity, so scale · t · v reproduces `sim` exactly."""
  sim = np.asarray(sim, np.float32)
  return video_retrieval.retrieval_metrics(
      sim, np.eye(sim.shape[1], dtype=np.float32), caption_video, scale=1.0, ks=KS,
      multi_sentence=multi_sentence, mesh=sharding.make_mesh(), **kwargs)


# ------------------------------------------------------------------------------------------------
# Metrics on hand-made matrices.

def test_single_caption_ranks_count_ties_as_clip4clip():
  rng = np.random.default_rng(0)
  sim = rng.integers(0, 4, size=(12, 12)).astype(np.float32)  # many ties in both directions
  got = metrics_of(sim, np.arange(12), False)
  assert_metrics_equal(got, prefixed(reference_compute_metrics(sim),
                                     reference_compute_metrics(sim.T)))
  # Ties add ranks: the count-per-query alternative would give another R@1 here.
  strict = np.sum(sim > np.diag(sim)[:, None], axis=1)
  assert got["t2v_R@1"] != pytest.approx(100 * np.mean(strict == 0))


def test_tie_expansion_and_medians():
  ranks = video_retrieval.tie_expanded_ranks(np.array([0, 3, 1]), np.array([1, 0, 2]))
  np.testing.assert_array_equal(ranks, [0, 1, 3, 1, 2, 3])
  assert video_retrieval.rank_metrics(np.array([0, 1, 3, 7]), (1,)) == {
      "R@1": 25.0, "MdR": 3.0, "MnR": 3.75}
  assert video_retrieval.rank_metrics(np.array([0, 1, 3, 7]), (1,), lower_median=True)["MdR"] == 2


def test_multi_sentence_matches_clip4clip_tensor_metrics():
  rng = np.random.default_rng(5)
  counts = np.array([3, 1, 2, 3, 2, 1])  # captions per video; 12 captions, an even number
  caption_video = np.repeat(np.arange(6), counts)
  # Caption rows: permutations of 0..5 (no ties within a row, whose order a double argsort leaves
  # open); the per-video maxima of the V2T direction do tie.
  sim = np.stack([rng.permutation(6) for _ in caption_video]).astype(np.float32)
  got = metrics_of(sim, caption_video, True)
  t2v, v2t = reference_multi_sentence(sim, sim.T, caption_video)
  assert_metrics_equal(got, prefixed(t2v, v2t))
  middle = np.sort(np.sum(sim > sim[np.arange(12), caption_video][:, None], axis=1))[5:7]
  assert middle[0] != middle[1]  # so the T2V MdR tells the lower median from the mean of two


@pytest.mark.parametrize("multi_sentence", [False, True])
def test_dual_softmax_matches_dgl_formula(multi_sentence):
  rng = np.random.default_rng(2)
  caption_video = np.repeat(np.arange(9), 2 if multi_sentence else 1)
  sim = (10 * rng.normal(size=(len(caption_video), 9))).astype(np.float32)
  t2v, v2t = video_retrieval.dual_softmax(sim, np.eye(9, dtype=np.float32), scale=1.0,
                                          mesh=sharding.make_mesh())
  got = metrics_of(sim, caption_video, multi_sentence, t2v=t2v, v2t=v2t)
  dsl = reference_dsl(sim.astype(np.float64))
  if multi_sentence:
    expected = prefixed(*reference_multi_sentence(dsl, dsl.T, caption_video))
  else:
    expected = prefixed(reference_compute_metrics(dsl), reference_compute_metrics(dsl.T))
  assert_metrics_equal(got, expected)
  plain = metrics_of(sim, caption_video, multi_sentence)
  assert any(got[k] != plain[k] for k in expected)  # the test can tell DSL from no DSL


@pytest.mark.parametrize("multi_sentence", [False, True])
def test_qb_norm_matches_dgl_script(multi_sentence):
  rng = np.random.default_rng(3)
  caption_video = np.repeat(np.arange(10), 2 if multi_sentence else 1)
  sim = (8 * rng.normal(size=(len(caption_video), 10))).astype(np.float32)
  videos = np.eye(10, dtype=np.float32)
  bank_texts = (8 * rng.normal(size=(30, 10))).astype(np.float32)  # bank_texts @ videos.T
  bank_videos = rng.normal(size=(25, 10)).astype(np.float32)
  mesh, k, beta = sharding.make_mesh(), 2, 0.7
  t2v = video_retrieval.querybank_normalisation(bank_texts, videos, scale=1.0, k=k, beta=beta,
                                                theta=6, mesh=mesh)
  v2t = video_retrieval.querybank_normalisation(bank_videos, sim, scale=1.0, k=k, beta=beta,
                                                theta=5, mesh=mesh)
  got = metrics_of(sim, caption_video, multi_sentence, t2v=t2v, v2t=v2t)

  sim64 = sim.astype(np.float64)
  t2v_flat, t2v_rows = reference_qb_norm(bank_texts.astype(np.float64), sim64, k, beta, 6)
  v2t_flat, v2t_rows = reference_qb_norm(bank_videos.astype(np.float64) @ sim64.T, sim64.T, k,
                                         beta, 5)
  assert 0 < t2v_rows.sum() < len(t2v_rows) and 0 < v2t_rows.sum() < len(v2t_rows)
  if multi_sentence:
    expected = prefixed(*reference_multi_sentence(t2v_flat, v2t_flat, caption_video))
  else:
    expected = prefixed(reference_compute_metrics(t2v_flat), reference_compute_metrics(v2t_flat))
  assert_metrics_equal(got, expected)
  plain = metrics_of(sim, caption_video, multi_sentence)
  assert any(got[key] != plain[key] for key in expected)


# ------------------------------------------------------------------------------------------------
# The evaluator end to end: videos (T=3, 2x2 RGB) -> mean frame @ W; a caption -> table[first id].

RNG = np.random.default_rng(4)
W_VIDEO = RNG.normal(size=(12, 6)).astype(np.float32)
TABLE = RNG.normal(size=(40, 6)).astype(np.float32)
VARIABLES = {"params": {"w": jnp.asarray(W_VIDEO), "table": jnp.asarray(TABLE),
                        "scale": jnp.asarray(np.log(7.0), jnp.float32)}}


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fake_embed_video(variables, video):
  features = video.reshape(*video.shape[:2], -1).mean(1) @ variables["params"]["w"]
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


def fake_embed_text(variables, ids):
  features = variables["params"]["table"][ids[:, 0]]
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


FNS = {"embed_video": fake_embed_video, "embed_text": fake_embed_text,
       "logit_scale": lambda variables: jnp.exp(variables["params"]["scale"])}


class FakeSource:
  name = "fake_videos"
  splits = ("train", "test")

  def check_split(self, split):
    if split not in self.splits:
      raise ValueError(f"Unknown split {split!r} for data source {self.name!r}; valid splits: "
                       f"{', '.join(self.splits)}.")


def make_ctx(splits, fns=None, batch_size=8):
  """An EvalContext whose splits are dicts of numpy arrays, in global batches of `batch_size`,
  each followed by at least 3 junk rows with '_mask' False."""
  mesh = sharding.make_mesh()
  junk_rng = np.random.default_rng(5)

  def batches(split):
    arrays = splits[split]
    n = len(arrays["video"])
    total = -(-(n + 3) // batch_size) * batch_size
    padded = {"video": np.concatenate([arrays["video"], 50 * junk_rng.normal(
                  size=(total - n, *arrays["video"].shape[1:])).astype(np.float32)]),
              "caption_tokens": np.concatenate([arrays["caption_tokens"], junk_rng.integers(
                  1, 40, size=(total - n, *arrays["caption_tokens"].shape[1:]), dtype=np.int32)]),
              "_mask": np.arange(total) < n}
    for start in range(0, total, batch_size):
      yield sharding.global_batch({k: v[start:start + batch_size] for k, v in padded.items()},
                                  mesh)

  return common.EvalContext(ml_collections.ConfigDict(), FakeSource(), mesh, batches,
                            FNS if fns is None else fns)


def caption_tokens(first_ids, length=4):
  """(..., L) int32: [first id, 7, 0, 0] per caption, all-zero rows where first_ids is 0."""
  tokens = np.zeros((*first_ids.shape, length), np.int32)
  tokens[..., 0] = first_ids
  tokens[..., 1] = np.where(first_ids > 0, 7, 0)
  return tokens


def fake_data(multi_sentence):
  rng = np.random.default_rng(6)
  test_videos = rng.normal(size=(13, 3, 2, 2, 3)).astype(np.float32)
  if multi_sentence:  # 1-3 captions per video, zero rows padding, distinct ids
    ids = rng.permutation(np.arange(1, 40)).reshape(13, 3)
    drop = rng.random(size=(13, 3)) < 0.3
    drop[:, 0] = False
    ids[drop] = 0
    test = {"video": test_videos, "caption_tokens": caption_tokens(ids)}
  else:
    test = {"video": test_videos, "caption_tokens": caption_tokens(
        rng.permutation(np.arange(1, 40))[:13])}
  train_videos = rng.normal(size=(11, 3, 2, 2, 3)).astype(np.float32)
  train_videos[4] = train_videos[1]  # a pair-expanded split repeats videos
  train = {"video": train_videos, "caption_tokens": caption_tokens(rng.integers(1, 40, size=11))}
  return {"test": test, "train": train}


QB_NORM = {"query_split": "train", "max_queries": 9, "k": 1, "beta": 0.9, "t2v_theta": 2,
           "v2t_theta": 2}


@functools.lru_cache(maxsize=None)
def end_to_end_metrics(multi_sentence):
  ctx = make_ctx(fake_data(multi_sentence))
  evaluator = common.build("val", {"type": "video_retrieval", "split": "test", "ks": KS,
                                   "dsl": True, "qb_norm": QB_NORM}, ctx)
  metrics = evaluator.run(VARIABLES)
  assert set(metrics) == set(evaluator.metric_names())
  return metrics


def numpy_end_to_end_metrics(multi_sentence):
  data = fake_data(multi_sentence)

  def embed(split):
    arrays = data[split]
    videos = normalize(arrays["video"].reshape(len(arrays["video"]), 3, -1).mean(1) @ W_VIDEO)
    ids = arrays["caption_tokens"][..., 0].reshape(len(videos), -1)
    caption_video, slot = np.nonzero(ids)
    return videos.astype(np.float64), normalize(TABLE[ids[caption_video, slot]]).astype(
        np.float64), caption_video

  videos, texts, caption_video = embed("test")
  sim = 7.0 * texts @ videos.T
  bank_videos, bank_texts, _ = embed("train")
  bank_videos = np.unique(bank_videos[:9], axis=0)
  assert len(bank_videos) == 8  # the repeated video counts once
  t2v_qb, _ = reference_qb_norm(7.0 * bank_texts[:9] @ videos.T, sim, 1, 0.9, 2)
  v2t_qb, _ = reference_qb_norm(7.0 * bank_videos @ texts.T, sim.T, 1, 0.9, 2)
  dsl = reference_dsl(sim)
  expected = {}
  for prefix, t2v_flat, v2t_flat in (("", sim, sim.T), ("dsl/", dsl, dsl.T),
                                     ("qb_norm/", t2v_qb, v2t_qb)):
    if multi_sentence:
      expected.update(prefixed(*reference_multi_sentence(t2v_flat, v2t_flat, caption_video),
                               prefix))
    else:
      expected.update(prefixed(reference_compute_metrics(t2v_flat),
                               reference_compute_metrics(v2t_flat), prefix))
  return {**expected, "examples": 13, "captions": len(texts)}


@pytest.mark.parametrize("multi_sentence", [False, True])
def test_evaluator_end_to_end_matches_numpy(multi_sentence):
  got = end_to_end_metrics(multi_sentence)
  expected = numpy_end_to_end_metrics(multi_sentence)
  assert set(got) == set(expected)
  assert_metrics_equal(got, expected)
  assert 0 < got["t2v_R@1"] < 100  # not trivially perfect
  if multi_sentence:
    assert got["captions"] > got["examples"]


EIGHT_DEVICES = """
import json, jax
import test_video_retrieval_evaluator as t
from jaxprompt.evaluators import video_retrieval
assert jax.device_count() == 8, jax.devices()
video_retrieval.BLOCK_ELEMENTS = 16  # several row blocks of 8 rows
print("RESULT" + json.dumps({"multi": t.end_to_end_metrics(True),
                             "single": t.end_to_end_metrics(False)}))
"""


def test_eight_devices_and_row_blocks_give_identical_numbers():
  eight = json.loads(run_on_cpu_devices(EIGHT_DEVICES, 8).split("RESULT")[-1])
  assert eight == {"multi": end_to_end_metrics(True), "single": end_to_end_metrics(False)}


# ------------------------------------------------------------------------------------------------
# Settings and data errors.

@pytest.mark.parametrize("settings, fns, message", [
    ({"ks": (0, 5)}, FNS, r"ks=\(0, 5\)"),
    ({"dsl": "yes"}, FNS, r"dsl='yes': expected True or False"),
    ({"qb_norm": {"beta": 0.9, "tehta": 3}}, FNS,
     r"qb_norm: unknown key\(s\) \['tehta'\]; valid: \['beta', 'k', 'max_queries', "
     r"'query_split', 't2v_theta', 'v2t_theta'\]"),
    ({"qb_norm": {"k": 1}}, FNS, r"qb_norm needs \['beta'\]"),
    ({"qb_norm": {"beta": 0.9, "k": 0}}, FNS, r"qb_norm.k=0: expected an integer >= 1"),
    ({"qb_norm": {"beta": -1}}, FNS, r"qb_norm.beta=-1: expected a number > 0"),
    ({"qb_norm": {"beta": 0.9, "max_queries": 2.5}}, FNS, r"qb_norm.max_queries=2.5"),
    ({"qb_norm": {"beta": 0.9, "query_split": "val"}}, FNS,
     r"qb_norm.query_split: Unknown split 'val' for data source 'fake_videos'"),
    ({"qb_norm": 0.9}, FNS, r"qb_norm=0.9: expected None or a dict"),
    ({}, {k: v for k, v in FNS.items() if k != "logit_scale"},
     r"needs the method's predict function\(s\) \['logit_scale'\]"),
])
def test_bad_settings_fail_at_construction(settings, fns, message):
  ctx = make_ctx(fake_data(False), fns)
  with pytest.raises(ValueError, match=message):
    common.from_config({"val": {"type": "video_retrieval", "split": "test", **settings}}, ctx)


def test_video_without_captions_is_an_error():
  data = fake_data(True)
  data["test"]["caption_tokens"][5] = 0
  evaluator = common.build("val", {"type": "video_retrieval", "split": "test"}, make_ctx(data))
  with pytest.raises(ValueError, match=r"'val': 1 video\(s\) of split 'test' have no caption"):
    evaluator.run(VARIABLES)


def test_plain_metric_names():
  evaluator = common.build("val", {"type": "video_retrieval", "split": "test", "ks": 1},
                           make_ctx(fake_data(False)))
  assert evaluator.metric_names() == ("t2v_R@1", "t2v_MdR", "t2v_MnR", "v2t_R@1", "v2t_MdR",
                                      "v2t_MnR", "examples", "captions")
  assert set(evaluator.run(VARIABLES)) == set(evaluator.metric_names())
