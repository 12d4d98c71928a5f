"""ClipCap / CapDec (jaxprompt/prompts/clipcap.py), the 'captioning' evaluator, the `opt_tokenize`
pp op and configs/{clipcap,capdec}_coco.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
from flax import traverse_util

from configs import capdec_coco, clipcap_coco
from input_pipeline import preprocess
from jaxprompt import evaluators, optim, train
from jaxprompt.models import clip, gpt2_tokenizer, opt
from jaxprompt.prompts import clipcap
from conftest import assert_only_trainable_changed, run_steps  # pylint: disable=import-error

TINY = dict(variant="ViT-mu/8", opt_variant="mu", opt_vocab_size=300, prefix_length=4,
            clip_length=3, mapper_layers=2)


def mapper_param_count(embed_dim: int, width: int, prefix_length: int, clip_length: int,
                       layers: int) -> int:
  """The parameters of RLCF's `TransformerMapper` from its architecture (modules.py)."""
  linear = embed_dim * clip_length * width + clip_length * width
  layer = (2 * 2 * width  # norm1, norm2
           + width * width + width * 2 * width  # to_queries, to_keys_values: no bias
           + width * width + width  # project
           + width * 2 * width + 2 * width + 2 * width * width + width)  # MLP ratio 2
  return linear + prefix_length * width + layers * layer


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_mapper_sizes_match_the_original():
  embedding = jax.ShapeDtypeStruct((1, 512), jnp.float32)
  mapper = clipcap.TransformerMapper(768, prefix_length=40, clip_length=40, num_layers=8)
  params = jax.eval_shape(mapper.init, jax.random.PRNGKey(0), embedding)["params"]
  assert count(params) == mapper_param_count(512, 768, 40, 40, 8) == 53_587_968
  out = jax.eval_shape(mapper.apply, {"params": params}, embedding)
  assert out.shape == (1, 40, 768)
  mlp = clipcap.MlpMapper(768, prefix_length=10)
  params = jax.eval_shape(mlp.init, jax.random.PRNGKey(0), embedding)["params"]
  assert count(params) == 512 * 3840 + 3840 + 3840 * 7680 + 7680  # ClipCap's MLP (512, PD/2, PD)


class TorchMapperLayer(torch.nn.Module):
  """A PyTorch pre-LN mapper layer written from RLCF's modules.py description."""

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
    self.to_queries = torch.nn.Linear(width, width, bias=False)
    self.to_keys_values = torch.nn.Linear(width, 2 * width, bias=False)
    self.project = torch.nn.Linear(width, width)
    self.fc1, self.fc2 = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

  def forward(self, x):
    b, n, c = x.shape
    y = self.norm1(x)
    q = self.to_queries(y).reshape(b, n, self.heads, c // self.heads)
    kv = self.to_keys_values(y).reshape(b, n, 2, self.heads, c // self.heads)
    att = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * (c // self.heads) ** -0.5
    out = torch.einsum("bnmh,bmhd->bnhd", att.softmax(dim=2), kv[:, :, 1]).reshape(b, n, c)
    x = x + self.project(out)
    return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


def test_transformer_mapper_matches_a_pytorch_reference():
  width, prefix, clip_len, embed = 32, 4, 3, 16
  mapper = clipcap.TransformerMapper(width, prefix, clip_len, num_layers=2)
  x = np.random.RandomState(0).randn(2, embed).astype(np.float32)
  params = mapper.init(jax.random.PRNGKey(1), x)["params"]
  linear = torch.nn.Linear(embed, clip_len * width)
  layers = [TorchMapperLayer(width, clipcap.MAPPER_HEADS) for _ in range(2)]
  t = lambda a: torch.tensor(np.asarray(a))
  with torch.no_grad():
    linear.weight.copy_(t(params["linear"]["kernel"]).T)
    linear.bias.copy_(t(params["linear"]["bias"]))
    for i, layer in enumerate(layers):
      p = params[f"layers_{i}"]
      for name in ("norm1", "norm2"):
        getattr(layer, name).weight.copy_(t(p[name]["scale"]))
        getattr(layer, name).bias.copy_(t(p[name]["bias"]))
      for name in ("to_queries", "to_keys_values", "project", "fc1", "fc2"):
        getattr(layer, name).weight.copy_(t(p[name]["kernel"]).T)
        if "bias" in p[name]:
          getattr(layer, name).bias.copy_(t(p[name]["bias"]))
    h = linear(t(x)).view(2, clip_len, width)
    h = torch.cat([h, t(params["prefix_const"]).expand(2, prefix, width)], dim=1)
    for layer in layers:
      h = layer(h)
    expected = h[:, clip_len:].numpy()
  got = np.asarray(mapper.apply({"params": params}, x))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
  model = clipcap.Model(**TINY)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  return model, images, model.init(jax.random.PRNGKey(0), images, train=False)


def test_teacher_forcing_and_loss_follow_the_original(tiny):
  """Logits at positions P-1 .. P+L-2 of OPT on concat(prefix, embed(ids)) with the mask ones
  over the prefix and ids >= 0; the loss is torch's cross-entropy with ignore_index 0 on the ids
  with the -1 padding read as 0 (RLCF train.py)."""
  model, images, variables = tiny
  ids = jnp.array([[2, 17, 40, 9, -1], [2, 5, -1, -1, -1]])
  logits, aux = model.apply(variables, images, caption_ids=ids)
  prefix = model.apply(variables, images, method=clipcap.Model.image_prefix)
  np.testing.assert_allclose(aux["prefix"], prefix, rtol=1e-6)
  decoder = opt.Model("mu", 300)
  opt_vars = {"params": variables["params"]["opt"]}
  embeds = jnp.concatenate([prefix, decoder.apply(opt_vars, jnp.maximum(ids, 0),
                                                  method=opt.Model.embed)], axis=1)
  mask = jnp.concatenate([jnp.ones((2, 4), jnp.int32), (ids >= 0).astype(jnp.int32)], axis=1)
  full = decoder.apply(opt_vars, embeds, mask)
  np.testing.assert_allclose(logits, full[:, 3:-1], rtol=1e-5, atol=1e-5)
  assert logits.shape == (2, 5, 300)
  targets = torch.tensor(np.maximum(np.asarray(ids), 0), dtype=torch.long)
  expected = torch.nn.functional.cross_entropy(torch.tensor(np.asarray(logits)).reshape(-1, 300),
                                               targets.flatten(), ignore_index=0)
  np.testing.assert_allclose(clipcap.caption_loss(logits, ids), expected.numpy(), rtol=1e-5)
  with pytest.raises(ValueError, match="caption_ids must be"):
    model.apply(variables, images, caption_ids=ids[0])


def test_capdec_trains_on_the_noisy_text_embedding(tiny):
  _, images, variables = tiny
  tokens = jnp.asarray(np.random.RandomState(3).randint(1, 400, (2, 1, 77)))
  rngs = {"dropout": jax.random.PRNGKey(5)}
  ids = jnp.array([[2, 17, 40], [2, 5, -1]])

  def prefix(variance, **kw):
    model = clipcap.Model(**TINY, mode="capdec", noise_variance=variance)
    return model.apply(variables, images, caption_ids=ids, caption_tokens=tokens, rngs=rngs,
                       **kw)[1]["prefix"]

  model = clipcap.Model(**TINY)
  text = model.apply(variables, tokens[:, 0], method=lambda m, t: m.mapper(
      clip.normalize(m.clip.encode_text(t))))
  np.testing.assert_allclose(prefix(0.0, train=True), text, rtol=1e-5, atol=1e-6)
  noisy = prefix(clipcap.NOISE_VARIANCE, train=True)
  assert not np.allclose(noisy, text, atol=1e-3)
  image = model.apply(variables, images, method=clipcap.Model.image_prefix)
  np.testing.assert_allclose(prefix(clipcap.NOISE_VARIANCE, train=False), image, rtol=1e-6)
  with pytest.raises(ValueError, match="caption_tokens"):
    clipcap.Model(**TINY, mode="capdec").apply(variables, images, train=True, caption_ids=ids,
                                               rngs=rngs)
  with pytest.raises(ValueError, match="config.model.mode='clipcapp'"):
    clipcap.Model(**{**TINY, "mode": "clipcapp"})


def test_opt_tokenize_pads_with_minus_one_and_checks_its_input(tmp_path):
  folder = gpt2_tokenizer.write_tiny_vocabulary(tmp_path, ["red", "square"])
  tokenizer = gpt2_tokenizer.Tokenizer(folder)
  op = preprocess.make_preprocess_fn(f"opt_tokenize('{folder}', length=6, suffix='\\n')")
  dataset = tf.data.Dataset.from_tensor_slices({"captions": [["red square"]],
                                                "image": np.zeros((1, 1))})
  out = next(dataset.map(op).as_numpy_iterator())["caption_ids"]
  expected = [2, *tokenizer.encode("red square\n")]
  assert out.tolist() == expected + [-1] * (6 - len(expected))
  short = preprocess.make_preprocess_fn(f"opt_tokenize('{folder}', length=2)")
  assert short({"captions": tf.constant("red square")})["caption_ids"].numpy().tolist() == \
      [2, tokenizer.encode("red")[0]]
  with pytest.raises(Exception, match="one caption per example"):
    op({"captions": tf.constant(["red", "square"])})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    preprocess.make_preprocess_fn(f"opt_tokenize('{tmp_path}/none', length=6)")
  dropped = preprocess.make_preprocess_fn("drop('label')")({"label": 1, "image": 2})
  assert dropped == {"image": 2}
  with pytest.raises(KeyError, match="drop: the example has no \\['label'\\]"):
    preprocess.make_preprocess_fn("drop('label')")({"image": 2})


def test_configs_follow_the_paper_recipe():
  config = clipcap_coco.get_config("dataset=coco,opt=/w/opt-125m")
  assert (config.optim.name, config.optim.lr, config.optim.eps, config.optim.weight_decay) == \
      ("adamw", 2e-5, 1e-6, 0.0)
  assert (config.optim.warmup_steps, config.optim.decay) == (5000, "linear")
  assert (config.batch_size, config.num_epochs, config.trainable_params) == (40, 10, "")
  assert config.model.mode == "clipcap" and config.model_init.opt == "/w/opt-125m"
  assert config.model.prefix_length == 40 and config.model.mapping == "transformer"
  assert config.dataset_kwargs.captions == "raw" and "clip_tokenize" not in config.pp.train
  capdec = capdec_coco.get_config("dataset=coco,opt=/w/opt-125m")
  assert capdec.model.mode == "capdec" and "clip_tokenize" in capdec.pp.train
  assert capdec.model.noise_variance == clipcap.NOISE_VARIANCE == 0.016
  demo = clipcap_coco.get_config()
  assert demo.variants == ("steps=0", f"steps={clipcap_coco.DEMO_STEPS}")
  assert clipcap_coco.get_config("steps=0").mode == "eval"
  with pytest.raises(ValueError, match="needs opt="):
    clipcap_coco.get_config("dataset=coco")
  with pytest.raises(ValueError, match="dataset='flickr'"):
    clipcap_coco.get_config("dataset=flickr,opt=/x")
  with pytest.raises(ValueError, match="config.model.tokenizer_path"):
    clipcap.predict_fns(clipcap.Model(**TINY))["caption_tokenizer"]()
  with pytest.raises(ValueError, match="mapping='mpl'"):
    clipcap_coco.get_config("mapping=mpl")
  schedule = optim.make_schedule(lr=1.0, total_steps=10, warmup_steps=4, decay="linear")
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 7, 10)], [0, 0.5, 1, 0.5, 0],
                             atol=1e-6)


@pytest.fixture(scope="module")
def mapper_run():
  """The embedded demo with the method's own trainable set (the mapper alone), 40 steps."""
  config = clipcap_coco.get_config("steps=40")
  config.trainable_params = ""
  config.optim.lr, config.optim.warmup_steps = 1e-2, 5  # 40 steps: a shorter, faster ramp
  exp = train.build(config)
  before = jax.device_get(exp.state["params"])
  state, losses = run_steps(exp, 40, seed=config.seed)
  return exp, before, state, losses


def test_only_the_mapper_trains_and_lowers_the_loss(mapper_run):
  exp, before, state, losses = mapper_run
  labels = traverse_util.flatten_dict(exp.labels, sep="/")
  trained = {k for k, v in labels.items() if v == optim.TRAIN}
  assert trained and all(k.startswith("mapper/") for k in trained)
  assert "opt/embed_tokens/embedding" in labels and "clip/visual/proj" in labels
  assert_only_trainable_changed(traverse_util.flatten_dict(before, sep="/"),
                                traverse_util.flatten_dict(jax.device_get(state["params"]),
                                                           sep="/"), labels)
  # The random tiny OPT's tied output layer keeps its logits small (|E_v| |LN(h)| < 1), so a
  # mapper alone moves the loss from log(V) only a little (the demo trains the OPT too).
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, [round(x, 3) for x in losses]


def test_captioning_evaluator_scores_the_embedded_test_split(mapper_run):
  exp, _, state, _ = mapper_run
  evaluator = exp.evaluators["test"]
  assert evaluator.metric_names() == ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L",
                                      "CIDEr", "examples")
  metrics = evaluators.run_all(exp.evaluators, train.variables(state))
  assert metrics["test/examples"] == 100
  assert set(metrics) == {f"test/{m}" for m in evaluator.metric_names()}
  assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
  with pytest.raises(ValueError, match="num_beams=0"):
    evaluators.common.build("bad", {"type": "captioning", "split": "test", "num_beams": 0},
                            evaluator.ctx)
  big = evaluators.common.build("big", {"type": "captioning", "split": "test",
                                        "num_beams": 10_000, "tokenizer": "simple",
                                        "metrics": ["cider"]}, evaluator.ctx)
  with pytest.raises(ValueError, match="num_beams=10000"):
    big.run(train.variables(state))
