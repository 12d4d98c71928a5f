"""RLCF (jaxprompt/prompts/rlcf.py): rewards, the REINFORCE and KD losses, RLCF-S weights, the
bicubic resize and the momentum buffer against PyTorch references written here the way the
original (mzhaoshuai/RLCF `TPT/clip_reward.py`, `tpt_cls_rl.py`, `utils/KD.py`,
`clip/custom_clip.py`) computes them; then whole episodes.

The episode check: a tiny policy CLIP (ViT-mu/8, 32 px, embed 16) and a different tiny reward
CLIP (40 px, embed 24, so the views are resized and the rewards live in another space), 8 views,
5 classes, K = 3, 2 steps. The reference re-runs the whole prompt-mode episode in PyTorch: the
prompt embeddings (context written into the token embeddings), the policy's text transformer
(written here from the Flax params), entropy selection, top-K, rewards, loss, autograd and
torch.optim.AdamW; only frozen, gradient-free features come from the JAX CLIPs (the policy's image
features of the views, the reward CLIP's image features of the torch-resized views and its text
features of the hard prompts), whose towers `tests/test_clip.py` checks against transformers.
The project's byte-level vocabulary makes every character one token.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from input_pipeline import embedded_clip
from jaxprompt import tta
from jaxprompt.models import clip
from jaxprompt.prompts import coop, rlcf

NAMES = ("cat", "big_dog", "red square", "car", "tree")
VIEWS, SELECTION, TOP_K, STEPS = 8, 0.25, 3, 2
REWARD_FIELDS = dict(embed_dim=24, image_size=40, vision_layers=1, vision_width=32,
                     vision_heads=2, vision_patch_size=8, text_width=32, text_heads=2,
                     text_layers=1)


def rel_err(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def t(x):
  return torch.tensor(np.asarray(x), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# PyTorch references, as the original computes them (float64).


def torch_rlcf_loss(output, reward_text, reward_image, weights, k):
  """`test_time_tuning` of `tpt_cls_rl.py` with `CLIPRewards(Multiple).CLIPScore(pairwise=False)`
  and `rewards_post_process` (reward_process=1, process_batch=0, reward_amplify=0)."""
  bs = output.shape[0]
  index = torch.topk(output, k, dim=-1).indices
  flat = index.flatten()
  scores = []
  for text, image in zip(reward_text, reward_image):
    similarity = 2.5 * torch.sum(text[flat] * torch.repeat_interleave(image, k, dim=0), dim=-1)
    scores.append(torch.maximum(similarity, torch.zeros_like(similarity)))
  score = torch.sum(torch.tensor(weights, dtype=output.dtype)[:, None] * torch.stack(scores), 0)
  score = score.reshape(bs, -1)
  if score.shape[-1] > 1:
    score = score - score.mean(-1, keepdim=True)
  rewards = score.flatten()
  ce = F.cross_entropy(torch.repeat_interleave(output, k, dim=0), flat, reduction="none")
  return torch.mean(rewards * ce)


def normalized(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("k", [3, 1])
def test_reinforce_loss_and_rlcf_s_rewards_match_the_original(k):
  rng = np.random.default_rng(0)
  logits = 10 * rng.normal(size=(6, 7))
  # Two reward CLIPs of different widths, RLCF-S weighting; features correlated with the logits'
  # classes so that some scores are positive and some clipped.
  texts = [normalized(rng, (7, 24)), normalized(rng, (7, 40))]
  images = [normalized(rng, (6, 24)), normalized(rng, (6, 40))]
  weights = (0.56, 0.17)
  sampled = jax.lax.top_k(jnp.asarray(logits, jnp.float32), k)[1]
  features = [(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
              for a, b in zip(texts, images)]
  rewards = rlcf.sampled_rewards(sampled, features, weights)
  ours, grad = jax.value_and_grad(rlcf.reinforce_loss)(jnp.asarray(logits, jnp.float32), sampled,
                                                       rewards)
  output = t(logits).requires_grad_(True)
  expected = torch_rlcf_loss(output, [t(a) for a in texts], [t(b) for b in images], weights, k)
  expected.backward()
  assert abs(float(ours) - expected.item()) <= 1e-5 * max(abs(expected.item()), 1e-3)
  assert rel_err(grad, output.grad) < 1e-5
  raw = [2.5 * np.sum(a[np.asarray(sampled)] * b[:, None], -1) for a, b in zip(texts, images)]
  assert (np.minimum(*raw) < 0).any()  # the clipping at 0 counts
  np.testing.assert_allclose(rewards, sum(w * np.maximum(r, 0) for w, r in zip(weights, raw)),
                             rtol=1e-5, atol=1e-6)


def test_clip_score_and_rlcf_s_weights():
  np.testing.assert_allclose(rlcf.clip_score(jnp.array([[0.6, 0.8], [1.0, 0.0]]),
                                             jnp.array([[0.6, 0.8], [-1.0, 0.0]])), [2.5, 0.0],
                             rtol=1e-6)
  assert rlcf.clip_score(jnp.array([0.6, 0.8]), jnp.array([1.0, 0.0]), weight=1.0) == \
      pytest.approx(0.6)
  assert rlcf.reward_weights(rlcf.RLCF_S_REWARD_ARCHS) == (0.56, 0.17, 0.28)  # sum 1.01, kept
  assert rlcf.reward_weights(["ViT-L/14"]) == (1.0,)
  with pytest.raises(ValueError, match="ViT-H/14"):
    rlcf.reward_weights(["ViT-H/14"])


def test_reinforce_raises_positive_advantage_classes():
  """One gradient step on the loss raises the log-probability of the above-baseline sample."""
  logits = jnp.array([[2.0, 1.9, 1.8, 0.0]])
  sampled = jnp.array([[0, 1, 2]])
  rewards = jnp.array([[0.1, 0.5, 0.1]])
  grad = jax.grad(rlcf.reinforce_loss)(logits, sampled, rewards)
  after = jax.nn.log_softmax(logits - 1.0 * grad)
  before = jax.nn.log_softmax(logits)
  assert after[0, 1] > before[0, 1] and after[0, 0] < before[0, 0]


def test_kd_loss_matches_the_original():
  rng = np.random.default_rng(1)
  student, teacher = 5 * rng.normal(size=(4, 6)), 5 * rng.normal(size=(4, 6))
  ours, grad = jax.value_and_grad(rlcf.kd_loss)(jnp.asarray(student, jnp.float32),
                                                jnp.asarray(teacher, jnp.float32))
  s = t(student).requires_grad_(True)
  expected = -torch.sum(F.softmax(t(teacher), 1) * F.log_softmax(s, 1), dim=1).mean()
  expected.backward()
  assert float(ours) == pytest.approx(expected.item(), rel=1e-5)
  assert rel_err(grad, s.grad) < 1e-5
  # Same gradient as the KL divergence (`kd_distill_loss`).
  s2 = t(student).requires_grad_(True)
  F.kl_div(F.log_softmax(s2, 1), F.softmax(t(teacher), 1), reduction="batchmean").backward()
  assert rel_err(grad, s2.grad) < 1e-5


@pytest.mark.parametrize("size_in, size_out", [(32, 40), (40, 32), (8, 8)])
def test_bicubic_align_corners_resize_matches_torch(size_in, size_out):
  images = np.random.default_rng(2).normal(size=(2, size_in, size_in, 3)).astype(np.float32)
  ours = rlcf.resize_bicubic_align_corners(jnp.asarray(images), size_out)
  expected = F.interpolate(torch.tensor(images).permute(0, 3, 1, 2), size=size_out,
                           mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
  assert rel_err(ours, expected.numpy()) < 1e-5


def test_momentum_buffer_arithmetic():
  """`momentum_update_model` of `CLIPCLS_TTA`, one sample at a time, on a scalar tree."""
  original = {"w": jnp.array(1.0)}
  adapted = {"w": jnp.array([3.0, 5.0, 7.0])}  # a batch of 3 adapted samples
  m, w = 0.5, 0.25
  state = rlcf.momentum_update(rlcf.momentum_init(original), original, adapted, momentum=m,
                               update_freq=2, update_w=w)
  ema, target, count = 1.0, 1.0, 0
  for x in (3.0, 5.0, 7.0):
    ema = m * ema + (1 - m) * x
    count += 1
    if count >= 2:
      count, target = 0, (1 - w) * 1.0 + w * ema
  assert float(state.ema["w"]) == pytest.approx(ema)
  assert float(state.target["w"]) == pytest.approx(target)
  assert state.count == count == 1
  assert float(state.target["w"]) == pytest.approx(0.75 + 0.25 * 3.5)  # refreshed after sample 2
  # Batches of 1 give the same state as one batch of 3.
  one_by_one = rlcf.momentum_init(original)
  for x in (3.0, 5.0, 7.0):
    one_by_one = rlcf.momentum_update(one_by_one, original, {"w": jnp.array([x])}, momentum=m,
                                      update_freq=2, update_w=w)
  assert jax.tree.map(float, one_by_one) == jax.tree.map(float, state)


def test_class_prompt_prefix_and_the_image_mode_quirk():
  assert rlcf.reward_prompt_prefix("a_photo_of_a", "prompt", True) == "a photo of a"
  assert rlcf.reward_prompt_prefix("a photo of a", "image", True) == "a_photo_of_a"
  assert rlcf.reward_prompt_prefix("a_photo_of_a", "image", False) == "a photo of a"


# ------------------------------------------------------------------------------------------------
# Episodes.


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def clips():
  """(policy, reward): (clip.Model, variables) of two different random tiny CLIPs. The reward
  CLIP's image projection is negated: its random image and text features start out anti-aligned
  (every CLIP-S would be clipped to 0), and this makes them score positive and varied."""
  policy = clip.Model(**clip.decode_variant("ViT-mu/8"))
  reward = clip.Model(**dict(clip.decode_variant("ViT-mu/8"), **REWARD_FIELDS))
  out = []
  for model, seed in ((policy, 0), (reward, 1)):
    variables = jax.jit(lambda rng, model=model: model.init(
        rng, jnp.zeros((1, model.image_size, model.image_size, 3)), jnp.ones((1, 4), jnp.int32)))(
            jax.random.PRNGKey(seed))
    out.append((model, variables))
  reward_params = out[1][1]["params"]
  visual = dict(reward_params["visual"], proj=-reward_params["visual"]["proj"])
  out[1] = (reward, {"params": dict(reward_params, visual=visual)})
  return out


@pytest.fixture(scope="module")
def views():
  """(3 samples, 8 views, 32, 32, 3) at the policy's input size."""
  return np.random.default_rng(3).normal(size=(3, VIEWS, 32, 32, 3)).astype(np.float32)


def make(clips, vocab, **kw):
  (policy, p_vars), (reward, r_vars) = clips
  kw = dict(dict(top_k=TOP_K, steps=STEPS, selection=SELECTION), **kw)
  return rlcf.make_episode((policy, p_vars), [(reward, r_vars, 1.0)], NAMES, vocab, **kw)


@pytest.fixture(scope="module")
def prompt_episode(clips, vocab):
  return make(clips, vocab)


@pytest.fixture(scope="module")
def batched(views, prompt_episode):
  """tta.adapt of the prompt-mode episode on the 3 samples, vmapped."""
  episode, tunable0, frozen = prompt_episode
  return tta.adapt(episode, tunable0, frozen, views, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sample0(views, prompt_episode):
  """(context, loss function) of sample 0 (prepare with the initial params), not compiled: the
  tiny model's ops run faster eagerly than one more compile."""
  episode, tunable0, frozen = prompt_episode
  return episode.prepare(tunable0, frozen, views[0], None), episode.loss


def torch_text_features(params, prompts, eot_index):
  """The CLIP text tower of `clip.Model` on prompt embeddings (C, L, W), from its Flax params,
  pooled at the EOT positions (C,); L2-normalised."""
  p = jax.tree.map(t, params)
  length = prompts.shape[1]
  x = prompts + p["positional_embedding"][:length]
  causal = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)

  def layer_norm(x, ln):
    return F.layer_norm(x, x.shape[-1:], ln["scale"], ln["bias"], eps=1e-5)

  for name in sorted(k for k in p["transformer"] if k.startswith("resblocks_")):
    block = p["transformer"][name]
    y = layer_norm(x, block["ln_1"])
    q, k, v = (torch.einsum("clw,whd->clhd", y, block["attn"][n]["kernel"]) +
               block["attn"][n]["bias"] for n in ("query", "key", "value"))
    scores = torch.einsum("cqhd,ckhd->chqk", q, k) / q.shape[-1] ** 0.5 + causal
    attended = torch.einsum("chqk,ckhd->cqhd", scores.softmax(-1), v)
    x = x + torch.einsum("cqhd,hdw->cqw", attended, block["attn"]["out"]["kernel"]) + \
        block["attn"]["out"]["bias"]
    y = layer_norm(x, block["ln_2"]) @ block["mlp"]["c_fc"]["kernel"] + block["mlp"]["c_fc"]["bias"]
    y = y * torch.sigmoid(1.702 * y)
    x = x + y @ block["mlp"]["c_proj"]["kernel"] + block["mlp"]["c_proj"]["bias"]
  x = layer_norm(x, p["ln_final"])[torch.arange(len(x)), eot_index] @ p["text_projection"]
  return x / x.norm(dim=-1, keepdim=True)


def torch_prompt_episode(clips, vocab, ctx0, views, lr, weight_decay):
  """The prompt-mode RLCF episode of `tpt_cls_rl.py` in PyTorch (see the module docstring):
  (the context before each step, the loss of each step, the adapted context, view 0's logits)."""
  (policy, p_vars), (reward, r_vars) = clips
  params = p_vars["params"]
  layout, _ = coop.coop_prompts(vocab, policy.context_length, NAMES, 4, "a photo of a", False,
                                "end")
  length = layout.length
  token_ids = torch.tensor(layout.token_ids[:, :length], dtype=torch.long)
  context_index = torch.tensor(layout.context_index[:, :length], dtype=torch.long)
  eot_index = torch.tensor(layout.eot_index, dtype=torch.long)
  fixed = t(params["token_embedding"]["embedding"])[token_ids]

  def frozen_features(model, variables, method, x):  # from the JAX CLIPs, L2-normalised
    x = t(model.apply(variables, x, method=method))
    return x / x.norm(dim=-1, keepdim=True)

  image_features = frozen_features(policy, p_vars, clip.Model.encode_image, views)
  resized = F.interpolate(torch.tensor(views).permute(0, 3, 1, 2), size=reward.image_size,
                          mode="bicubic", align_corners=True).permute(0, 2, 3, 1).numpy()
  reward_image = frozen_features(reward, r_vars, clip.Model.encode_image, resized)
  ids = coop.get_tokenizer(vocab)([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
  reward_text = frozen_features(reward, r_vars, clip.Model.encode_text, ids)
  scale = float(np.exp(params["logit_scale"]))

  ctx = torch.nn.Parameter(t(ctx0))
  optimizer = torch.optim.AdamW([ctx], lr, weight_decay=weight_decay)

  def logits(features):
    prompts = torch.where(context_index[..., None] >= 0, ctx[context_index.clamp(min=0)], fixed)
    return scale * features @ torch_text_features(params, prompts, eot_index).T

  contexts, losses, selected = [], [], None
  for _ in range(STEPS):
    contexts.append(ctx.detach().numpy().copy())
    if selected is None:  # the first step forwards all views and selects once
      output = logits(image_features)
      entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
      selected = torch.argsort(entropy)[:int(VIEWS * SELECTION)]
      output = output[selected]
    else:
      output = logits(image_features[selected])
    loss = torch_rlcf_loss(output, [reward_text], [reward_image[selected]], (1.0,), TOP_K)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
  with torch.no_grad():
    prediction = logits(image_features[:1])[0]
  return contexts, losses, ctx.detach().numpy(), prediction.numpy()


def test_prompt_episode_matches_a_torch_episode(clips, vocab, views, prompt_episode, batched,
                                                sample0):
  """Sample 0 of the vmapped engine run against the PyTorch episode: the loss of every step (ours
  evaluated at the reference's context before that step), the adapted context after 2 AdamW
  steps and the prediction on view 0."""
  _, tunable0, frozen = prompt_episode
  contexts, losses, ctx, logits = torch_prompt_episode(clips, vocab, tunable0["ctx"], views[0],
                                                       7e-3, 5e-4)
  assert min(abs(x) for x in losses) > 1e-3  # non-trivial rewards
  context, loss = sample0
  ours = [float(loss({"ctx": jnp.asarray(c, jnp.float32)}, frozen, context, None))
          for c in contexts]
  np.testing.assert_allclose(ours, losses, rtol=1e-4)
  batched_logits, adapted = batched
  assert rel_err(adapted["ctx"][0] - tunable0["ctx"], ctx - np.asarray(tunable0["ctx"])) < 1e-4
  assert rel_err(adapted["ctx"][0], ctx) < 1e-4
  assert rel_err(batched_logits[0], logits) < 1e-4
  assert frozen["rewards"][0]["text_features"].shape == (len(NAMES), 24)  # the reward's space


def test_batched_equals_sequential_and_samples_are_independent(views, prompt_episode, batched):
  episode, tunable0, frozen = prompt_episode
  rng = jax.random.PRNGKey(0)
  sequential = tta.adapt(episode, tunable0, frozen, views, rng, batched=False)
  for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(sequential)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Reset between samples: the samples in another order give the same per-sample results.
  order = [2, 0, 1]
  shuffled = tta.adapt(episode, tunable0, frozen, views[order], rng, batched=False)
  for a, b in zip(jax.tree.leaves(shuffled), jax.tree.leaves(batched)):
    np.testing.assert_allclose(a, np.asarray(b)[order], rtol=1e-5, atol=1e-6)
  assert not np.allclose(batched[1]["ctx"][0], batched[1]["ctx"][1])


def coop_text(clips, vocab, ctx):
  """The policy's class text features with context `ctx`, through `coop.Model` (CoOp's prompts
  on the same CLIP), independently of rlcf.py."""
  (_, p_vars), _ = clips
  model = coop.Model(num_classes=len(NAMES), class_names=NAMES, variant="ViT-mu/8",
                     vocab_path=vocab, ctx_init="a photo of a")
  params = {"clip": p_vars["params"], "prompt_learner": {"ctx": ctx}}
  return model.apply({"params": params}, method=coop.Model.encode_prompts)


def coop_logits(clips, vocab, ctx, features):
  (_, p_vars), _ = clips
  return jnp.exp(p_vars["params"]["logit_scale"]) * features @ coop_text(clips, vocab, ctx).T


def test_top_k_is_recomputed_from_the_current_params(clips, vocab, prompt_episode, sample0):
  _, tunable0, frozen = prompt_episode
  context, loss = sample0
  initial_logits = coop_logits(clips, vocab, tunable0["ctx"], context["image_features"])
  initial = jax.lax.top_k(initial_logits, TOP_K)[1]
  rng = np.random.default_rng(4)
  for _ in range(20):  # a context whose top-K classes differ from the initial ones
    other = {"ctx": tunable0["ctx"] + rng.normal(size=tunable0["ctx"].shape).astype(np.float32)}
    logits = coop_logits(clips, vocab, other["ctx"], context["image_features"])
    sampled = jax.lax.top_k(logits, TOP_K)[1]
    if not np.array_equal(np.sort(sampled, -1), np.sort(initial, -1)):
      break
  else:
    pytest.fail("no perturbed context changed the top-K classes")
  rewards = rlcf.sampled_rewards(sampled, [(frozen["rewards"][0]["text_features"],
                                            context["reward_image_features"][0])], (1.0,))
  expected = rlcf.reinforce_loss(logits, sampled, rewards)
  assert float(loss(other, frozen, context, None)) == pytest.approx(float(expected), rel=1e-4)


def test_image_mode_trains_only_the_visual_tower(clips, vocab, views):
  (policy, p_vars), (reward, r_vars) = clips
  episode, tunable0, frozen = make(clips, vocab, mode="image", steps=1, lr=1e-3)
  assert tunable0 is p_vars["params"]["visual"]
  assert "visual" not in frozen["clip"]["params"]
  logits, adapted = tta.adapt(episode, tunable0, frozen, views[:1], jax.random.PRNGKey(0))
  adapted = jax.tree.map(lambda x: x[0], adapted)
  for name, before in traverse_util.flatten_dict(tunable0, sep="/").items():
    after = traverse_util.flatten_dict(adapted, sep="/")[name]
    assert not np.array_equal(after, before), name
  # The class prompts are 'a_photo_of_a {class}.' (the quirk), encoded by the frozen text tower;
  # the prediction uses the adapted tower on view 0.
  ids = coop.get_tokenizer(vocab)([f"a_photo_of_a {n.replace('_', ' ')}." for n in NAMES])
  expected, _ = policy.apply({"params": dict(p_vars["params"], visual=adapted)}, views[0, :1], ids)
  assert rel_err(logits, expected) < 1e-4
  # The reward CLIP reads the same quirky prompts.
  reward_text = clip.normalize(reward.apply(r_vars, ids, method=clip.Model.encode_text))
  assert rel_err(frozen["rewards"][0]["text_features"], reward_text) < 1e-5


def test_rlcf_s_and_kd_episodes_against_hand_computations(clips, vocab, views, prompt_episode,
                                                          sample0):
  """RLCF-S with two reward CLIPs of different widths and input sizes (the reward CLIP, resized
  views, and the policy itself) and the KD baseline: each loss at the initial context against the
  policy logits of `coop.Model` and the reward features (checked above in the torch episode)."""
  (policy, p_vars), (reward, r_vars) = clips
  context0, _ = sample0
  reward_text = prompt_episode[2]["rewards"][0]["text_features"]
  episode, tunable0, frozen = rlcf.make_episode(
      (policy, p_vars), [(reward, r_vars, 0.56), (policy, p_vars, 0.17)], NAMES, vocab,
      top_k=TOP_K, steps=STEPS, selection=SELECTION)
  prepare, loss = episode.prepare, episode.loss
  context = prepare(tunable0, frozen, views[0], None)
  np.testing.assert_array_equal(context["selected"], context0["selected"])
  # Each reward CLIP's image features in its own space: the policy as a reward model sees the
  # same features as the policy.
  np.testing.assert_allclose(context["reward_image_features"][0],
                             context0["reward_image_features"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(context["reward_image_features"][1], context0["image_features"],
                             rtol=1e-5, atol=1e-6)
  # The hard prompts through the policy = its prompts with the word-initialised context.
  policy_text = coop_text(clips, vocab, tunable0["ctx"])
  np.testing.assert_allclose(frozen["rewards"][1]["text_features"], policy_text, rtol=1e-4,
                             atol=1e-5)
  features = [(reward_text, context0["reward_image_features"][0]),
              (policy_text, context0["image_features"])]
  logits = jnp.exp(p_vars["params"]["logit_scale"]) * context0["image_features"] @ policy_text.T
  sampled = jax.lax.top_k(logits, TOP_K)[1]
  expected = rlcf.reinforce_loss(logits, sampled,
                                 rlcf.sampled_rewards(sampled, features, (0.56, 0.17)))
  assert float(loss(tunable0, frozen, context, None)) == pytest.approx(float(expected), rel=1e-4)

  episode, tunable0, frozen = make(clips, vocab, objective="kd")
  context = episode.prepare(tunable0, frozen, views[0], None)
  teacher = (np.exp(r_vars["params"]["logit_scale"]) * context0["reward_image_features"][0] @
             reward_text.T)
  assert rel_err(context["teacher_logits"], teacher) < 1e-5
  ours = episode.loss(tunable0, frozen, context, None)
  assert float(ours) == pytest.approx(float(rlcf.kd_loss(logits, teacher)), rel=1e-4)


def test_bad_settings_are_clear_errors(clips, vocab):
  (policy, p_vars), (reward, r_vars) = clips
  rn = clip.Model(**clip.decode_variant("RN-mu"))
  cases = [(dict(mode="text"), "mode='text'"), (dict(objective="pl"), "objective='pl'"),
           (dict(top_k=6), "top_k=6 must be in \\[1, 5\\]"), (dict(ctx_init=""), "ctx_init"),
           (dict(objective="kd", rewards=2), "one teacher; got 2"),
           (dict(rewards=0), "at least one reward CLIP"),
           (dict(mode="image", policy=(rn, None)), "ResNet")]
  for kw, message in cases:
    n = kw.pop("rewards", 1)
    with pytest.raises(ValueError, match=message):
      rlcf.make_episode(kw.pop("policy", (policy, p_vars)), [(reward, r_vars, 1.0)] * n, NAMES,
                        vocab, **kw)
