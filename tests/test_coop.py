"""CoOp and zero-shot CLIP: prompt layouts against CoOp's own construction, context init, frozen
CLIP, the template ensemble against a hand computation, training on the embedded named shapes,
and bad input. A tiny random CLIP (ViT-mu/8) and the project's byte-level vocabulary (every
character one token, 'x</w>' = 343, '.</w>' = 269, SOT 512, EOT 513)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import coop as coop_config
from input_pipeline import embedded_clip
from jaxprompt import evaluators, optim, train, zeroshot
from jaxprompt.evaluators import zeroshot as zs
from jaxprompt.models import clip
from jaxprompt.prompts import coop
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error

NAMES = ("cat", "big_dog", "red square at the top")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


def make_model(vocab, class_names=NAMES, **kw):
  kw.setdefault("variant", "ViT-mu/8")
  return coop.Model(num_classes=len(class_names), class_names=class_names, vocab_path=vocab, **kw)


def init(model, seed=0, *, prompts_only=False):
  """Variables of `model`; `prompts_only`: just what the prompts use (token embedding, context)."""
  if prompts_only:
    return model.init(jax.random.PRNGKey(seed), method=coop.Model.prompt_embeddings)
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))


@pytest.fixture(scope="module")
def variables(vocab):
  """Full variables of a CoOp model with a random 4-token shared context (one compile; the other
  layouts reuse them: the params do not depend on the class-token position)."""
  model = make_model(vocab, n_ctx=4)
  return jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 3))))(jax.random.PRNGKey(0))


def with_ctx(variables, ctx):
  params = dict(variables["params"], prompt_learner={"ctx": jnp.asarray(ctx)})
  return {"params": params}


def prompt_embeddings(model, variables):
  return np.asarray(model.apply(variables, method=coop.Model.prompt_embeddings))


# ------------------------------------------------------------------------------------------------
# Prompt assembly.


@pytest.mark.parametrize("position", coop.CLASS_TOKEN_POSITIONS)
def test_prompts_match_coops_construction(vocab, variables, position):
  """CoOp embeds 'X X X X {name}.', keeps [SOS] and the suffix, and inserts ctx around the name."""
  n_ctx = 4
  model = make_model(vocab, n_ctx=n_ctx, class_token_position=position)
  ctx = np.asarray(variables["params"]["prompt_learner"]["ctx"])
  assert ctx.shape == (4, 32) and 0.01 < ctx.std() < 0.03  # N(0, 0.02²)
  table = np.asarray(variables["params"]["clip"]["token_embedding"]["embedding"])
  tokenizer = coop.get_tokenizer(vocab)
  reference_ids = tokenizer([f"X X X X {n.replace('_', ' ')}." for n in NAMES])
  layout, _ = coop.coop_prompts(vocab, 77, NAMES, n_ctx, "", False, position)
  np.testing.assert_array_equal(layout.eot_index, reference_ids.argmax(-1))  # EOT unchanged
  prompts = prompt_embeddings(model, variables)
  assert prompts.shape == (3, layout.length, 32)
  assert layout.length == reference_ids.argmax(-1).max() + 1
  for c, name in enumerate(NAMES):
    e = table[reference_ids[c]]  # (77, W)
    name_len = len(tokenizer.encode(name.replace("_", " ")))
    sos, name_part, suffix = e[:1], e[1 + n_ctx:1 + n_ctx + name_len], e[1 + n_ctx + name_len:]
    expected = {"end": [sos, ctx, e[1 + n_ctx:]],
                "middle": [sos, ctx[:2], name_part, ctx[2:], suffix],
                "front": [sos, name_part, ctx, suffix]}[position]
    np.testing.assert_array_equal(prompts[c], np.concatenate(expected)[:layout.length])
  if position == "end":
    np.testing.assert_array_equal(layout.token_ids[0, :8], [512, 0, 0, 0, 0, 66, 64, 339])
    np.testing.assert_array_equal(layout.context_index[0, :7], [-1, 0, 1, 2, 3, -1, -1])


def test_class_specific_context(vocab, variables):
  model = make_model(vocab, n_ctx=4, csc=True, class_token_position="middle")
  shapes = jax.eval_shape(lambda: init(model, prompts_only=True))
  assert shapes["params"]["prompt_learner"]["ctx"].shape == (3, 4, 32)
  ctx = np.random.default_rng(0).normal(size=(3, 4, 32)).astype(np.float32)
  prompts = prompt_embeddings(model, with_ctx(variables, ctx))
  tokenizer = coop.get_tokenizer(vocab)
  for c in range(3):
    np.testing.assert_array_equal(prompts[c, 1:3], ctx[c, :2])  # ctx[:2], name, ctx[2:]
    name_len = len(tokenizer.encode(NAMES[c].replace("_", " ")))
    np.testing.assert_array_equal(prompts[c, 3 + name_len:5 + name_len], ctx[c, 2:])


def test_layout_with_two_blocks_for_rpl(vocab):
  """RPL's [SOS][ctx1][name][ctx2][description][.][EOT] from the same builder."""
  tokenizer = coop.get_tokenizer(vocab)
  blocks = (coop.ContextBlock("ctx1", 1), coop.ContextBlock("ctx2", 2))
  prompts = [[coop.Context("ctx1", 0, 1), "ab", coop.Context("ctx2", 0, 2), "c d", "."]]
  layout = coop.build_layout(tokenizer, prompts, blocks)
  ids = [512, 0, 64, 321, 0, 0, 322, 323, 269, 513]
  np.testing.assert_array_equal(layout.token_ids[0, :11], ids + [0])
  np.testing.assert_array_equal(layout.context_index[0, :10],
                                [-1, 0, -1, -1, 1, 2, -1, -1, -1, -1])
  assert layout.eot_index.tolist() == [9] and layout.length == 10


# ------------------------------------------------------------------------------------------------
# Context init, loading and zero-shot.

WORDS = "a photo of a"


def test_word_init_equals_word_embeddings(vocab):
  model = make_model(vocab, ctx_init="a_photo of a")
  params = init(model, seed=3, prompts_only=True)["params"]
  words = coop.get_tokenizer(vocab).encode(WORDS)
  assert len(words) == 9  # one token per character with the byte-level vocabulary
  table = np.asarray(params["clip"]["token_embedding"]["embedding"])
  np.testing.assert_array_equal(params["prompt_learner"]["ctx"], table[words])


def test_word_initialised_coop_is_zero_shot_clip(vocab, variables):
  """With ctx = the embeddings of 'a photo of a', CoOp's prompt is 'a photo of a {}.': its logits
  equal zero-shot CLIP's with that template."""
  params = variables["params"]
  table = params["clip"]["token_embedding"]["embedding"]
  words = with_ctx(variables, table[np.array(coop.get_tokenizer(vocab).encode(WORDS))])
  images = jax.random.normal(jax.random.PRNGKey(4), (5, 32, 32, 3))
  logits, aux = jax.jit(make_model(vocab, ctx_init=WORDS).apply)(words, images)
  fns = coop.clip_predict_fns(make_model(vocab))
  classifier = zs.class_embeddings(fns, variables, NAMES, ["a photo of a {}."])
  np.testing.assert_allclose(aux["text_features"], classifier, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, zs.logits(fns, variables, images, classifier), rtol=1e-5,
                             atol=1e-5)


def test_load_rereads_word_init_from_the_loaded_table(vocab, variables, monkeypatch):
  table = np.asarray(variables["params"]["clip"]["token_embedding"]["embedding"])
  words = coop.get_tokenizer(vocab).encode("a photo")
  params = jax.device_get(with_ctx(variables, table[words])["params"])
  monkeypatch.setattr(clip, "load", lambda v, path: jax.tree.map(lambda x: 2 * x + 1, v))
  loaded = coop.load({"params": params}, "clip.pt")["params"]
  np.testing.assert_array_equal(loaded["prompt_learner"]["ctx"],
                                loaded["clip"]["token_embedding"]["embedding"][words])
  assert loaded["clip"]["logit_scale"] == 2 * params["clip"]["logit_scale"] + 1
  # A random (not word) context keeps its values.
  random_ctx = np.asarray(variables["params"]["prompt_learner"]["ctx"])
  loaded = coop.load(jax.device_get(variables), "clip.pt")["params"]
  np.testing.assert_array_equal(loaded["prompt_learner"]["ctx"], random_ctx)


def test_zero_shot_ensemble_equals_hand_computation(vocab, variables):
  clip_model = clip.Model(**clip.decode_variant("ViT-mu/8"))
  params = variables["params"]["clip"]
  templates = ["a photo of a {}.", "{} texture.", "art of the {}."]
  tokenizer = coop.get_tokenizer(vocab)
  images = jax.random.normal(jax.random.PRNGKey(6), (4, 32, 32, 3))
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  encode_text, encode_image = (jax.jit(lambda x, m=m: clip_model.apply({"params": params}, x,
                                                                        method=m))
                               for m in (clip.Model.encode_text, clip.Model.encode_image))
  per_template = [normalize(np.asarray(encode_text(jnp.asarray(tokenizer(
      [t.format(n.replace("_", " ")) for n in NAMES]))))) for t in templates]  # all 77 positions
  expected_classifier = normalize(np.mean(per_template, axis=0))
  image_features = normalize(np.asarray(encode_image(images)))
  expected = np.exp(float(params["logit_scale"])) * image_features @ expected_classifier.T

  fns = coop.clip_predict_fns(make_model(vocab))
  classifier = zs.class_embeddings(fns, variables, NAMES, templates)
  np.testing.assert_allclose(classifier, expected_classifier, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(zs.logits(fns, variables, images, classifier), expected, rtol=1e-5,
                             atol=1e-5)
  assert zs.parse_templates("ensemble") == zs.IMAGENET_TEMPLATES_SELECT
  assert zs.parse_templates("{} a.|b {}.") == ("{} a.", "b {}.")
  with pytest.raises(ValueError, match="bad: \\['no slot'\\]"):
    zs.parse_templates("a {}.|no slot")


# ------------------------------------------------------------------------------------------------
# Through the trainer spine on the embedded named shapes.


@pytest.fixture(scope="module")
def demo_run():
  """The demo recipe end to end (1000 steps, as `python -m jaxprompt.main --config
  configs/coop.py`), without the checkpoints: (experiment, params before, state after, losses,
  zero-shot accuracy before, test accuracy after)."""
  exp = train.build(coop_config.get_config())
  before = jax.device_get(exp.state["params"])
  start = zeroshot.evaluate(exp, ["a photo of a {}."], "test")["test/accuracy"]
  state, losses = run_steps(exp, exp.total_steps, seed=exp.config.seed)
  accuracy = evaluators.run_all(exp.evaluators, train.variables(state))["test/accuracy"]
  return exp, before, state, losses, start, accuracy


def test_only_the_context_trains_and_clip_stays_bit_identical(demo_run):
  exp, before, state, _, _, _ = demo_run
  assert exp.model.class_names == embedded_clip.CLASS_NAMES  # from the data source
  before = traverse_util.flatten_dict(before, sep="/")
  after = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAIN} == {"prompt_learner/ctx"}
  assert "clip/logit_scale" in labels and "clip/token_embedding/embedding" in labels
  assert_only_trainable_changed(before, after, labels)


def test_coop_lowers_the_loss_and_beats_zero_shot(demo_run):
  """A random CLIP's zero-shot start is near chance (10 classes); the learned context must
  clearly beat it (about 0.10 -> 0.4)."""
  exp, _, _, losses, start, accuracy = demo_run
  assert exp.total_steps == 1000
  assert np.mean(losses[-50:]) < np.mean(losses[:50]) - 0.5, losses[::50]
  assert start < 0.2 and accuracy > start + 0.2, (start, accuracy)


def test_few_shot_source_and_config():
  source = embedded_clip.NamedShapesSource(shots=16, seed=1)
  _, labels = source.arrays("train")
  assert source.num_examples("train") == 160 and np.bincount(labels).tolist() == [16] * 10
  assert np.bincount(source.arrays("val")[1]).tolist() == [4] * 10
  assert source.num_examples("test") == 1000
  again = embedded_clip.NamedShapesSource(shots=16, seed=1).arrays("train")[0]
  other = embedded_clip.NamedShapesSource(shots=16, seed=2).arrays("train")[0]
  assert np.array_equal(again, source.arrays("train")[0]) and not np.array_equal(again, other)

  config = coop_config.get_config("dataset=folder,shots=1,init=a_photo_of_a,csc,position=front")
  assert (config.num_epochs, config.model.ctx_init, config.model.variant) == (
      50, "a photo of a", "ViT-B/16")
  assert config.pp.train.endswith("normalize('clip')") and "random_resized_crop(224" in config.pp.train
  assert coop_config.get_config("dataset=x,shots=4,imagenet").num_epochs == 50
  assert coop_config.get_config().num_epochs == 200


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_a_clear_error(vocab):
  long_name = "an extraordinarily long class name " * 2  # 60 letters: 60 tokens
  with pytest.raises(ValueError, match=r"Prompt 1 .* is 79 tokens .* context length 77"):
    init(make_model(vocab, class_names=("cat", long_name)))
  with pytest.raises(ValueError, match="one class name per class: got 3 names for 4"):
    init(coop.Model(num_classes=4, class_names=NAMES, variant="ViT-mu/8", vocab_path=vocab))
  with pytest.raises(ValueError, match="class_token_position='start'"):
    init(make_model(vocab, class_token_position="start"))
  with pytest.raises(ValueError, match="csc=True"):
    init(make_model(vocab, ctx_init="a photo", csc=True))
  with pytest.raises(ValueError, match="vocab_path"):
    init(make_model(""))
