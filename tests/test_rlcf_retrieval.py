"""RLCF retrieval (jaxprompt/prompts/rlcf_retrieval.py, evaluators/tta_retrieval.py) and its data
(input_pipeline/karpathy.py, embedded_captions.py).

The episode check: a PyTorch reference written here after mzhaoshuai/RLCF
`retrieval/clip_ret_policy.py` (`tune_image`, `tune_text`) and `custom_models.py` (`CLIPRet_TTA`)
runs one query on a random transformers `CLIPModel` at the 'ViT-mu/8' sizes converted to our CLIP
(`clip.convert_state_dict`): the policy's logits against all candidates, top-K, CLIP-S rewards of
a different tiny reward CLIP (40 px, embed 24: the query image is resized), the REINFORCE loss,
autograd and torch.optim.AdamW(eps=1e-6) over the visual tower (i2t) or every non-visual
parameter (t2i). The reward CLIP's frozen, gradient-free features come from our JAX CLIP (its
towers are checked against transformers in tests/test_clip.py). The project's byte-level
vocabulary makes every character one token. Marked slow: the i2t evaluator run (its t2i twin
covers the same bookkeeping) and the embedded demo end to end through the trainer.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util

import input_pipeline
from configs import common as common_configs
from input_pipeline import embedded_captions, embedded_clip, karpathy, pipeline, preprocess
from jaxprompt import sharding, tta
from jaxprompt.evaluators import common, tta_retrieval
from jaxprompt.models import clip, common as model_common
from jaxprompt.prompts import coop, rlcf, rlcf_retrieval
from conftest import tiny_hf_clip  # pylint: disable=import-error

CAPTIONS = ("a red square", "the blue circle", "a dog on grass", "two cats", "a green tree",
            "a yellow car", "the sea at night", "a small bird", "an old house", "a tall man")
TOP_K, STEPS, LR = 3, 2, 1e-3
VOCAB_SIZE = 520  # the byte-level vocabulary's ids are < 514
REWARD_FIELDS = dict(embed_dim=24, image_size=40, vision_layers=1, vision_width=32,
                     vision_heads=2, vision_patch_size=8, text_width=32, text_heads=2,
                     text_layers=1)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def shared(vocab):
  """A random transformers CLIP at ViT-mu/8 sizes and our CLIP with its weights; a different
  random tiny reward CLIP (both towers' final LayerNorm biases set to ones and one projection
  shared, so that its random image and text features correlate: CLIP-S positive and varied);
  query images and the candidate captions' token ids."""
  hf = tiny_hf_clip(vocab_size=VOCAB_SIZE, logit_scale=30.0)
  model = clip.Model(**dict(clip.decode_variant("ViT-mu/8"), vocab_size=VOCAB_SIZE))
  variables = model_common.merge_params(convert(hf), clip.init_variables_like(model))
  reward = clip.Model(**dict(clip.decode_variant("ViT-mu/8"), vocab_size=VOCAB_SIZE,
                             **REWARD_FIELDS))
  r_vars = jax.jit(reward.init)(jax.random.PRNGKey(1), jnp.zeros((1, 40, 40, 3)),
                                jnp.ones((1, 4), jnp.int32))
  p, shift = r_vars["params"], jnp.ones((32,))
  r_vars = {"params": dict(p, ln_final=dict(p["ln_final"], bias=shift), visual=dict(
      p["visual"], proj=p["text_projection"], ln_post=dict(p["visual"]["ln_post"], bias=shift)))}
  images = np.random.default_rng(2).normal(size=(6, 32, 32, 3)).astype(np.float32)
  tokens = np.asarray(coop.get_tokenizer(vocab)(list(CAPTIONS)), np.int32)
  return dict(hf=hf, model=model, variables=variables, reward=reward, r_vars=r_vars,
              images=images, tokens=tokens)


def convert(hf):
  return clip.convert_state_dict({k: v.detach().numpy().copy()  # torch trains in place
                                  for k, v in hf.state_dict().items()},
                                 vision_heads=2, text_heads=2)


def candidates(shared, direction):
  """(policy candidate features, reward candidate features) of the direction's candidates."""
  encode, inputs = ((rlcf.encode_texts, shared["tokens"]) if direction == "i2t" else
                    (rlcf.encode_images, shared["images"]))
  encode = jax.jit(encode, static_argnums=0)
  return (encode(shared["model"], shared["variables"], inputs),
          (encode(shared["reward"], shared["r_vars"], inputs),))


def make(shared, direction, **kw):
  policy_features, reward_features = candidates(shared, direction)
  return rlcf_retrieval.make_episode(
      (shared["model"], shared["variables"]), [(shared["reward"], shared["r_vars"], 1.0)],
      policy_features, reward_features, direction=direction,
      **dict(dict(top_k=TOP_K, steps=STEPS, lr=LR), **kw))


@pytest.fixture(scope="module")
def episodes(shared):
  return {direction: make(shared, direction) for direction in rlcf_retrieval.DIRECTIONS}


def queries(shared, direction):
  return shared["images"][:3] if direction == "i2t" else shared["tokens"][:3]


@pytest.fixture(scope="module")
def batched(shared, episodes):
  """Each direction's 3 queries adapted with the vmapped episode."""
  return {d: rlcf_retrieval.adapt(*episodes[d], queries(shared, d), jax.random.PRNGKey(0),
                                  direction=d) for d in rlcf_retrieval.DIRECTIONS}


# ------------------------------------------------------------------------------------------------
# The PyTorch reference (the original's tune_image / tune_text, written here).


def torch_text_features(hf, token_ids):
  """CLIP's text tower from token ids, pooled at the EOT (argmax) position, normalised."""
  ids = torch.as_tensor(token_ids, dtype=torch.long)
  text = hf.text_model
  x = text.embeddings(inputs_embeds=text.embeddings.token_embedding(ids))
  length = x.shape[1]
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  x = text.encoder(inputs_embeds=x, attention_mask=causal).last_hidden_state
  x = hf.text_projection(text.final_layer_norm(x)[torch.arange(len(ids)), ids.argmax(-1)])
  return x / x.norm(dim=-1, keepdim=True)


def torch_image_features(hf, images_nhwc):
  x = hf.get_image_features(pixel_values=torch.as_tensor(images_nhwc).permute(0, 3, 1, 2))
  x = getattr(x, "pooler_output", x)
  return x / x.norm(dim=-1, keepdim=True)


def torch_episode(shared, direction, query, reward_candidates, reward_query):
  """One query: (the loss of each step, the first step's gradients, the params before each step,
  the adapted params (all converted to our layout), the adapted scores (N,))."""
  hf = transformers.CLIPModel(shared["hf"].config).eval()  # a copy to train
  hf.load_state_dict(shared["hf"].state_dict())
  if direction == "i2t":
    trained = list(hf.vision_model.parameters()) + list(hf.visual_projection.parameters())
    with torch.no_grad():
      candidate_features = torch_text_features(hf, shared["tokens"])

    def logits():  # `CLIPRet_TTA.forward(image)`: logits_per_image (1, N)
      return hf.logit_scale.exp() * torch_image_features(hf, query[None]) @ candidate_features.t()
  else:
    trained = [p for n, p in hf.named_parameters() if not n.startswith(("vision_model",
                                                                        "visual_projection"))]
    with torch.no_grad():
      candidate_features = torch_image_features(hf, shared["images"])

    def logits():  # `CLIPRet_TTA.forward(images=None, text=text)`: logits_per_text (1, N)
      return hf.logit_scale.exp() * torch_text_features(hf, query[None]) @ candidate_features.t()

  optimizer = torch.optim.AdamW(trained, lr=LR, eps=1e-6, weight_decay=5e-4)
  reward_candidates = torch.tensor(np.array(reward_candidates))
  reward_query = torch.tensor(np.array(reward_query))
  losses, first_grads, params_before = [], None, []
  for _ in range(STEPS):
    params_before.append(convert(hf)["params"])
    optimizer.zero_grad()
    output = logits()
    index = torch.topk(output, TOP_K, dim=-1).indices.flatten()
    score = 2.5 * torch.sum(reward_candidates[index] * reward_query, dim=-1)
    score = torch.maximum(score, torch.zeros_like(score)).reshape(1, -1)
    rewards = (score - score.mean(-1, keepdim=True)).flatten()
    loss = torch.mean(rewards * F.cross_entropy(torch.repeat_interleave(output, TOP_K, dim=0),
                                                index, reduction="none"))
    loss.backward()
    if first_grads is None:  # in our layout: convert the gradients as a state dict
      grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
               for n, p in hf.named_parameters()}
      first_grads = clip.convert_state_dict({n: g.numpy().copy() for n, g in grads.items()},
                                            vision_heads=2, text_heads=2)["params"]
    optimizer.step()
    losses.append(loss.item())
  with torch.no_grad():
    scores = logits()[0].numpy()
  return losses, first_grads, params_before, convert(hf)["params"], scores


@pytest.mark.parametrize("direction", rlcf_retrieval.DIRECTIONS)
def test_one_query_episode_matches_pytorch(shared, episodes, batched, direction):
  """Query 0: the loss and the gradient of the first step (all tuned leaves together), the
  adapted params after 2 steps (their update) and the adapted scores against every candidate."""
  episode, tunable0, frozen = episodes[direction]
  query = queries(shared, direction)[0]
  # Jitted: the tiny towers' gradients run several times faster compiled than eagerly.
  context = jax.jit(episode.prepare)(tunable0, frozen,
                                     query[None] if direction == "i2t" else query, None)
  loss_and_grad = jax.jit(jax.value_and_grad(episode.loss))
  losses, expected_grads, params_before, expected_params, expected_scores = torch_episode(
      shared, direction, query, frozen["reward_candidates"][0], context["reward_query"][0])
  assert min(abs(x) for x in losses) > 1e-4  # non-trivial rewards

  def ours_of(tree, flatten=True):  # the tuned subtree of a converted torch tree
    tree = ({k: v for k, v in tree.items() if k != "visual"} if direction == "t2i" else
            tree["visual"])
    return flat(tree) if flatten else tree

  loss, grads = loss_and_grad(tunable0, frozen, context, None)
  assert float(loss) == pytest.approx(losses[0], rel=1e-4)
  # Every later step's loss, ours at the reference's params before that step.
  for before, expected_loss in zip(params_before[1:], losses[1:]):
    ours_loss, _ = loss_and_grad(ours_of(before, flatten=False), frozen, context, None)
    assert float(ours_loss) == pytest.approx(expected_loss, rel=1e-4)

  grads, expected_grads = flat(grads), ours_of(expected_grads)
  assert sorted(grads) == sorted(expected_grads)
  assert rel_err(np.concatenate([grads[n].ravel() for n in sorted(grads)]),
                 np.concatenate([expected_grads[n].ravel() for n in sorted(grads)])) < 1e-4
  scores, adapted = batched[direction]
  assert rel_err(scores[0], expected_scores) < 1e-4
  ours, init = flat(jax.tree.map(lambda x: x[0], adapted)), flat(tunable0)
  expected = ours_of(expected_params)
  # The attention keys' biases get no gradient (softmax ignores them); AdamW turns fp32 noise
  # into +-lr steps there.
  names = sorted(n for n in ours if not n.endswith("key/bias"))
  update = np.concatenate([(ours[n] - init[n]).ravel() for n in names])
  expected_update = np.concatenate([(expected[n] - init[n]).ravel() for n in names])
  assert np.abs(expected_update).max() > 0.5 * STEPS * LR  # AdamW moved them
  # AdamW's normalised step m / sqrt(v) amplifies fp32 differences where the second gradient
  # nearly cancels the first: every element agrees to 1e-2 of the largest update, and 99.5% of
  # them to 1e-3 (the gradients above agree to 1e-4).
  error = np.abs(update - expected_update) / np.abs(expected_update).max()
  assert error.max() <= 1e-2 and np.mean(error <= 1e-3) > 0.995, np.mean(error <= 1e-3)


def test_batched_equals_sequential(shared, episodes, batched):
  """On t2i (`tta.adapt_queries`: token-id queries); i2t runs `tta.adapt`, checked in
  tests/test_tta_tpt.py."""
  direction = "t2i"
  episode, tunable0, frozen = episodes[direction]
  sequential = rlcf_retrieval.adapt(episode, tunable0, frozen, queries(shared, direction),
                                    jax.random.PRNGKey(0), direction=direction, batched=False)
  # The two paths' matmuls block differently; AdamW's normalised step m / sqrt(v) turns those
  # fp32 differences into up to ~1e-2 of a step (~LR) where a gradient element nearly cancels (as
  # in the parity test above): every element within 2e-2 * LR, 99.9 % of them within 1e-2 * LR.
  for a, b in zip(jax.tree.leaves(batched[direction]), jax.tree.leaves(sequential)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-2 * LR)
    close = np.isclose(a, b, rtol=1e-5, atol=1e-2 * LR)
    assert close.mean() >= 0.999, close.mean()


def test_tuned_parameter_sets(shared, episodes, batched):
  params = shared["variables"]["params"]
  _, tunable0, frozen = episodes["i2t"]
  assert tunable0 is params["visual"]
  assert "visual" not in frozen["clip"]["params"]
  _, tunable0, frozen = episodes["t2i"]
  assert set(tunable0) == set(params) - {"visual"}
  assert {"token_embedding", "positional_embedding", "transformer", "ln_final",
          "text_projection", "logit_scale"} <= set(tunable0)
  assert set(frozen["clip"]["params"]) == {"visual"}
  adapted = flat(jax.tree.map(lambda x: x[0], batched["t2i"][1]))
  assert adapted["logit_scale"] != params["logit_scale"]  # the temperature trains too
  for direction in rlcf_retrieval.DIRECTIONS:
    _, tunable0, _ = episodes[direction]
    adapted = flat(jax.tree.map(lambda x: x[0], batched[direction][1]))
    unchanged = [n for n, v in flat(tunable0).items() if np.array_equal(adapted[n], v)]
    assert not unchanged, (direction, unchanged)


def test_bad_episode_settings_are_clear_errors(shared):
  with pytest.raises(ValueError, match="direction='x2y'"):
    make(shared, "x2y")
  with pytest.raises(ValueError, match="top_k=11 must be in \\[1, 10\\]"):
    make(shared, "i2t", top_k=11)
  episode, tunable0, frozen = make(shared, "t2i")
  with pytest.raises(ValueError, match="leading batch axis"):
    tta.adapt_queries(episode, tunable0, frozen, {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))},
                      jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="at least one reward CLIP"):
    rlcf_retrieval.make_episode((shared["model"], shared["variables"]), [],
                                *candidates(shared, "i2t"), direction="i2t", top_k=3)


# ------------------------------------------------------------------------------------------------
# LAVIS's ranks, caption cleaning, the data sources.


def lavis_ranks(scores_i2t, scores_t2i, img2txt, txt2img):
  """`RetrievalTask._report_metrics`'s rank loops, written here."""
  i2t = []
  for index, score in enumerate(scores_i2t):
    inds = np.argsort(score)[::-1]
    i2t.append(min(np.where(inds == i)[0][0] for i in img2txt[index]))
  t2i = [np.where(np.argsort(score)[::-1] == txt2img[index])[0][0]
         for index, score in enumerate(scores_t2i)]
  return np.array(i2t), np.array(t2i)


def test_ranks_and_recall_follow_lavis():
  rng = np.random.default_rng(7)
  caption_image = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])  # 5 images, 12 captions
  scores = rng.permutation(60).reshape(5, 12).astype(np.float32)  # distinct: no ties
  img2txt = {i: list(np.flatnonzero(caption_image == i)) for i in range(5)}
  expected_i2t, expected_t2i = lavis_ranks(scores, scores.T, img2txt,
                                           dict(enumerate(caption_image)))
  i2t = tta_retrieval.best_positive_ranks(scores, np.equal.outer(np.arange(5), caption_image))
  t2i = tta_retrieval.best_positive_ranks(scores.T, np.equal.outer(caption_image, np.arange(5)))
  np.testing.assert_array_equal(i2t, expected_i2t)
  np.testing.assert_array_equal(t2i, expected_t2i)
  assert tta_retrieval.recall_percentages(np.array([0, 3, 7, 12]), (1, 5, 10)) == {
      1: 25.0, 5: 50.0, 10: 75.0}


def test_caption_cleaning_is_lavis_pre_caption():
  assert karpathy.clean_caption('A Man (riding) a "horse"... on the BEACH!') == \
      "a man riding a horse on the beach"
  assert karpathy.clean_caption("  Two\tdogs;  play:~ ball. \n") == "two\tdogs play ball"
  kept = "don't stop, it's 5 o'clock-ish"  # commas, apostrophes and hyphens stay
  assert karpathy.clean_caption(kept) == kept
  long = " ".join(f"w{i}" for i in range(60))
  assert karpathy.clean_caption(long) == " ".join(f"w{i}" for i in range(50))


def write_karpathy(root):
  """A tiny LAVIS-style COCO folder: test json (3 images, 2-3 captions), train json (pairs)."""
  rng = np.random.default_rng(8)
  os.makedirs(os.path.join(root, "val2014"))
  names = []
  for i in range(3):
    name = f"val2014/img_{i}.png"
    tf.io.write_file(os.path.join(root, name), tf.io.encode_png(
        rng.integers(0, 255, size=(10 + i, 12, 3), dtype=np.uint8)))
    names.append(name)
  test = [{"image": names[0], "caption": ["A dog.", "The DOG runs!"]},
          {"image": names[1], "caption": ["a cat", "cat (small)", "one cat;"]},
          {"image": names[2], "caption": ["a bird"]}]
  train = [{"image": names[0], "caption": "A dog.", "image_id": "coco_0"},
           {"image": names[1], "caption": "a cat", "image_id": "coco_1"}]
  for split, entries in (("test", test), ("train", train)):
    with open(os.path.join(root, f"coco_karpathy_{split}.json"), "w") as f:
      json.dump(entries, f)
  return names


def test_karpathy_source_reads_lavis_json_and_images(tmp_path, vocab):
  root = str(tmp_path / "coco")
  names = write_karpathy(root)
  source = input_pipeline.get_source("coco_karpathy", data_dir=str(tmp_path))
  assert source.splits == ("train", "test")  # the splits whose json exists
  assert source.num_examples("test") == 3 and source.max_captions["test"] == 3
  examples = list(source.dataset("test").as_numpy_iterator())
  assert [e["image"].shape for e in examples] == [(10, 12, 3), (11, 12, 3), (12, 12, 3)]
  assert [[c.decode() for c in e["captions"]] for e in examples] == [
      ["a dog", "the dog runs"], ["a cat", "cat small", "one cat"], ["a bird"]]
  assert [list(e["captions"]) for e in source.dataset("train").as_numpy_iterator()] == [
      [b"a dog"], [b"a cat"]]
  # Batches: 'caption_tokens' (C_max, L) with all-zero padding rows.
  pp = ("resize(32)|value_range(0, 1)|normalize('clip')|"
        f"clip_tokenize('{vocab}', key='captions', max_captions=3)")
  batch = next(pipeline.make_eval_dataset(source, "test", preprocess.make_preprocess_fn(pp),
                                          global_batch_size=4).as_numpy_iterator())
  assert batch["caption_tokens"].shape == (4, 3, 77)
  np.testing.assert_array_equal(np.any(batch["caption_tokens"] != 0, -1)[:3],
                                [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
  # Missing files are errors naming them.
  os.remove(os.path.join(root, names[2]))
  with pytest.raises(FileNotFoundError, match="img_2.png.*coco_karpathy_test.json"):
    input_pipeline.get_source("coco_karpathy", root=root)
  with pytest.raises(FileNotFoundError, match="flickr30k_test.json"):
    input_pipeline.get_source("flickr30k_karpathy", root=root, image_root=root, splits=("test",))
  with pytest.raises(ValueError, match="entry 0"):
    with open(os.path.join(root, "coco_karpathy_val.json"), "w") as f:
      json.dump([{"image": 3, "caption": []}], f)
    input_pipeline.get_source("coco_karpathy", root=root, splits=("val",))


def test_embedded_captioned_shapes():
  source = embedded_captions.CaptionedShapesSource(limit=6)
  images, labels = source.arrays("test")
  captions = source.captions("test")
  assert len(images) == 6 and [len(c) for c in captions] == [3, 2, 3, 2, 3, 2]
  for image, label, texts in zip(images, labels, captions):
    colour = embedded_clip.COLOUR_NAMES[label % 5]
    half = "top" if label < 5 else "bottom"
    assert len(set(texts)) == len(texts)  # different phrasings
    assert all(colour in t and half in t for t in texts), texts
  examples = list(source.dataset("test").as_numpy_iterator())
  assert [len(e["captions"]) for e in examples] == [3, 2, 3, 2, 3, 2]
  assert examples[0]["captions"][0].decode() == captions[0][0]
  with pytest.raises(ValueError, match="limit=0"):
    embedded_captions.CaptionedShapesSource(limit=0)
  # The shift: the test images zoomed out, their captions still those of the clean scenes.
  shifted = embedded_captions.CaptionedShapesSource(limit=6, shift="zoom_out")
  assert shifted.captions("test") == captions
  np.testing.assert_array_equal(shifted.arrays("test")[0], embedded_clip.zoom_out(images))
  np.testing.assert_array_equal(shifted.arrays("train")[0], source.arrays("train")[0])
  with pytest.raises(ValueError, match="shift='blur'"):
    embedded_captions.CaptionedShapesSource(shift="blur")


# ------------------------------------------------------------------------------------------------
# The evaluator.


class Clips:
  def __init__(self, policy, rewards):
    self.policy, self.rewards = policy, rewards


@pytest.mark.parametrize("direction", [pytest.param("i2t", marks=pytest.mark.slow), "t2i"])
def test_tta_retrieval_evaluator(shared, vocab, direction, monkeypatch):
  """On 5 captioned shapes (13 captions) in batches of 4, the last one padded: the zero-shot ranks
  from the policy's features, the adapted ones from the scores the episodes returned (recorded;
  the episodes are checked above), both through LAVIS's rank loops; the queries in LAVIS's order."""
  source = embedded_captions.CaptionedShapesSource(limit=5)
  pp = preprocess.make_preprocess_fn(
      f"value_range(0, 1)|normalize('clip')|clip_tokenize('{vocab}', key='captions', "
      "max_captions=3)")
  mesh = sharding.make_mesh()
  policy = (shared["model"], shared["variables"])
  rewards = ((shared["reward"], shared["r_vars"], 1.0),)
  ctx = common.EvalContext(None, source, mesh, common.eval_batches(source, pp, 4, mesh),
                           {"tta_clips": lambda variables: Clips(policy, rewards)})
  evaluator = common.build("ret", dict(type="tta_retrieval", split="test", direction=direction,
                                       top_k=2, steps=1, lr=1e-3, ks=(1, 2)), ctx)
  recorded, adapt = [], rlcf_retrieval.adapt

  def recording(*args, **kwargs):
    scores, params = adapt(*args, **kwargs)
    recorded.append((np.asarray(args[3]), np.asarray(scores)))
    return scores, params

  monkeypatch.setattr(rlcf_retrieval, "adapt", recording)
  metrics = evaluator.run({})
  assert set(metrics) == set(evaluator.metric_names())
  assert metrics["examples"] == 5 and metrics["captions"] == 13

  images = np.stack([pp(e)["image"] for e in source.dataset("test").as_numpy_iterator()])
  tokens = np.asarray(coop.get_tokenizer(vocab)([c for cs in source.captions("test") for c in cs]))
  caption_image = np.repeat(np.arange(5), [len(c) for c in source.captions("test")])
  queries = images if direction == "i2t" else tokens
  # Padding only ends the last batch / chunk: the first rows are the queries in order.
  np.testing.assert_allclose(np.concatenate([q for q, _ in recorded])[:len(queries)], queries,
                             rtol=1e-6)
  adapted = np.concatenate([s for _, s in recorded])[:len(queries)]
  model, variables = policy
  image_features = jax.jit(rlcf.encode_images, static_argnums=0)(model, variables,
                                                                          images)
  text_features = jax.jit(rlcf.encode_texts, static_argnums=0)(model, variables, tokens)
  img2txt = {i: list(np.flatnonzero(caption_image == i)) for i in range(5)}
  zero_shot = (image_features @ text_features.T if direction == "i2t" else
               text_features @ image_features.T)
  for prefix, scores in (("zeroshot_", np.asarray(zero_shot)), ("", adapted)):
    if direction == "i2t":
      ranks = lavis_ranks(scores, scores[:0], img2txt, {})[0]
    else:
      ranks = lavis_ranks(scores[:0], scores, {}, dict(enumerate(caption_image)))[1]
    for k in (1, 2):
      assert metrics[f"{prefix}{direction}_R@{k}"] == pytest.approx(100 * np.mean(ranks < k))


# ------------------------------------------------------------------------------------------------
# The config.


def test_config_real_runs_and_bad_arguments():
  from configs import rlcf_retrieval as config_module
  for dataset, direction, top_k in (("coco", "i2t", 20), ("flickr", "i2t", 16),
                                    ("coco", "t2i", 12), ("flickr", "t2i", 12)):
    config = config_module.get_config(f"dataset={dataset},direction={direction}")
    assert config.mode == "eval" and config.model_name == "prompts.rlcf"
    assert dict(config.evals[direction]) == dict(
        type="tta_retrieval", split="test", direction=direction, top_k=top_k)
    assert "max_captions" in config.pp.eval and "center_crop(224)" in config.pp.eval
  demo = config_module.get_config()
  assert set(demo.evals) == {"i2t", "t2i"} and demo.dataset == embedded_captions.NAME
  for arg, message in (("dataset=msrvtt", "dataset='msrvtt'"), ("direction=v2t", "'v2t'"),
                       ("dataset=coco", "direction=i2t or direction=t2i")):
    with pytest.raises(ValueError, match=message):
      config_module.get_config(arg)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
  """The embedded demo, 4 pre-fit steps (runlocal) on 20 test images: both directions report
  zero-shot and RLCF R@K through the trainer (prompts.rlcf's 'tta_clips')."""
  from configs import rlcf_retrieval as config_module
  from jaxprompt import train
  config = config_module.get_config("runlocal")
  config.dataset_kwargs.limit = 20
  final = train.train_and_evaluate(config, str(tmp_path))
  for direction in rlcf_retrieval.DIRECTIONS:
    for prefix in ("", "zeroshot_"):
      for k in (1, 5, 10):
        assert 0 <= final[f"{direction}/{prefix}{direction}_R@{k}"] <= 100
    assert final[f"{direction}/examples"] == 20
    assert final[f"{direction}/captions"] == 50  # 3 + 2 + 3 + ... captions


def test_a_real_run_adapts_every_caption_of_a_karpathy_json(tmp_path):
  """configs/rlcf_retrieval.py:dataset=flickr,direction=t2i end to end through the trainer (eval
  mode: no pre-fit), on a LAVIS-style Flickr30K test json written here (3 PNG images, 2 + 3 + 1
  captions), tiny random CLIPs at 32 px (the reward a second ViT-mu/8: compiling an RN-mu would
  double the test's time): every caption is a query, every image a candidate."""
  from configs import rlcf_retrieval as config_module
  from jaxprompt import train
  root = str(tmp_path / "flickr30k")
  rng = np.random.default_rng(0)
  entries = []
  for i, captions in enumerate((["A dog.", "the dog runs"], ["a cat", "two cats", "one cat"],
                                ["A bird!"])):
    name = f"images/{i}.png"
    tf.io.gfile.makedirs(os.path.join(root, "images"))
    tf.io.write_file(os.path.join(root, name), tf.io.encode_png(
        rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)))
    entries.append({"image": name, "caption": captions})
  with open(os.path.join(root, "flickr30k_test.json"), "w") as f:
    json.dump(entries, f)
  vocab = embedded_clip.byte_vocabulary()
  config = config_module.get_config("dataset=flickr,direction=t2i")
  assert config.mode == "eval" and config.dataset == "flickr30k_karpathy"
  config.dataset_kwargs.root = root
  config.model.update(variant="ViT-mu/8", reward_variants=("ViT-mu/8",), vocab_path=vocab)
  config.eval_random_init = True
  config.pp.train = common_configs.vtab_pp(32, "clip")
  config.pp.eval = (f"{common_configs.vtab_pp(32, 'clip')}|clip_tokenize('{vocab}', "
                    "key='captions', max_captions=5)")
  config.evals.t2i.top_k = 2  # of the 3 candidate images
  config.batch_size = config.eval_batch_size = 2  # 3 query chunks, the last one padded
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["t2i/examples"] == 3 and final["t2i/captions"] == 6
  for prefix in ("", "zeroshot_"):
    recalls = [final[f"t2i/{prefix}t2i_R@{k}"] for k in (1, 5, 10)]
    assert 0 <= recalls[0] <= recalls[1] == recalls[2] == 100  # 3 candidates
