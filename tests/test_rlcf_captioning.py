"""RLCF captioning TTA (jaxprompt/prompts/rlcf_captioning.py), the 'tta_captioning' evaluator and
configs/rlcf_captioning.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ml_collections

from configs import clipcap_coco, common
from configs import rlcf_captioning as rlcf_captioning_config
from input_pipeline import embedded_captions, embedded_clip, preprocess
from jaxprompt import checkpointing, evaluators, sharding
from jaxprompt.evaluators import caption_metrics
from jaxprompt.prompts import rlcf, rlcf_captioning, tpt

SETTINGS = rlcf_captioning.Settings(num_samples=3, steps=2, lr=1e-2, max_new_tokens=5,
                                    final_beams=2)


def test_the_loss_is_the_originals_per_caption_mean_over_padded_positions():
  """torch's cross_entropy(ignore_index=0, reduction='none') over the K captions' L columns,
  averaged per caption over all L (BOS and pad id 1 count, id 0 is zeroed but divides), then
  mean_k r_k · loss_k (capdec_tta.py); columns past L (our padding bucket) change nothing."""
  rng = np.random.default_rng(0)
  length, width, vocab = 6, 8, 20
  ids = np.array([[2, 5, 7, 9, 3, 1, 4, 4], [2, 11, 0, 1, 1, 1, 6, 6], [2, 8, 8, 8, 8, 8, 1, 1]],
                 np.int32)
  logits = rng.normal(size=(3, width, vocab)).astype(np.float32)
  rewards = np.array([0.3, -0.1, -0.2], np.float32)
  per_token = torch.nn.functional.cross_entropy(
      torch.tensor(logits[:, :length]).reshape(-1, vocab), torch.tensor(ids[:, :length]).long()
      .flatten(), ignore_index=0, reduction="none").reshape(3, -1)
  expected = torch.mean(torch.tensor(rewards) * per_token.mean(dim=-1)).item()
  got = rlcf_captioning.rewarded_caption_loss(jnp.asarray(logits), jnp.asarray(ids), length,
                                              jnp.asarray(rewards))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  np.testing.assert_allclose(rlcf_captioning.centred_rewards(jnp.array([1.0, 2.0, 6.0])),
                             [-2.0, -1.0, 3.0])
  np.testing.assert_allclose(rlcf_captioning.centred_rewards(jnp.array([1.5])), [1.5])


@pytest.fixture(scope="module")
def tiny():
  """A random tiny ClipCap with a random reward CLIP. A random CLIP embeds all texts and all
  images almost alike, so CLIP-S = 2.5 max(cos, 0) would be 0 for every caption if that common
  cosine is negative: the reward's image projection is then negated, which makes the cosines
  positive (and the rewards differ)."""
  folder = clipcap_coco.demo_vocabulary()
  model = rlcf_captioning.Model(
      variant="ViT-mu/8", vocab_path=embedded_clip.byte_vocabulary(), opt_variant="mu",
      opt_vocab_size=clipcap_coco.demo_vocab_size(folder), tokenizer_path=folder,
      prefix_length=4, clip_length=4, mapper_layers=1, reward_variants=("ViT-mu/8",))
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)
  fns = rlcf_captioning.predict_fns(model)
  reward = fns["rlcf_captioner"]().rewards[0]
  reward_vars = tpt.clip_variables(variables, "reward_0")
  texts = rlcf.encode_texts(reward, reward_vars,
                            fns["reward_tokenizers"]()[0](["a red square", "dark"]))
  if float(jnp.mean(rlcf.encode_images(reward, reward_vars, images) @ texts.T)) < 0:
    params = variables["params"]
    visual = {**params["reward_0"]["visual"], "proj": -params["reward_0"]["visual"]["proj"]}
    variables = {**variables, "params": {**params, "reward_0": {**params["reward_0"],
                                                                "visual": visual}}}
  adapter = rlcf_captioning.Adapter(fns["rlcf_captioner"](), SETTINGS, fns["caption_tokenizer"](),
                                    fns["reward_tokenizers"]())
  return model, images, variables, fns, adapter


def test_padding_past_the_captions_changes_no_teacher_forced_logit(tiny):
  model, images, variables, _, _ = tiny
  prefix = model.apply(variables, images[:2], method=rlcf_captioning.Model.image_prefix)
  ids = jnp.array([[2, 5, 9, 1], [2, 7, 1, 1]])
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  short = model.apply(variables, prefix, ids, mask, method=rlcf_captioning.Model.caption_logits)
  longer = model.apply(variables, prefix, jnp.pad(ids, ((0, 0), (0, 4)), constant_values=1),
                       jnp.pad(mask, ((0, 0), (0, 4))),
                       method=rlcf_captioning.Model.caption_logits)
  assert short.shape[:2] == (2, 4) and longer.shape[:2] == (2, 8)
  np.testing.assert_allclose(longer[:, :4], short, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def batched_run(tiny):
  _, images, variables, _, adapter = tiny
  return adapter.adapt(variables, images)


def test_rewards_are_the_reward_clips_clip_s_minus_the_mean(tiny, batched_run):
  _, images, variables, fns, adapter = tiny
  reward = adapter.captioner.rewards[0]
  reward_vars = tpt.clip_variables(variables, "reward_0")
  image_features = np.asarray(rlcf.encode_images(reward, reward_vars, images))
  np.testing.assert_allclose(batched_run["reward_image_features"], image_features, rtol=1e-5,
                             atol=1e-6)
  tokenizer = fns["reward_tokenizers"]()[0]
  spread = 0.0
  for record in batched_run["steps"]:
    samples, rewards = record["samples"], record["rewards"]
    assert samples.shape == rewards.shape == (3, SETTINGS.num_samples)
    for b in range(3):
      texts = np.asarray(rlcf.encode_texts(reward, reward_vars,
                                           tokenizer(list(samples[b]), truncate=True)))
      scores = 2.5 * np.maximum(texts @ image_features[b], 0.0)
      np.testing.assert_allclose(rewards[b], scores - scores.mean(), rtol=1e-4, atol=1e-6)
      spread = max(spread, float(np.ptp(rewards[b])))
  assert spread > 1e-4  # the rewards do differ between samples


def test_each_image_adapts_alone_from_the_same_start(tiny, batched_run):
  """Batched (vmapped over the images) equals one image at a time: the same samples, rewards,
  losses, captions and adapted mappers, so nothing carries over between images."""
  _, images, variables, _, adapter = tiny
  one_by_one = adapter.adapt(variables, images, batched=False)
  for key in ("zeroshot", "adapted"):
    assert batched_run[key] == one_by_one[key]
  for batched, alone in zip(batched_run["steps"], one_by_one["steps"]):
    assert (batched["samples"] == alone["samples"]).all()
    np.testing.assert_allclose(batched["rewards"], alone["rewards"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched["losses"], alone["losses"], rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(batched_run["mapper"]), jax.tree.leaves(one_by_one["mapper"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(batched_run["mapper"]),
      jax.tree.leaves(adapter.start(variables, images).mapper)))


def test_a_step_lowers_the_rewarded_loss_of_its_own_samples(tiny):
  """The AdamW step moves each image's mapper down its REINFORCE loss: the step's samples and
  rewards scored again with the updated mapper give a lower loss than the recorded one."""
  _, images, variables, _, adapter = tiny
  episodes = adapter.start(variables, images)
  updated, record = adapter.step(episodes)
  captioner = adapter.captioner
  varied = [b for b in range(3) if np.ptp(record["rewards"][b]) > 0]  # else the loss is 0
  assert varied
  for b in varied:
    def objective(mapper, b=b):
      return float(captioner.loss(jax.tree.map(lambda x: x[b], mapper), episodes.frozen,
                                  episodes.embeddings[b], record["token_ids"][b],
                                  record["token_mask"][b], record["lengths"][b],
                                  jnp.asarray(record["rewards"][b])))
    np.testing.assert_allclose(objective(episodes.mapper), record["losses"][b], rtol=1e-4,
                               atol=1e-7)
    assert objective(updated.mapper) < objective(episodes.mapper)


def test_the_captioner_part_loads_the_mapper_of_a_clipcap_run(tiny, tmp_path):
  """`config.model_init.captioner=WORKDIR` reads the newest checkpoint of a ClipCap / CapDec run
  of this library and replaces params['mapper'] only; a run without a mapper, or a mapper of
  other shapes, is refused naming the path."""
  _, _, variables, _, _ = tiny
  trained = jax.tree.map(lambda x: np.asarray(x) + 1.0, variables["params"]["mapper"])

  def run_with(name, params):
    checkpointer = checkpointing.Checkpointer(str(tmp_path / name / "checkpoints"), keep=1)
    checkpointer.save(5, {"params": params, "step": np.int32(5)})
    checkpointer.wait()
    return str(tmp_path / name)

  loaded = rlcf_captioning.load_captioner(variables, run_with("clipcap", {"mapper": trained}))
  for got, want in zip(jax.tree.leaves(loaded["params"]["mapper"]), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(got, want)
  for part in ("clip", "opt", "reward_0"):
    assert loaded["params"][part] is variables["params"][part]
  with pytest.raises(ValueError, match="no trained 'mapper'"):
    rlcf_captioning.load_captioner(variables, run_with("coop", {"prompt_learner": np.zeros(3)}))
  narrow = jax.tree.map(lambda x: x[..., :1], trained)
  with pytest.raises(ValueError, match="narrow"):
    rlcf_captioning.load_captioner(variables, run_with("narrow", {"mapper": narrow}))


def test_settings_are_checked():
  with pytest.raises(ValueError, match="num_samples=0"):
    rlcf_captioning.Settings(num_samples=0)
  with pytest.raises(ValueError, match="lr=-1"):
    rlcf_captioning.Settings(lr=-1)


def test_the_evaluator_scores_captions_before_and_after_on_captioned_shapes(tiny):
  """The 'tta_captioning' evaluator on 3 test images of the captioned shapes (one batch, the
  fixture's settings): every metric before ('zeroshot_') and after, the adapted captions those of
  `Adapter.adapt`, and CLIP-S by the reward CLIP as `caption_metrics.clip_caption_scores`."""
  model, _, variables, fns, adapter = tiny
  source = embedded_captions.CaptionedShapesSource(limit=3)
  mesh = sharding.make_mesh(1)
  ctx = evaluators.EvalContext(ml_collections.ConfigDict(), source, mesh, evaluators.eval_batches(
      source, preprocess.make_preprocess_fn(common.vtab_pp(32, "clip")), 3, mesh), fns)
  settings = {k: getattr(SETTINGS, k) for k in ("num_samples", "steps", "lr", "max_new_tokens",
                                                "final_beams")}
  evaluator = evaluators.common.build("cap", dict(type="tta_captioning", split="test",
                                                  tokenizer="simple",
                                                  metrics=("bleu", "rouge", "cider"),
                                                  **settings), ctx)
  names = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "CLIP-S", "RefCLIP-S")
  assert evaluator.metric_names() == (*names, *(f"zeroshot_{n}" for n in names), "examples")
  captions = evaluator.adapt_split(variables)
  images = next(iter(ctx.batches("test")))["image"]
  expected = adapter.adapt(variables, np.asarray(images))
  assert list(captions["adapted"]) == expected["adapted"]
  assert list(captions["zeroshot"]) == expected["zeroshot"]
  metrics = evaluator.run(variables)
  assert set(metrics) == set(evaluator.metric_names()) and metrics["examples"] == 3
  assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
  reward = adapter.captioner.rewards[0]
  reward_vars = tpt.clip_variables(variables, "reward_0")
  clip_s = caption_metrics.clip_caption_scores(
      captions["reward_image_features"], list(captions["adapted"]), fns["reward_tokenizers"]()[0],
      lambda ids: rlcf.encode_texts(reward, reward_vars, ids))
  np.testing.assert_allclose(metrics["CLIP-S"], clip_s["CLIP-S"], rtol=1e-5)
  with pytest.raises(ValueError, match="steps=0"):
    evaluators.common.build("bad", dict(settings, type="tta_captioning", split="test",
                                        steps=0), ctx)
  with pytest.raises(ValueError, match="batched=1"):
    evaluators.common.build("bad", dict(settings, type="tta_captioning", split="test",
                                        batched=1), ctx)


def test_real_configs_carry_the_scripts_settings():
  flickr = rlcf_captioning_config.get_config("target=flickr,opt=/w/opt-125m")
  assert flickr.model_name == "prompts.rlcf_captioning" and flickr.mode == "eval"
  assert flickr.dataset == "flickr30k_karpathy" and flickr.model.reward_variants == ("ViT-L/14",)
  assert (flickr.evals.test.num_samples, flickr.evals.test.lr, flickr.evals.test.steps) == \
      (10, 2e-6, 4)
  nocaps = rlcf_captioning_config.get_config("target=nocaps,captioner=capdec,opt=/o,rlcf_s")
  assert sorted(nocaps.evals) == ["in-domain", "near-domain", "out-domain"]
  assert all((e.num_samples, e.lr) == (6, 3e-6) for e in nocaps.evals.values())
  assert nocaps.model.reward_variants == rlcf.RLCF_S_REWARD_ARCHS
  assert nocaps.model.mode == "capdec"
  assert rlcf_captioning_config.get_config("target=flickr,captioner=capdec,opt=/o") \
      .evals.test.lr == 5e-6


@pytest.mark.parametrize("arg, message", [("target=coco", "target='coco'"),
                                          ("target=flickr", "needs opt="),
                                          ("captioner=blip", "captioner='blip'")])
def test_bad_config_arguments_are_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    rlcf_captioning_config.get_config(arg)
