"""Tests for jaxprompt/models/opt.py, jaxprompt/decoding.py and jaxprompt/models/gpt2_tokenizer.py.

Parity is checked against transformers' PyTorch `OPTForCausalLM` with random weights at the tiny
'mu' size, loaded through `opt.load` from files written here: logits (padding masks, a prefix
before the token embeddings), cached decoding, and `generate`'s beam search and greedy decoding
(token ids and sequence scores). The tokenizer uses a vocabulary generated here (no downloads).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxprompt import decoding
from jaxprompt.models import gpt2_tokenizer
from jaxprompt.models import opt

VARIANT = "mu"
SIZES = opt.decode_variant(VARIANT)
WIDTH = SIZES["width"]


def hf_config(**overrides):
  kwargs = dict(
      vocab_size=SIZES["vocab_size"], hidden_size=WIDTH, num_hidden_layers=SIZES["depth"],
      ffn_dim=SIZES["mlp_dim"], num_attention_heads=SIZES["num_heads"],
      max_position_embeddings=SIZES["max_positions"], word_embed_proj_dim=WIDTH,
      pad_token_id=opt.PAD_TOKEN_ID, bos_token_id=opt.BOS_TOKEN_ID, eos_token_id=opt.BOS_TOKEN_ID)
  kwargs.update(overrides)
  return transformers.OPTConfig(**kwargs)


@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory):
  """A random transformers OPTForCausalLM, its weights and config.json in a folder, and ours."""
  torch.manual_seed(0)
  hf = transformers.OPTForCausalLM(hf_config()).eval()
  with torch.no_grad():  # large enough weights that the logits are far from uniform
    for name, p in hf.named_parameters():
      p.copy_(torch.randn_like(p) * (0.3 if name.endswith("weight") else 0.1)
              + (1.0 if "layer_norm.weight" in name else 0.0))
  folder = tmp_path_factory.mktemp("opt")
  state = {k: v.numpy().copy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
  save_file(state, str(folder / "model.safetensors"))
  (folder / "config.json").write_text(hf.config.to_json_string())
  model = opt.Model(VARIANT)
  init = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 2, WIDTH)))["params"]
  return hf, folder, model, opt.load(init, str(folder)), state


def embed(model, params, ids):
  return np.asarray(model.apply({"params": params}, ids, method=opt.Model.embed))


def relative_error(ours, ref, mask):
  mask = np.asarray(mask, bool)
  return np.abs(np.asarray(ours) - ref)[mask].max() / np.abs(ref[mask]).max()


def test_logits_match_transformers_with_padding_and_prefix(hf_opt):
  hf, _, model, params, _ = hf_opt
  rng = np.random.default_rng(0)
  ids = rng.integers(4, SIZES["vocab_size"], (3, 7))
  mask = np.ones((3, 7), np.int64)
  mask[1, :2] = 0  # left padding: positions restart at the first real token
  mask[2, 5:] = 0  # right padding (RLCF's tokenizer pads right)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
  ours = model.apply({"params": params}, embed(model, params, ids), mask)
  assert relative_error(ours, ref.numpy(), mask) < 1e-4

  prefix = rng.normal(size=(3, 4, WIDTH)).astype(np.float32)
  full_mask = np.concatenate([np.ones((3, 4), np.int64), mask], 1)
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.cat([torch.from_numpy(prefix),
                                      hf.get_input_embeddings()(torch.from_numpy(ids))], 1),
             attention_mask=torch.from_numpy(full_mask)).logits
  inputs = np.concatenate([prefix, embed(model, params, ids)], 1)
  ours = model.apply({"params": params}, inputs, full_mask)
  assert relative_error(ours, ref.numpy(), full_mask) < 1e-4
  # Without a mask every position is attended, as transformers' default.
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
  ours = model.apply({"params": params}, embed(model, params, ids))
  assert relative_error(ours, ref, np.ones_like(mask)) < 1e-4


def test_cached_decoding_equals_full_forward(hf_opt):
  _, _, model, params, _ = hf_opt
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(2, 9, WIDTH)).astype(np.float32)
  mask = np.ones((2, 9), np.int32)
  mask[0, :2] = 0
  full = np.asarray(model.apply({"params": params}, inputs, mask))
  decode = jax.jit(functools.partial(model.apply, method=opt.Model.decode))
  cache = opt.init_cache(model, 2, 12)  # room for 3 positions more than used
  logits, cache = decode({"params": params}, inputs[:, :5], mask[:, :5], cache)
  steps = [logits]
  for t in range(5, 9):  # then one position at a time
    logits, cache = decode({"params": params}, inputs[:, t:t + 1], mask[:, t:t + 1], cache)
    steps.append(logits)
  assert np.asarray(cache["index"]).tolist() == [9, 9]
  assert relative_error(np.concatenate(steps, 1), full, mask) < 1e-5


def prompt_embeds(model, params, rng, batch=3, prefix_length=3):
  """RLCF's generation input: a prefix, then the '</s>' prompt; and the HF inputs for it."""
  prefix = rng.normal(size=(batch, prefix_length, WIDTH)).astype(np.float32)
  bos = np.full((batch, 1), opt.BOS_TOKEN_ID)
  inputs = np.concatenate([prefix, embed(model, params, bos)], 1)
  return inputs, dict(input_ids=torch.from_numpy(bos), inputs_embeds=torch.from_numpy(inputs),
                      attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long))


def frequent_token(hf, hf_inputs, num_beams, max_new_tokens):
  """A token that transformers' beams often produce early: as EOS it ends beams mid-search."""
  with torch.no_grad():
    out = hf.generate(**hf_inputs, num_beams=num_beams, num_return_sequences=num_beams,
                      max_new_tokens=max_new_tokens, eos_token_id=0, do_sample=False)
  tokens, counts = np.unique(out.numpy()[:, 2:6], return_counts=True)
  return int(tokens[np.argmax(counts)])


def check_same_as_generate(ours, reference, batch, num_return_sequences, max_new_tokens,
                           prompt_length):
  sequences = reference.sequences.numpy()[:, prompt_length:]
  tokens = np.asarray(ours["tokens"]).reshape(batch * num_return_sequences, max_new_tokens)
  np.testing.assert_array_equal(tokens[:, :sequences.shape[1]], sequences)
  assert (tokens[:, sequences.shape[1]:] == opt.PAD_TOKEN_ID).all()
  np.testing.assert_allclose(np.asarray(ours["scores"]).reshape(-1),
                             reference.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)


def test_beam_search_equals_transformers_generate(hf_opt):
  hf, _, model, params, _ = hf_opt
  num_beams, max_new_tokens = 4, 10
  inputs, hf_inputs = prompt_embeds(model, params, np.random.default_rng(2))
  eos = frequent_token(hf, hf_inputs, num_beams, max_new_tokens)
  with torch.no_grad():
    reference = hf.generate(**hf_inputs, num_beams=num_beams, num_return_sequences=num_beams,
                            max_new_tokens=max_new_tokens, eos_token_id=eos, do_sample=False,
                            return_dict_in_generate=True, output_scores=True)
  ours = opt.generate_beams(model, params, inputs, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_token_id=eos)
  check_same_as_generate(ours, reference, 3, num_beams, max_new_tokens, 1)
  lengths = np.asarray(ours["lengths"])
  ends_with_eos = np.take_along_axis(np.asarray(ours["tokens"]), lengths[..., None] - 1,
                                     -1)[..., 0] == eos
  assert (ends_with_eos | (lengths == max_new_tokens)).all()
  # The test means something: some beams stop at EOS, others at max_new_tokens.
  assert (lengths < max_new_tokens).any() and (lengths == max_new_tokens).any()


def test_beam_search_with_left_padded_prompts_and_min_new_tokens(hf_opt):
  hf, _, model, params, _ = hf_opt
  rng = np.random.default_rng(3)
  ids = rng.integers(4, SIZES["vocab_size"], (2, 5))
  mask = np.ones((2, 5), np.int64)
  mask[1, :3] = 0
  ids[1, :3] = opt.PAD_TOKEN_ID
  hf_inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  eos = frequent_token(hf, hf_inputs, 3, 8)
  with torch.no_grad():
    reference = hf.generate(**hf_inputs, num_beams=3, num_return_sequences=2, max_new_tokens=8,
                            eos_token_id=eos, min_new_tokens=2, do_sample=False,
                            return_dict_in_generate=True, output_scores=True)
  ours = opt.generate_beams(model, params, embed(model, params, ids), mask, num_beams=3,
                            num_return_sequences=2, max_new_tokens=8, eos_token_id=eos,
                            min_new_tokens=2)
  check_same_as_generate(ours, reference, 2, 2, 8, 5)
  assert (np.asarray(ours["tokens"])[..., :2] != eos).all()


def test_greedy_equals_transformers_generate(hf_opt):
  hf, _, model, params, _ = hf_opt
  inputs, hf_inputs = prompt_embeds(model, params, np.random.default_rng(4), batch=4)
  eos = frequent_token(hf, hf_inputs, 2, 10)
  with torch.no_grad():
    reference = hf.generate(**hf_inputs, num_beams=1, max_new_tokens=10, eos_token_id=eos,
                            do_sample=False).numpy()[:, 1:]
  ours = opt.generate_greedy(model, params, inputs, max_new_tokens=10, eos_token_id=eos)
  tokens = np.asarray(ours["tokens"])
  np.testing.assert_array_equal(tokens[:, :reference.shape[1]], reference)
  ends = [list(row).index(eos) + 1 if eos in row else 10 for row in tokens]
  np.testing.assert_array_equal(np.asarray(ours["lengths"]), ends)
  assert min(ends) < 10


def test_generic_decoding_on_a_counting_decoder():
  """decoding.* only needs step_fn and a batch-leading cache: a decoder whose next token is
  always (last + 1) mod V emits a run that stops at EOS."""
  vocab = 6

  def step_fn(tokens, cache):
    return 5.0 * jax.nn.one_hot((tokens + 1) % vocab, vocab), dict(seen=cache["seen"] + 1)

  first = 5.0 * jax.nn.one_hot(jnp.array([0, 3]), vocab)
  cache = dict(seen=jnp.zeros((2,), jnp.int32))
  greedy = decoding.greedy_search(step_fn, first, cache, max_new_tokens=5, eos_token_id=2,
                                  pad_token_id=9)
  np.testing.assert_array_equal(greedy["tokens"], [[0, 1, 2, 9, 9], [3, 4, 5, 0, 1]])
  np.testing.assert_array_equal(greedy["lengths"], [3, 5])
  beams = jax.jit(lambda f, c: decoding.beam_search(
      step_fn, f, c, num_beams=2, num_return_sequences=1, max_new_tokens=5, eos_token_id=2,
      pad_token_id=9))(first, cache)
  np.testing.assert_array_equal(beams["tokens"][:, 0], greedy["tokens"])


def test_bad_decoding_arguments_are_clear_errors(hf_opt):
  _, _, model, params, _ = hf_opt
  inputs = np.zeros((1, 2, WIDTH), np.float32)
  with pytest.raises(ValueError, match=r"num_beams=65: expected 1 \.\. 64 \(the vocabulary"):
    opt.generate_beams(model, params, inputs, num_beams=65, eos_token_id=3)
  with pytest.raises(ValueError, match="num_return_sequences=3: expected 1 .. num_beams"):
    opt.generate_beams(model, params, inputs, num_beams=2, num_return_sequences=3,
                       eos_token_id=3)
  with pytest.raises(ValueError, match="eos_token_id=64 is not an id"):
    opt.generate_greedy(model, params, inputs, eos_token_id=64)
  with pytest.raises(ValueError, match="exceeds OPT's 64 learned positions"):
    opt.generate_greedy(model, params, inputs, max_new_tokens=63, eos_token_id=3)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\); expected \(1, 2\)"):
    model.apply({"params": params}, inputs, np.ones((1, 3)))


def test_load_errors_name_the_problem(hf_opt, tmp_path):
  _, folder, model, params, state = hf_opt
  # A pytorch_model.bin with the OPTModel names ('decoder.*', no 'model.') and the tied head.
  torch_state = {k.removeprefix("model."): torch.from_numpy(v) for k, v in state.items()}
  torch_state["lm_head.weight"] = torch_state["decoder.embed_tokens.weight"].clone()
  torch.save(torch_state, tmp_path / "pytorch_model.bin")
  loaded = opt.load(params, str(tmp_path / "pytorch_model.bin"))
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))

  def write(name, entries):
    path = tmp_path / name
    save_file(entries, str(path))
    return str(path)

  missing = dict(state)
  del missing["model.decoder.layers.1.fc2.bias"]
  with pytest.raises(ValueError, match=r"missing from the checkpoint \(1\):\n\s+layers_1/fc2/bias"):
    opt.load(params, write("missing.safetensors", missing))
  wrong = dict(state, **{"model.decoder.embed_positions.weight": np.zeros((10, WIDTH), "f4")})
  with pytest.raises(ValueError, match=r"embed_positions/embedding: checkpoint \(10, 32\) vs"):
    opt.load(params, write("wrong.safetensors", wrong))
  untied = dict(state, **{"lm_head.weight": np.ones((SIZES["vocab_size"], WIDTH), "f4")})
  with pytest.raises(ValueError, match="lm_head.weight differs from the token embedding"):
    opt.load(params, write("untied.safetensors", untied))
  projected = dict(state, **{"model.decoder.project_in.weight": np.zeros((WIDTH, 16), "f4")})
  with pytest.raises(ValueError, match="project_in.weight: OPT-350m's layout"):
    opt.load(params, write("projected.safetensors", projected))
  clash = dict(state, **{"decoder.final_layer_norm.bias":
                          state["model.decoder.final_layer_norm.bias"]})
  with pytest.raises(ValueError, match="several entries map to one .*-> final_layer_norm/bias"):
    opt.load(params, write("clash.safetensors", clash))
  with pytest.raises(ValueError, match="not transformers OPT parameters"):
    opt.load(params, write("other.safetensors", dict(state, **{"cls.weight": np.zeros(2, "f4")})))
  (tmp_path / "post_ln").mkdir()
  save_file(state, str(tmp_path / "post_ln" / "model.safetensors"))
  config = json.loads((folder / "config.json").read_text())
  (tmp_path / "post_ln" / "config.json").write_text(json.dumps(dict(config,
                                                                   do_layer_norm_before=False)))
  with pytest.raises(ValueError, match="do_layer_norm_before=False, expected True"):
    opt.load(params, str(tmp_path / "post_ln"))
  (tmp_path / "no_weights").mkdir()
  with pytest.raises(FileNotFoundError, match="has none of"):
    opt.load(params, str(tmp_path / "no_weights"))
  with pytest.raises(ValueError, match="Unknown OPT variant '350m'"):
    opt.decode_variant("350m")


def test_tiny_vocabulary_tokenizes_like_opt(tmp_path):
  words = ["a", "red", "circle", "ci", "circ", "on", "the", "green", "square", "aaa", "aa"]
  tokenizer = gpt2_tokenizer.Tokenizer(gpt2_tokenizer.write_tiny_vocabulary(tmp_path, words))
  assert (tokenizer.bos_token_id, tokenizer.pad_token_id) == (opt.BOS_TOKEN_ID, opt.PAD_TOKEN_ID)
  for word in words:  # every word is one token, at the start of a text and after a space
    assert len(tokenizer.encode(word)) == 1 and len(tokenizer.encode(" " + word)) == 1
  ids, mask = tokenizer(["a red circle\n", "the green square", "naïve café ☕"])
  assert ids[0, :5].tolist() == [opt.BOS_TOKEN_ID, *tokenizer.encode("a red circle"),
                                 tokenizer.newline_token_id]
  assert mask.sum(1).tolist()[:2] == [5, 4] and (ids[mask == 0] == opt.PAD_TOKEN_ID).all()
  assert [tokenizer.decode(row[m == 1]) for row, m in zip(ids, mask)] == [
      "a red circle", "the green square", "naïve café ☕"]
  with pytest.raises(ValueError, match="more than length=3"):
    tokenizer(["a red circle"], length=3)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gpt2_tokenizer.Tokenizer(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="lacks"):
    gpt2_tokenizer.Tokenizer(tmp_path / "empty")
