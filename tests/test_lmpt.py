"""LMPT through the trainer spine: the model against CoOp and the seed's prompt construction, the
embedding loss's inputs and gradient, the loss wiring, the plateau rule against torch, the demo
beating zero-shot CLIP with only the context trained, both configs on files in the seed's formats,
and bad input through the config path. A tiny random CLIP (ViT-mu/8) and the project's byte-level
vocabulary (every character one token)."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import traverse_util

import input_pipeline
from configs import lmpt_coco_lt, lmpt_voc_lt
from input_pipeline import embedded_clip, embedded_multilabel, multilabel_lt, pipeline, preprocess
from jaxprompt import evaluators, optim, train, zeroshot
from jaxprompt.prompts import lmpt_losses as losses
from jaxprompt.prompts import coop, lmpt
# Seed-format dataset writers of the data tests.
from test_lmpt_data_losses_metrics import _voc, _write_dataset  # pylint: disable=import-error
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error

NAMES = ("red square", "cat")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def model_and_variables(vocab):
  model = lmpt.Model(num_classes=2, class_names=NAMES, variant="ViT-mu/8", vocab_path=vocab)
  variables = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 32, 32, 3))))(
      jax.random.PRNGKey(0))
  return model, variables


def images(n=3, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 32, 32, 3))


# ------------------------------------------------------------------------------------------------
# Model.


def test_model_is_class_specific_coop_with_the_embedding_loss_inputs(vocab, model_and_variables):
  model, variables = model_and_variables
  ctx = np.asarray(variables["params"]["prompt_learner"]["ctx"])
  assert ctx.shape == (2, 16, 32) and 0.01 < ctx.std() < 0.03  # csc, 16 random N(0, 0.02²)
  tokenizer = coop.get_tokenizer(vocab)
  captions = tokenizer(["a red square.", "a cat and a red square on a mat."])
  logits, aux = jax.jit(lambda v, x, t: model.apply(v, x, caption_tokens=t))(
      variables, images(2), captions)
  # Logits: CoOp's with the same (class-specific) context.
  coop_model = coop.Model(num_classes=2, class_names=NAMES, variant="ViT-mu/8", vocab_path=vocab,
                          csc=True)
  np.testing.assert_allclose(logits, jax.jit(coop_model.apply)(variables, images(2))[0],
                             rtol=1e-5, atol=1e-5)
  # Input token embeddings of the seed's prompts "X X ... X {name}." (77 positions, padding
  # included) with rows 1..16 replaced by the class's context, and of the captions.
  table = np.asarray(variables["params"]["clip"]["token_embedding"]["embedding"])
  reference = table[tokenizer([" ".join(["X"] * 16) + f" {n}." for n in NAMES])]  # (2, 77, W)
  reference[:, 1:17] = ctx
  np.testing.assert_array_equal(aux["prompt_embeddings"], reference)
  np.testing.assert_array_equal(aux["caption_embeddings"], table[captions])
  assert "caption_embeddings" not in jax.eval_shape(model.apply, variables, images(2))[1]


class FakeSource:
  name = "fake"
  class_freq = np.array([30, 7])
  num_train_images = 40
  class_groups = multilabel_lt.class_groups(class_freq)
  captions = ["unused"]


def test_loss_is_the_lambda_mix_and_the_embedding_loss_reaches_ctx_rows_1_on(
    vocab, model_and_variables):
  """λ·DB + (1 − λ)·CSE with the seed's VOC-LT settings; with m_ctx = 2 the embedding loss
  compares caption[0:75] with prompt[2:77], so its gradient reaches ctx[:, 1:] and not ctx[:, 0]."""
  model, variables = model_and_variables
  config = lmpt_voc_lt.get_config()
  labels = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  captions = coop.get_tokenizer(vocab)(["a red square.", "a cat, a red square.", "a cat."])
  batch = {"labels": labels, "caption_tokens": captions}

  @jax.jit
  def forward(ctx):
    params = {**variables["params"], "prompt_learner": {"ctx": ctx}}
    return model.apply({"params": params}, images(3), caption_tokens=captions)

  ctx = variables["params"]["prompt_learner"]["ctx"]
  logits, aux = forward(ctx)
  total = lmpt.make_loss(config, FakeSource())(logits, aux, batch)
  db = losses.lmpt_db_loss(logits, labels, FakeSource.class_freq, 40, neg_scale=5.0, map_mu=0.3)
  cse = losses.class_specific_embedding_loss(aux["caption_embeddings"], aux["prompt_embeddings"],
                                             labels, FakeSource.class_freq, m_ctx=2)
  np.testing.assert_allclose(total, 0.5 * db + 0.5 * cse, rtol=1e-6)
  config.lmpt.cse = False
  np.testing.assert_allclose(lmpt.make_loss(config, FakeSource())(logits, aux, batch), db,
                             rtol=1e-6)

  def embedding_loss(c):
    _, aux = forward(c)
    return losses.class_specific_embedding_loss(aux["caption_embeddings"],
                                                aux["prompt_embeddings"], labels,
                                                FakeSource.class_freq, m_ctx=2)

  grad = jax.jit(jax.grad(embedding_loss))(ctx)
  assert np.all(np.asarray(grad[:, 0]) == 0)
  assert np.all(np.abs(np.asarray(grad[:, 1:])).sum(-1) > 0)


# ------------------------------------------------------------------------------------------------
# Spine pieces: the plateau rule and the multi-label preprocessing.


def _optimizer(name="sgd", **plateau):
  config = lmpt_voc_lt.get_config().optim
  if name == "adamw":
    config.name = "adamw"
  config.plateau.update(plateau)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx, _ = optim.make_optimizer(config, params, total_steps=100, warmup_steps=0)
  return config, tx, params


def test_plateau_follows_torch_reduce_lr_on_plateau():
  torch = pytest.importorskip("torch")
  config, tx, params = _optimizer(patience=2, min_lr=1e-6)
  opt_state = tx.init(params)
  reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-4)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(reference, mode="max", patience=2,
                                                         min_lr=1e-6)
  values = [0.1, 0.2, 0.2, 0.20001, 0.2, 0.19, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3,
            0.3, 0.3, 0.3, 0.3, 0.31]
  ours, theirs = [], []
  for value in values:
    opt_state = optim.plateau_step(opt_state, {"test/mAP": value}, config)
    scheduler.step(value)
    ours.append(5e-4 * optim.lr_factor(opt_state))
    theirs.append(reference.param_groups[0]["lr"])
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)
  assert min(theirs) == 1e-6 and len(set(np.round(theirs, 12))) == 4  # 5e-4, 5e-5, 5e-6, 1e-6
  with pytest.raises(ValueError, match="'test/mAP' is not among the evaluation metrics"):
    optim.plateau_step(opt_state, {"val/mAP": 0.3}, config)


def test_plateau_factor_is_an_lr_change_for_sgd_with_momentum():
  """Lowering the factor mid-run = torch SGD (momentum 0.9, wd 1e-4) with its lr lowered."""
  torch = pytest.importorskip("torch")
  config, tx, params = _optimizer()
  target = jnp.array([0.3, 0.1, -0.2])
  opt_state = tx.init(params)
  w = torch.tensor(np.asarray(params["w"]), requires_grad=True)
  reference = torch.optim.SGD([w], lr=5e-4, momentum=0.9, weight_decay=1e-4)
  for step in range(4):
    if step == 2:
      opt_state = optax.tree_utils.tree_set(opt_state, lr_factor=jnp.float32(0.1))
      reference.param_groups[0]["lr"] = 5e-5
    grads = {"w": 3.0 * (params["w"] - target)}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    reference.zero_grad()
    (1.5 * ((w - torch.tensor(np.asarray(target))) ** 2).sum()).backward()
    reference.step()
  np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-6)


def test_train_loop_lowers_the_lr_on_a_plateau_on_the_seeds_files(tmp_path, vocab):
  """`train_and_evaluate` (as `jaxprompt.main`) on VOC-LT files in the seed's formats, tiny CLIP."""
  config = lmpt_voc_lt.get_config(f"data={_seed_files(tmp_path, 'voc_lt')},runlocal")
  config.model.variant, config.model.vocab_path, config.pp.image_size = "ViT-mu/8", vocab, 32
  config.pp.train, config.pp.eval = lmpt_voc_lt.lmpt_pp(32)
  config.evals.test.every_steps = 1  # after steps 1, 2, 3 (the last step evaluates apart)
  config.optim.plateau.update(patience=0, threshold=10.0)  # only the first counts as better
  final = train.train_and_evaluate(config, str(tmp_path / "workdir"))
  np.testing.assert_allclose(final["train/lr"], 5e-4 * 0.01, rtol=1e-5)
  assert {"test/mAP", "test/head_mAP", "test/tail_mAP", "test/CF1", "test/OF1"} <= set(final)
  assert final["test/examples"] == 10 and np.isfinite(final["train/loss"])
  assert "train/accuracy" not in final


def test_preprocess_keeps_multi_label_fields_and_flips():
  pp = preprocess.make_preprocess_fn("resize(8)|flip_lr|value_range(0, 1)")
  image = np.zeros((8, 8, 3), np.uint8)
  image[:, :4] = 255
  example = {"image": image, "labels": np.array([0.0, 1.0], np.float32),
             "caption_tokens": np.array([5, 6, 0], np.int32)}
  outs = [pp({**example, "_seed": tf.constant([0, i], tf.int64)}) for i in range(8)]
  assert "label" not in outs[0]
  np.testing.assert_array_equal(outs[0]["labels"], [0.0, 1.0])
  np.testing.assert_array_equal(outs[0]["caption_tokens"], [5, 6, 0])
  lefts = {float(o["image"][0, 0, 0]) for o in outs}
  assert lefts == {0.0, 1.0}  # some seeds flip, some do not; no crop
  with pytest.raises(ValueError, match="needs the example's '_seed'"):
    pp(example)


# ------------------------------------------------------------------------------------------------
# The demo: the seed's recipe on the embedded long-tailed squares, shortened to 15 epochs.


@pytest.fixture(scope="module")
def demo_run():
  config = lmpt_voc_lt.get_config()
  config.total_steps = 135  # 15 of the demo's 50 epochs (9 steps each)
  exp = train.build(config)
  before = jax.device_get(exp.state["params"])
  start = zeroshot.evaluate(exp, ["a photo of a {}."], "test")
  state, steps_losses = run_steps(exp, exp.total_steps, seed=config.seed)
  return exp, before, state, steps_losses, start, evaluators.run_all(exp.evaluators,
                                                                     train.variables(state))


def test_only_the_context_trains_and_clip_stays_bit_identical(demo_run):
  exp, before, state, _, _, _ = demo_run
  assert exp.model.class_names == embedded_multilabel.CLASS_NAMES
  before = traverse_util.flatten_dict(before, sep="/")
  after = traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAIN} == {"prompt_learner/ctx"}
  assert_only_trainable_changed(before, after, labels)


def test_lmpt_lowers_the_loss_and_beats_zero_shot_map(demo_run):
  """A random CLIP's zero-shot mAP is near chance (0.2: two labels of ten per test image)."""
  _, _, _, steps_losses, start, after = demo_run
  assert np.mean(steps_losses[-20:]) < np.mean(steps_losses[:20]) - 0.1, steps_losses[::10]
  assert start["test/mAP"] < 0.23 and after["test/mAP"] > start["test/mAP"] + 0.05, (
      start["test/mAP"], after["test/mAP"])
  assert after["test/examples"] == 500
  assert {"test/head_mAP", "test/medium_mAP", "test/tail_mAP", "test/CP", "test/CR", "test/CF1",
          "test/OP", "test/OR", "test/OF1"} <= set(after)


def test_embedded_source_is_long_tailed_multi_label_with_captions(vocab):
  tokenizer = coop.get_tokenizer(vocab)
  source = input_pipeline.get_source(embedded_multilabel.NAME,
                                     caption_tokenizer=lambda t: tokenizer(t, truncate=True))
  np.testing.assert_array_equal(source.class_freq, embedded_multilabel.TRAIN_COUNTS)
  assert [len(source.class_groups[g]) for g in ("head", "medium", "tail")] == [3, 4, 3]
  train_labels, test_labels = source.labels("train"), source.labels("test")
  assert train_labels.sum(1).min() == 1 and train_labels.sum(1).max() == 3
  assert test_labels.sum(0).tolist() == [100.0] * 10
  assert max(map(len, source.captions)) == 75
  example = next(source.raw_dataset("train").as_numpy_iterator())
  assert example["caption"].decode() == source.captions[0]
  for c in np.flatnonzero(example["labels"]):  # the caption names the image's squares
    assert embedded_multilabel.CLASS_NAMES[c] in source.captions[0] or \
        len(source.captions[0]) == 75
  np.testing.assert_array_equal(example["caption_tokens"], tokenizer([source.captions[0]])[0])
  again = embedded_multilabel.MultilabelShapesSource()
  assert np.array_equal(next(again.raw_dataset("test").as_numpy_iterator())["image"],
                        next(source.raw_dataset("test").as_numpy_iterator())["image"])


def test_finetune_baseline_trains_only_the_head():
  config = lmpt_voc_lt.get_config("baseline=finetune")
  assert (config.optim.name, config.optim.lr, config.batch_size, config.num_epochs) == (
      "adamw", 1e-4, 16, 30)
  config.total_steps = 3
  exp = train.build(config)
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAIN} == {"head/kernel", "head/bias"}
  _, steps_losses = run_steps(exp, 3)
  assert np.all(np.isfinite(steps_losses))
  coop_baseline = lmpt_voc_lt.get_config("baseline=coop")
  assert not coop_baseline.lmpt.cse and coop_baseline.model.classifier == "prompt"


# ------------------------------------------------------------------------------------------------
# Both configs on files in the seed's formats, and bad input through the config path.


def _seed_files(tmp_path, dataset):
  """A small seed-style data/ folder for `dataset`; returns the data/ path."""
  if dataset == "voc_lt":
    _voc(tmp_path, num_train=40, num_test=10, train_counts=[3, 1, 2, 4] * 5)
  else:
    _write_dataset(str(tmp_path / "coco"), prefix="coco", train_dir="train2017",
                   test_dir="val2017", num_train=40, num_test=10, num_classes=80,
                   train_counts=[1 + c % 4 for c in range(80)], trailing_space=True)
  return str(tmp_path)


@pytest.mark.parametrize("module,dataset,classes", [(lmpt_voc_lt, "voc_lt", 20),
                                                    (lmpt_coco_lt, "coco_lt", 80)])
def test_configs_resolve_on_the_seeds_file_formats(tmp_path, vocab, module, dataset, classes):
  config = module.get_config(f"data={_seed_files(tmp_path, dataset)}")
  assert config.dataset == f"multilabel/{dataset}" and config.lmpt.dbl_dataset == dataset
  assert (config.model.variant, config.model.n_ctx, config.model.csc, config.lmpt.m_ctx,
          config.lmpt.lam, config.batch_size, config.num_epochs) == (
              "ViT-B/16", 16, True, 2, 0.5, 64, 50)
  assert (config.optim.name, config.optim.lr, config.optim.momentum,
          config.optim.weight_decay) == ("sgd", 5e-4, 0.9, 1e-4)
  assert config.pp.train == "resize(224)|flip_lr|value_range(0, 1)|normalize('imagenet')"
  assert config.pp.eval == "resize(224)|value_range(0, 1)|normalize('imagenet')"
  config.model.vocab_path = vocab  # real runs pass OpenAI's bpe_simple_vocab_16e6.txt.gz
  data = train.build_data(config, lmpt.source_kwargs(config))
  assert data.source.num_classes == classes
  batch = next(pipeline.make_train_dataset(data.source, "train", data.train_pp,
                                           global_batch_size=2, seed=0).as_numpy_iterator())
  assert batch["image"].shape == (2, 224, 224, 3) and batch["labels"].shape == (2, classes)
  assert batch["caption_tokens"].shape == (2, 77)


def test_bad_input_is_a_clear_error_through_the_config_path(tmp_path, vocab):
  data_dir = _seed_files(tmp_path, "voc_lt")
  root = os.path.join(data_dir, "voc")

  def build(arg=""):
    config = lmpt_voc_lt.get_config(f"data={data_dir}" + (f",{arg}" if arg else ""))
    config.model.vocab_path = vocab
    return train.build_data(config, lmpt.source_kwargs(config))

  train_list = os.path.join(root, "voc_lt_train.txt")
  lines = open(train_list).read().splitlines()
  with open(train_list, "w") as f:
    f.write("\n".join(lines + ["VOCdevkit/VOC2012/JPEGImages/gone.jpg 3"]))
  with pytest.raises(input_pipeline.DataNotFoundError, match="gone.jpg"):
    build()
  with open(train_list, "w") as f:
    f.write("\n".join(lines))

  freq_file = os.path.join(root, "class_freq.pkl")
  with open(freq_file, "wb") as f:
    pickle.dump({"class_freq": np.ones(80, np.int64)}, f)
  with pytest.raises(ValueError, match=r"class_freq of shape \(80,\); expected \(20,\)"):
    build()
  with open(freq_file, "wb") as f:
    pickle.dump({"class_freq": np.full(20, 5, np.int64)}, f)
  with pytest.raises(ValueError, match="class 0 5 training images, but the train list has 3"):
    build()
  os.remove(freq_file)

  os.remove(os.path.join(root, "voc_lt_captions.txt"))
  with pytest.raises(input_pipeline.DataNotFoundError, match="voc_lt_captions.txt does not exist"):
    build()
  assert build("baseline=coop").source.captions is None  # no embedding loss: no captions needed

  with pytest.raises(ValueError, match="baseline='zeroshot'"):
    lmpt_voc_lt.get_config("baseline=zeroshot")
  config = lmpt_voc_lt.get_config()
  config.lmpt.margin = 0.3
  with pytest.raises(ValueError, match=r"Unknown config.lmpt settings \['margin'\]"):
    lmpt.make_loss(config, FakeSource())
  config = lmpt_voc_lt.get_config()
  config.model.vocab_path = ""
  with pytest.raises(ValueError, match="vocab_path"):
    lmpt.source_kwargs(config)
  config = lmpt_voc_lt.get_config()
  config.evals.test.every_epochs = 0
  with pytest.raises(ValueError, match="optim.plateau steps on evaluation metrics"):
    train.build(config)
  with pytest.raises(ValueError, match="needs a long-tailed multi-label data source"):
    lmpt.make_loss(config, embedded_clip.NamedShapesSource())
