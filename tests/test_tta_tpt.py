"""Tests for jaxprompt/tta.py (the episodic TTA engine) and jaxprompt/prompts/tpt.py (TPT).

The reference is a PyTorch TPT episode written here after azshue/TPT (`select_confident_samples`,
`avg_entropy`, `test_time_tuning`, `PromptLearner.forward`, `ClipTestTimeTuning.inference`) on a
transformers `CLIPModel` at the 'ViT-mu/8' sizes with random weights, converted to our CLIP with
`clip.convert_state_dict`: the whole episode (image features, the prompts of TPT's prefix / ctx /
suffix construction from the tokenised "a b c d {name}." strings, the text tower, selection,
marginal entropy, torch.optim.AdamW, the prediction on view 0) runs in torch on the same weights
and views, so the JAX engine, prompt layout, loss and optimizer are all checked against it. The
byte-level vocabulary the project writes itself makes "a b c d" four context tokens. The image
mode's PyTorch parity (training the whole visual tower) is marked slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import coop as coop_config
from input_pipeline import embedded_clip
from jaxprompt import checkpointing, train, tta
from jaxprompt.models import clip, common
from jaxprompt.prompts import coop, tpt
from conftest import tiny_hf_clip  # pylint: disable=import-error

NAMES = ("red square", "green_circle", "blue star", "cat", "dog")
WORDS = "a b c d"  # four tokens with the byte-level vocabulary
NUM_VIEWS, SELECTION = 16, 0.25  # 4 views kept
MAX_REL_ERR = 1e-4


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def shared():
  """A random transformers CLIP at ViT-mu/8 sizes and the same weights as our CLIP."""
  hf = tiny_hf_clip()
  model = clip.Model(**clip.decode_variant("ViT-mu/8"))
  converted = clip.convert_state_dict({k: v.numpy() for k, v in hf.state_dict().items()},
                                      vision_heads=2, text_heads=2)
  variables = common.merge_params(converted, clip.init_variables_like(model))
  views = np.random.default_rng(2).normal(size=(3, NUM_VIEWS, 32, 32, 3)).astype(np.float32)
  return dict(hf=hf, model=model, variables=variables, views=views)


@pytest.fixture(scope="module")
def episodes(shared, vocab):
  """TPT prompt-mode episodes with 1 and 2 steps (module-scoped: compiled once)."""
  return {steps: tpt.make_episode(shared["model"], shared["variables"], NAMES, vocab,
                                  ctx_init=WORDS, selection=SELECTION, steps=steps)
          for steps in (1, 2)}


# ------------------------------------------------------------------------------------------------
# The PyTorch reference (TPT's code paths, written here).


def torch_select_confident(logits, top):
  entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
  idx = torch.argsort(entropy, descending=False)[:int(entropy.size()[0] * top)]
  return logits[idx], idx


def torch_avg_entropy(outputs):
  logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
  avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
  avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
  return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def torch_text_features(hf, prompts, eot):
  """CLIP's text tower on prompt embeddings (TPT's `TextEncoder`), normalised."""
  text = hf.text_model
  x = text.embeddings(inputs_embeds=prompts)
  length = x.shape[1]
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  x = text.encoder(inputs_embeds=x, attention_mask=causal).last_hidden_state
  x = text.final_layer_norm(x)[torch.arange(x.shape[0]), eot]
  x = hf.text_projection(x)
  return x / x.norm(dim=-1, keepdim=True)


def torch_image_features(hf, views_nhwc):
  x = hf.get_image_features(pixel_values=torch.as_tensor(views_nhwc).permute(0, 3, 1, 2))
  x = getattr(x, "pooler_output", x)
  return x / x.norm(dim=-1, keepdim=True)


def torch_tpt_episode(hf, vocab, views, steps, *, optimizer_state=None):
  """TPT's prompt tuning of one sample; returns the first loss, the selected views, the adapted
  ctx, the logits of view 0 and the optimizer's state (for the no-reset counterfactual)."""
  tokenizer = coop.get_tokenizer(vocab)
  token_ids = torch.as_tensor(np.asarray(tokenizer([f"{WORDS} {n.replace('_', ' ')}."
                                                    for n in NAMES]), np.int64))
  n_ctx = len(WORDS.split(" "))
  with torch.no_grad():
    embedding = hf.text_model.embeddings.token_embedding(token_ids)
    ctx_init = embedding[0, 1:1 + n_ctx].clone()
  prefix, suffix = embedding[:, :1], embedding[:, 1 + n_ctx:]
  ctx = torch.nn.Parameter(ctx_init)
  optimizer = torch.optim.AdamW([ctx], lr=5e-3)  # torch's default weight decay 0.01
  if optimizer_state is not None:
    optimizer.load_state_dict(optimizer_state)
  eot = token_ids.argmax(-1)

  def logits_of(images):
    with torch.no_grad():
      image_features = torch_image_features(hf, images)
    prompts = torch.cat([prefix, ctx.unsqueeze(0).expand(len(NAMES), -1, -1), suffix], dim=1)
    return hf.logit_scale.exp() * image_features @ torch_text_features(hf, prompts, eot).t()

  selected, losses = None, []
  for _ in range(steps):
    output = logits_of(views)
    if selected is None:
      output, selected = torch_select_confident(output, SELECTION)
    else:
      output = output[selected]
    loss = torch_avg_entropy(output)
    losses.append(loss.item())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  with torch.no_grad():
    logits = logits_of(views[:1])[0]
  return dict(loss=losses[0], selected=selected.numpy(), ctx=ctx.detach().numpy(),
              logits=logits.numpy(), optimizer_state=optimizer.state_dict())


# ------------------------------------------------------------------------------------------------
# TPT prompt mode against the reference.


@pytest.mark.parametrize("steps", [1, 2])
def test_tpt_episode_matches_pytorch(shared, vocab, episodes, steps):
  """The selected views, the first loss, the adapted context and the logits of view 0. The
  context's update alone is held to 1e-3: at step 2, AdamW's m / sqrt(v) of two gradients that
  partly cancel amplifies their ~1e-5 fp32 differences (the context itself agrees to ~2e-5)."""
  episode, tunable0, frozen = episodes[steps]
  views = shared["views"][0]
  expected = torch_tpt_episode(shared["hf"], vocab, views, steps)
  logits, adapted = tta.adapt(episode, tunable0, frozen, jnp.asarray(views[None]),
                              jax.random.key(0), batched=False)
  errors = {"ctx": rel_err(adapted["ctx"][0], expected["ctx"]),
            "logits": rel_err(logits[0], expected["logits"])}
  if steps == 1:  # the first step's selection and loss (the same for any number of steps)
    context = jax.jit(episode.prepare)(tunable0, frozen, jnp.asarray(views), jax.random.key(0))
    np.testing.assert_array_equal(np.sort(context["selected"]), np.sort(expected["selected"]))
    errors["loss"] = rel_err(jax.jit(episode.loss)(tunable0, frozen, context, jax.random.key(0)),
                             expected["loss"])
  update_err = rel_err(adapted["ctx"][0] - tunable0["ctx"],
                       expected["ctx"] - np.asarray(tunable0["ctx"]))
  print(f"\nTPT {steps} step(s) vs PyTorch, max relative error: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + f", ctx update {update_err:.1e}")
  assert all(v <= MAX_REL_ERR for v in errors.values()), errors
  assert update_err <= 1e-3


def test_word_init_is_the_token_embeddings_of_ctx_init(shared, vocab, episodes):
  _, tunable0, _ = episodes[1]
  ids = coop.get_tokenizer(vocab).encode(WORDS)
  assert len(ids) == 4
  table = shared["variables"]["params"]["token_embedding"]["embedding"]
  np.testing.assert_array_equal(tunable0["ctx"], table[np.asarray(ids)])


def test_batched_equals_sequential_and_every_sample_starts_afresh(shared, vocab, episodes):
  """B = 3 samples, vmapped and in a loop, each equal to TPT on that sample alone with a fresh
  AdamW; carrying AdamW's state over from the previous sample (what a missing reset would do)
  gives a visibly different context, so the check has the power to catch it."""
  episode, tunable0, frozen = episodes[2]
  views = shared["views"]
  batched = tta.adapt(episode, tunable0, frozen, jnp.asarray(views), jax.random.key(1))
  sequential = tta.adapt(episode, tunable0, frozen, jnp.asarray(views), jax.random.key(1),
                         batched=False)
  reversed_ = tta.adapt(episode, tunable0, frozen, jnp.asarray(views[::-1]), jax.random.key(1),
                        batched=False)
  assert batched[0].shape == (3, len(NAMES)) and batched[1]["ctx"].shape == (3, 4, 32)
  for a, b in ((batched, sequential), (sequential, jax.tree.map(lambda x: x[::-1], reversed_))):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert rel_err(x, y) <= 1e-5

  state = None
  for b in range(3):
    fresh = torch_tpt_episode(shared["hf"], vocab, views[b], 2)
    assert rel_err(sequential[1]["ctx"][b], fresh["ctx"]) <= MAX_REL_ERR
    assert rel_err(sequential[0][b], fresh["logits"]) <= MAX_REL_ERR
    carried = torch_tpt_episode(shared["hf"], vocab, views[b], 2, optimizer_state=state)
    state = carried["optimizer_state"]
    if b:
      update = sequential[1]["ctx"][b] - tunable0["ctx"]
      assert rel_err(update, carried["ctx"] - np.asarray(tunable0["ctx"])) > 0.1


# ------------------------------------------------------------------------------------------------
# Selection and marginal entropy.


def test_entropy_selection_matches_tpt_and_breaks_ties_by_view_index():
  logits = np.random.default_rng(3).normal(size=(64, 10)).astype(np.float32) * 3
  select = jax.jit(tta.entropy_selection, static_argnums=1)
  ours = select(jnp.asarray(logits), 0.1)
  _, theirs = torch_select_confident(torch.as_tensor(logits), 0.1)
  assert len(ours) == 6 == int(64 * 0.1)
  np.testing.assert_array_equal(ours, theirs.numpy())

  tied = np.zeros((8, 5), np.float32)
  tied[5, 0] = 4.0  # the one confident view; the other seven tie
  np.testing.assert_array_equal(select(jnp.asarray(tied), 0.5), [5, 0, 1, 2])
  assert tta.num_selected(100, 0.29) == int(100 * 0.29) == 28  # int() of the float product
  with pytest.raises(ValueError, match=r"int\(8 views \* 0.1\) = 0"):
    select(jnp.asarray(tied), 0.1)


def test_marginal_entropy_and_its_gradient_match_tpt():
  logits = np.random.default_rng(4).normal(size=(6, 7)).astype(np.float32) * 5
  value, grad = jax.jit(jax.value_and_grad(tta.marginal_entropy))(jnp.asarray(logits))
  reference = torch.as_tensor(logits).requires_grad_()
  expected = torch_avg_entropy(reference)
  expected.backward()
  assert rel_err(value, expected.item()) <= 1e-6
  assert rel_err(grad, reference.grad.numpy()) <= 1e-5

  logits[:, 3] = -np.inf  # a class no view can predict: its log-mean is clamped, the entropy finite
  value = jax.jit(tta.marginal_entropy)(jnp.asarray(logits))
  assert np.isfinite(float(value))
  assert rel_err(value, torch_avg_entropy(torch.as_tensor(logits)).item()) <= 1e-6


def test_optimizer_is_torch_adamw():
  """tpt.make_optimizer on fixed gradients = torch.optim.AdamW (decoupled weight decay)."""
  rng = np.random.default_rng(6)
  params = (0.02 * rng.normal(size=(4, 8))).astype(np.float32)  # a context's scale
  grads = rng.normal(size=(3, 4, 8))
  optimizer = tpt.make_optimizer(5e-3, 0.01)
  ours, state = jnp.asarray(params), optimizer.init(jnp.asarray(params))
  theirs = torch.nn.Parameter(torch.tensor(params))
  reference = torch.optim.AdamW([theirs], lr=5e-3, weight_decay=0.01)
  for grad in grads.astype(np.float32):
    updates, state = optimizer.update(jnp.asarray(grad), state, ours)
    ours = ours + updates
    theirs.grad = torch.tensor(grad)
    reference.step()
    assert rel_err(ours - params, theirs.detach().numpy() - params) <= 1e-5


# ------------------------------------------------------------------------------------------------
# Image mode (RLCF's TPT image-encoder baseline).


@pytest.fixture(scope="module")
def image_episode(shared, vocab):
  return tpt.make_episode(shared["model"], shared["variables"], NAMES, vocab, mode="image",
                          ctx_init="a_b", selection=SELECTION, steps=2, lr=1e-3)


def test_image_mode_tunes_the_visual_tower_against_hard_prompts(shared, vocab, image_episode):
  variables, model = shared["variables"], shared["model"]
  episode, tunable0, frozen = image_episode
  assert episode.steps == 2
  assert jax.tree.structure(tunable0) == jax.tree.structure(variables["params"]["visual"])
  assert set(frozen["clip"]["params"]) == set(variables["params"]) - {"visual"}
  encode = jax.jit(lambda ids: clip.normalize(model.apply(variables, ids,
                                                          method=clip.Model.encode_text)))
  ids = tpt.hard_prompt_ids(vocab, NAMES, "a b")  # '_' -> ' ' unless keep_underscores
  np.testing.assert_allclose(frozen["text_features"], encode(ids), rtol=1e-5, atol=1e-6)
  _, _, quirk = tpt.make_episode(model, variables, NAMES, vocab, mode="image", ctx_init="a_b",
                                 keep_underscores=True)  # RLCF's "a_photo_of_a {name}."
  quirk_ids = tpt.hard_prompt_ids(vocab, NAMES, "a_b")
  assert not np.array_equal(ids, quirk_ids)
  np.testing.assert_allclose(quirk["text_features"], encode(quirk_ids), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_image_mode_episode_matches_pytorch(shared, image_episode):
  """RLCF's TPT image-encoder baseline: AdamW over every visual parameter, 2 steps."""
  episode, tunable0, frozen = image_episode
  views = shared["views"][1]
  logits, adapted = tta.adapt(episode, tunable0, frozen, jnp.asarray(views[None]),
                              jax.random.key(0))

  # PyTorch: CLIPCLS_TTA's forward, AdamW over every visual parameter, TPT's test_time_tuning.
  hf = transformers.CLIPModel(shared["hf"].config).eval()  # a copy to train
  hf.load_state_dict(shared["hf"].state_dict())
  text_features = torch.tensor(np.asarray(frozen["text_features"]))
  trained = list(hf.vision_model.parameters()) + list(hf.visual_projection.parameters())
  optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=5e-4)
  selected = None
  for _ in range(2):
    output = hf.logit_scale.exp() * torch_image_features(hf, views) @ text_features.t()
    if selected is None:
      output, selected = torch_select_confident(output, SELECTION)
    else:
      output = output[selected]
    optimizer.zero_grad()
    torch_avg_entropy(output).backward()
    optimizer.step()
  with torch.no_grad():
    expected = (hf.logit_scale.exp() * torch_image_features(hf, views[:1]) @ text_features.t())
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  expected_visual = clip.convert_state_dict(state, vision_heads=2, text_heads=2)["params"]["visual"]

  assert rel_err(logits[0], expected[0].numpy()) <= MAX_REL_ERR
  for (path, ours), theirs, init in zip(jax.tree_util.tree_leaves_with_path(adapted),
                                        jax.tree.leaves(expected_visual),
                                        jax.tree.leaves(tunable0)):
    name = jax.tree_util.keystr(path)
    update, expected_update = np.asarray(ours[0]) - init, theirs - np.asarray(init)
    assert np.abs(update).max() > 1e-4, name  # every visual parameter trains
    if "['key']['bias']" in name:
      continue  # its gradient is 0 (softmax ignores it); AdamW turns fp32 noise into +-lr
    # AdamW's step is lr-sized whatever the gradient, so an element whose gradient is below the
    # fp32 noise (~1e-5 of the largest) may move either way; all but a few elements agree.
    assert (np.abs(update - expected_update) > 1e-5).mean() <= 0.01, name


# ------------------------------------------------------------------------------------------------
# Bad input and CoOp contexts.


def test_bad_input_is_a_clear_error(shared, vocab, episodes):
  model, variables = shared["model"], shared["variables"]
  episode, tunable0, frozen = episodes[1]
  with pytest.raises(ValueError, match=r"\(B, V, H, W, 3\).*\(16, 32, 32, 3\)"):
    tta.adapt(episode, tunable0, frozen, jnp.asarray(shared["views"][0]), jax.random.key(0))
  with pytest.raises(ValueError, match="steps must be an integer >= 1"):
    tpt.make_episode(model, variables, NAMES, vocab, ctx_init=WORDS, steps=0)
  with pytest.raises(ValueError, match=r"shape \(16, 32\); the prompts need \(4, 32\)"):
    tpt.make_episode(model, variables, NAMES, vocab, ctx_init=WORDS, ctx=np.zeros((16, 32)))
  with pytest.raises(ValueError, match="mode='text'"):
    tpt.make_episode(model, variables, NAMES, vocab, mode="text")
  with pytest.raises(ValueError, match="image mode's hard-prompt quirk"):
    tpt.make_episode(model, variables, NAMES, vocab, keep_underscores=True)
  with pytest.raises(ValueError, match="prompt mode's initial context"):
    tpt.make_episode(model, variables, NAMES, vocab, mode="image", ctx=np.zeros((4, 32)))
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    tpt.make_episode(model, variables, NAMES, vocab, selection=0.0)


def test_coop_context_from_a_dassl_checkpoint_and_npz(shared, vocab, tmp_path):
  ctx = np.random.default_rng(5).normal(size=(4, 32)).astype(np.float32)
  dassl = tmp_path / "model.pth.tar-50"  # KaiyangZhou/CoOp's prompt_learner checkpoint layout
  torch.save({"state_dict": {"ctx": torch.as_tensor(ctx).half(),
                             "token_prefix": torch.zeros(5, 1, 32),
                             "token_suffix": torch.zeros(5, 72, 32)},
              "epoch": 50, "optimizer": {"state": {}, "param_groups": [{"lr": 0.002}]},
              "scheduler": {"last_epoch": 50}, "val_result": None}, dassl)
  loaded = tpt.load_coop_context(dassl)
  np.testing.assert_array_equal(loaded, ctx.astype(np.float16).astype(np.float32))
  np.savez(tmp_path / "ctx.npz", **{"prompt_learner/ctx": ctx})
  np.testing.assert_array_equal(tpt.load_coop_context(tmp_path / "ctx.npz"), ctx)

  _, tunable0, _ = tpt.make_episode(shared["model"], shared["variables"], NAMES, vocab,
                                    ctx_init="", n_ctx=4, ctx=loaded)
  np.testing.assert_array_equal(tunable0["ctx"], loaded)
  torch.save({"state_dict": {"ctx": torch.zeros(5, 4, 32)}}, tmp_path / "csc.pth")
  with pytest.raises(ValueError, match="class-specific"):
    tpt.load_coop_context(tmp_path / "csc.pth")
  np.savez(tmp_path / "other.npz", weights=ctx)
  with pytest.raises(ValueError, match=r"no CoOp context.*\['weights'\]"):
    tpt.load_coop_context(tmp_path / "other.npz")


def test_coop_context_from_a_coop_run_of_this_library(tmp_path):
  """TPT + CoOp with a CoOp context trained here: `load_coop_context(workdir)` is the trained
  context of the run's latest checkpoint (n_ctx=4, shared); a folder without one is an error."""
  config = coop_config.get_config("n_ctx=4")
  config.unlock()
  config.total_steps, config.checkpoint_every_steps = 2, 2
  config.evals = {}
  config.optim.update(lr=0.5, warmup_epochs=0)  # so that the two steps move the context visibly
  train.train_and_evaluate(config, str(tmp_path / "coop"))
  exp = train.build(config)
  init = np.asarray(exp.state["params"]["prompt_learner"]["ctx"])
  ckpt = checkpointing.Checkpointer(str(tmp_path / "coop" / "checkpoints"), keep=1)
  trained = np.asarray(ckpt.restore(2, exp.checkpointed(exp.state))["params"]["prompt_learner"]
                       ["ctx"])
  ckpt.close()
  loaded = tpt.load_coop_context(tmp_path / "coop")
  assert loaded.shape == (4, 32) and not np.array_equal(trained, init)
  np.testing.assert_array_equal(loaded, trained)
  with pytest.raises(FileNotFoundError, match="holds no checkpoint of a jaxprompt run"):
    tpt.load_coop_context(tmp_path)
