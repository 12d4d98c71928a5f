"""The 'tta' evaluator (jaxprompt/evaluators/tta.py) and the TPT/RLCF methods it runs on
(`prompts.tpt.METHOD`, `prompts.rlcf.METHOD`).

The evaluator's adapted and zero-shot logits are checked against a direct `tta.adapt` of the same
episode on the same views (batched, with junk padding rows that must not count, and one by one);
samples are independent of their batch and of each other; RLCF-S-M's buffer follows a hand loop;
the label-space, reward and momentum checks are clear errors; a reward CLIP of another embedding
width and input size works; the pseudo-label loss matches a numpy computation; and a
`train.build` of `prompts.rlcf` in eval mode runs the evaluator end to end on the embedded named
shapes through `tta_views`. Tiny random CLIPs (ViT-mu/8), 8 views, 5 classes, the project's
byte-level vocabulary.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import coop as coop_config
from input_pipeline import embedded_clip
from jaxprompt import evaluators, sharding, train, tta
from jaxprompt.evaluators import common
from jaxprompt.evaluators import tta as tta_evaluator
from jaxprompt.models import clip
from jaxprompt.prompts import rlcf, tpt

NAMES = ("cat", "big_dog", "red square", "car", "tree")
WORDS = "a b c d"  # four context tokens with the byte-level vocabulary
VIEWS, SELECTION = 8, 0.25  # 2 views kept
SETTINGS = dict(selection=SELECTION, ctx_init=WORDS, steps=2)
REWARD_FIELDS = dict(embed_dim=24, image_size=40, vision_layers=1, vision_width=32,
                     vision_heads=2, vision_patch_size=8, text_width=32, text_heads=2,
                     text_layers=1)


class Source:
  """An in-memory label space: `num_classes` names."""
  name, splits = "fake", ("test",)

  def __init__(self, class_names=NAMES):
    self.class_names, self.num_classes = tuple(class_names), len(class_names)

  def check_split(self, split):
    if split not in self.splits:
      raise ValueError(f"Unknown split {split!r}.")


def make_ctx(views, labels, predict_fns, *, batch_size, padding=0, source=None):
  """An EvalContext whose 'test' split is (views, labels) in batches of `batch_size`, then
  `padding` junk rows ('_mask' False)."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(5)
  n = len(labels)
  total = -(-(n + padding) // batch_size) * batch_size
  arrays = {"views": np.concatenate([views, 50 * rng.normal(size=(total - n, *views.shape[1:]))
                                     .astype(np.float32)]),
            "label": np.concatenate([labels, rng.integers(0, 5, total - n).astype(np.int32)]),
            "_mask": np.arange(total) < n}

  def batches(split):
    for start in range(0, total, batch_size):
      yield sharding.global_batch({k: v[start:start + batch_size] for k, v in arrays.items()},
                                  mesh)

  config = ml_collections.ConfigDict({"seed": 3})
  return common.EvalContext(config, source or Source(), mesh, batches, predict_fns)


def random_variables(module, *inputs, seed: int) -> dict:
  """Random variables of `module` without compiling its init: N(0, 0.1²) entries, layer-norm
  scales 1 + N(0, 0.1²), logit scales log(100) (CLIP's trained value)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs))

  def draw(path, leaf):
    if path[-1] == "logit_scale":
      return np.full(leaf.shape, np.log(100.0), np.float32)
    return (0.1 * rng.normal(size=leaf.shape) + (path[-1] == "scale")).astype(np.float32)
  return traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def model(vocab):
  """prompts.rlcf's Model (policy and one reward CLIP, both ViT-mu/8), its variables, its predict
  functions."""
  m = rlcf.Model(num_classes=len(NAMES), class_names=NAMES, variant="ViT-mu/8", vocab_path=vocab,
                 ctx_init=WORDS, reward_variants=("ViT-mu/8",))
  variables = random_variables(m, jnp.zeros((1, 32, 32, 3)), seed=0)
  return m, variables, rlcf.predict_fns(m)


@pytest.fixture(scope="module")
def data():
  """5 samples of 8 views (32 px) and their labels."""
  rng = np.random.default_rng(1)
  return (rng.normal(size=(5, VIEWS, 32, 32, 3)).astype(np.float32),
          rng.integers(0, 5, 5).astype(np.int32))


def build(ctx, **settings):
  return common.build("tta", dict(type="tta", split="test", **settings), ctx)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_tpt_evaluator_equals_a_direct_adapt_and_samples_are_independent(model, data, vocab):
  """Sample 0 three times, in batches of 2: (s0, s1), (s0, s0), (s2, junk), then 3 junk rows. The
  adapted logits equal a direct `tta.adapt` of TPT's episode, vmapped (batched=True) and one by
  one (batched=False); the repeats are identical (every sample starts afresh, whatever its
  neighbours); zero-shot is the model's own hard-prompt logits of view 0 (the initial context is
  the words of ctx_init); the metrics count the 5 real rows only."""
  m, variables, fns = model
  views, labels = data
  views, labels = views[[0, 1, 0, 0, 2]], labels[[0, 1, 0, 0, 2]]
  runs = {}
  for batched in (True, False):
    evaluator = build(make_ctx(views, labels, fns, batch_size=2, padding=3), method="tpt",
                      batched=batched, **SETTINGS)
    runs[batched] = evaluator.predictions(variables)
  got = runs[True]
  np.testing.assert_array_equal(got["label"], labels)
  episode, tunable0, frozen = tpt.make_episode(clip.Model(**clip.decode_variant("ViT-mu/8")),
                                               tpt.clip_variables(variables, "clip"), NAMES,
                                               vocab, ctx_init=WORDS, selection=SELECTION,
                                               steps=2)
  expected, _ = tta.adapt(episode, tunable0, frozen, views, jax.random.PRNGKey(0))
  assert rel_err(got["logits"], expected) < 1e-4
  assert rel_err(runs[False]["logits"], expected) < 1e-4
  for repeat in (2, 3):
    np.testing.assert_allclose(got["logits"][repeat], got["logits"][0], rtol=1e-5, atol=1e-5)
  zeroshot, _ = m.apply(variables, views[:, 0])
  assert rel_err(got["zeroshot_logits"], zeroshot) < 1e-4
  assert not np.allclose(got["logits"], got["zeroshot_logits"], atol=1e-3)  # it adapted
  metrics = evaluator.run(variables)  # the same variables: the same episode, no new compile
  expected, zeroshot = np.asarray(expected), np.asarray(zeroshot)
  top5 = np.argsort(-expected, axis=-1)[:, :5]
  assert metrics == pytest.approx(dict(
      accuracy=np.mean(expected.argmax(-1) == labels),
      top5=np.mean((top5 == labels[:, None]).any(-1)),
      zeroshot_accuracy=np.mean(zeroshot.argmax(-1) == labels), zeroshot_top5=1.0, examples=5))
  assert set(metrics) == set(evaluator.metric_names())


@functools.lru_cache(maxsize=1)
def wide_reward():
  """(clip.Model, variables) of a reward CLIP of embedding width 24 and input size 40 px."""
  reward = clip.Model(**dict(clip.decode_variant("ViT-mu/8"), **REWARD_FIELDS))
  return reward, random_variables(reward, jnp.zeros((1, 40, 40, 3)), jnp.ones((1, 4), jnp.int32),
                                  seed=4)


class WideReward(tpt.TtaClipsFn):
  """'tta_clips' with `wide_reward` as the reward CLIP."""

  def __call__(self, variables):
    return tpt.TtaClips(super().__call__(variables).policy, ((*wide_reward(), 1.0),))


def test_rlcf_with_a_reward_of_another_width_and_the_momentum_buffer(model, data, vocab):
  """RLCF with a 24-wide, 40 px reward CLIP equals `rlcf.make_episode` adapted directly; with
  RLCF-S-M, batch 2 starts from the buffer's target after batch 1's real samples."""
  m, variables, fns = model
  views, labels = data
  clips_fn = WideReward(*[getattr(fns["tta_clips"], f) for f in
                          ("class_names", "vocab_path", "dtype", "policy", "rewards")])
  clips = clips_fn(variables)
  episode, tunable0, frozen = rlcf.make_episode(clips.policy, clips.rewards, NAMES, vocab,
                                                ctx_init=WORDS, selection=SELECTION, steps=2)
  fns = {**fns, "tta_clips": clips_fn}
  got = build(make_ctx(views[:4], labels[:4], fns, batch_size=2, padding=1), method="rlcf",
              momentum=dict(momentum=0.5, update_freq=2), **SETTINGS).predictions(variables)
  first, adapted = tta.adapt(episode, tunable0, frozen, views[:2], jax.random.PRNGKey(0))
  state = rlcf.momentum_update(rlcf.momentum_init(tunable0), tunable0, adapted, momentum=0.5,
                               update_freq=2, update_w=1.0)
  assert not np.allclose(state.target["ctx"], tunable0["ctx"])
  second, _ = tta.adapt(episode, state.target, frozen, views[2:4], jax.random.PRNGKey(1))
  assert rel_err(got["logits"], np.concatenate([first, second])) < 1e-4


def test_pseudo_label_loss_against_numpy(model, data, vocab):
  """Pseudo-labels: the policy's initial top-1 class of each selected view, fixed at prepare; the
  loss is their mean cross-entropy, also at other params."""
  _, variables, fns = model
  views, _ = data
  policy = fns["tta_clips"](variables).policy
  episode, tunable0, frozen = rlcf.make_episode(policy, (), NAMES, vocab, objective="pseudo_label",
                                                ctx_init=WORDS, selection=SELECTION, steps=1)
  context = episode.prepare(tunable0, frozen, views[0], None)
  p_model, p_vars = policy
  ids = tpt.hard_prompt_ids(vocab, NAMES, WORDS)
  text = np.asarray(clip.normalize(p_model.apply(p_vars, ids, method=clip.Model.encode_text)))
  image = np.asarray(clip.normalize(p_model.apply(p_vars, views[0],
                                                  method=clip.Model.encode_image)))
  scale = np.exp(np.asarray(p_vars["params"]["logit_scale"]))
  logits = scale * image[np.asarray(context["selected"])] @ text.T
  np.testing.assert_array_equal(context["pseudo_labels"], logits.argmax(-1))

  def numpy_loss(logits):
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    return -np.mean(log_probs[np.arange(len(logits)), logits.argmax(-1)])
  assert float(episode.loss(tunable0, frozen, context, None)) == pytest.approx(
      numpy_loss(logits), rel=1e-4)
  moved = {"ctx": tunable0["ctx"] + 0.5}
  policy_logits = tpt.prompt_policy(p_model, NAMES, vocab, n_ctx=4, ctx_init=WORDS).logits
  moved_logits = np.asarray(policy_logits(moved, frozen, context["image_features"]))
  expected = -np.mean(np.asarray(jax.nn.log_softmax(moved_logits))[
      np.arange(len(logits)), logits.argmax(-1)])
  assert float(episode.loss(moved, frozen, context, None)) == pytest.approx(expected, rel=1e-4)


def test_bad_settings_are_clear_errors(model, data, vocab):
  m, variables, fns = model
  views, labels = data
  ctx = make_ctx(views, labels, fns, batch_size=5)
  imagenet = tuple(f"class {i}" for i in range(1000))
  wrong = {**fns, "tta_clips": tpt.TtaClipsFn(imagenet, vocab, jnp.float32, ("clip", "ViT-mu/8"))}
  with pytest.raises(ValueError, match="200 classes and 200 class names, the model 1000"):
    build(make_ctx(views, labels, wrong, batch_size=5,
                   source=Source(imagenet[:200])), method="tpt")
  tpt_fns = tpt.predict_fns(tpt.Model(num_classes=5, class_names=NAMES, variant="ViT-mu/8",
                                      vocab_path=vocab))
  for method in ("rlcf", "kd"):
    with pytest.raises(ValueError, match=f"method='{method}' needs a reward CLIP.*prompts.rlcf"):
      build(make_ctx(views, labels, tpt_fns, batch_size=5), method=method)
  build(ctx, method="tpt")  # the rewards are ignored
  cases = [(dict(method="tent"), "method='tent'"), (dict(mode="text"), "mode='text'"),
           (dict(momentum=dict(decay=0.9)), "unknown key\\(s\\) \\['decay'\\]"),
           (dict(coop_ctx="/no/such.pth"), "/no/such.pth"), (dict(batched=1), "batched=1")]
  for settings, message in cases:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      build(ctx, **settings)
  with pytest.raises(ValueError, match="2 weights for 1 reward_variants"):
    rlcf.Model(num_classes=5, class_names=NAMES, reward_variants=("ViT-mu/8",),
               reward_weights=(0.5, 0.5))
  assert rlcf.effective_reward_weights(("ViT-L/14",), ()) == (1.0,)
  assert rlcf.effective_reward_weights(rlcf.RLCF_S_REWARD_ARCHS, ()) == (0.56, 0.17, 0.28)


def test_rlcf_method_end_to_end_in_eval_mode(tmp_path):
  """`train.build` of prompts.rlcf (mode='eval', random init, no train split) on the embedded
  named shapes, the eval split through `tta_views(8, 32)|value_range(0, 1)|normalize('clip')`,
  then `evaluators.run_all`: every val example is adapted once."""
  config = coop_config.get_config()
  config.model_name = "prompts.rlcf"
  config.model = ml_collections.ConfigDict(dict(
      variant="ViT-mu/8", vocab_path=embedded_clip.byte_vocabulary(), ctx_init="a photo of a",
      reward_variants=("ViT-mu/8",)))
  config.mode, config.eval_random_init = "eval", True
  # As a test-only source (ImageNet-A): the model is initialised from one of the eval split's views.
  config.train_split = "no_such_split"
  config.dataset_kwargs = ml_collections.ConfigDict(dict(shots=1, seed=1))  # val: 10 examples
  config.pp.eval = "tta_views(8, 32)|value_range(0, 1)|normalize('clip')"
  config.eval_batch_size = 8
  config.evals = ml_collections.ConfigDict({"tta": dict(
      type="tta", split="val", method="rlcf", selection=0.25, steps=1, ctx_init="a photo of a")})
  exp = train.build(config)
  metrics = evaluators.run_all(exp.evaluators, exp.evaluated(exp.state))
  assert metrics["tta/examples"] == 10
  assert set(metrics) == {f"tta/{k}" for k in exp.evaluators["tta"].metric_names()}
  assert all(0 <= v <= 1 for k, v in metrics.items() if k != "tta/examples")
  assert isinstance(exp.evaluators["tta"], tta_evaluator.TtaEvaluator)
