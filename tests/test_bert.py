"""Tests for jaxprompt/models/bert.py (GLIP's BERT language backbone).

Parity is checked against transformers' PyTorch `BertModel` with random weights at the tiny 'mu'
size; the tokenizer with a vocab.txt written here (no downloads).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file as save_safetensors_torch

from jaxprompt.models import bert

VARIANT = "mu"
LENGTH = 12
LENGTHS = (12, 7, 3)  # valid tokens per row: one full row, two padded


def batch(seed=0):
  rng = np.random.default_rng(seed)
  v = bert.decode_variant(VARIANT)
  ids = rng.integers(1, v["vocab_size"], (len(LENGTHS), LENGTH)).astype(np.int32)
  mask = (np.arange(LENGTH)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = ids * mask  # [PAD] = 0 at padded positions
  types = (np.arange(LENGTH)[None] >= 4).astype(np.int32) * mask
  return ids, mask, types


@functools.cache
def model_and_params(dropout=0.1):
  model = bert.Model(VARIANT, dropout=dropout, attention_dropout=dropout)
  ids, mask, _ = batch()
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)["params"]


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
  """A random transformers BertModel (pooler included), its outputs and its weights on disk."""
  v = bert.decode_variant(VARIANT)
  config = transformers.BertConfig(
      vocab_size=v["vocab_size"], hidden_size=v["width"], num_hidden_layers=v["depth"],
      num_attention_heads=v["num_heads"], intermediate_size=v["mlp_dim"],
      max_position_embeddings=v["max_positions"], type_vocab_size=2, hidden_act="gelu",
      layer_norm_eps=1e-12)
  torch.manual_seed(0)
  hf = transformers.BertModel(config)
  with torch.no_grad():  # biases start at 0 and LayerNorms at (1, 0): perturb them so they count
    for name, p in hf.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))
  hf.eval()
  ids, mask, types = batch()
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
             token_type_ids=torch.from_numpy(types).long()).last_hidden_state.numpy()
  folder = tmp_path_factory.mktemp("bert")
  state = {k: t.contiguous() for k, t in hf.state_dict().items()}
  path = str(folder / "model.safetensors")
  save_safetensors_torch(state, path)
  prefixed = str(folder / "prefixed.pt")
  torch.save({f"bert.{k}": t for k, t in state.items()}, prefixed)
  return dict(out=out, path=path, prefixed=prefixed, state=state)


def test_decode_variant():
  assert bert.decode_variant("base") == dict(depth=12, width=768, num_heads=12, mlp_dim=3072,
                                             max_positions=512, vocab_size=30522)
  with pytest.raises(ValueError, match="'huge'"):
    bert.decode_variant("huge")


def test_parity_with_transformers(hf_bert):
  model, init = model_and_params()
  ids, mask, types = batch()
  for path in (hf_bert["path"], hf_bert["prefixed"]):
    params = bert.load(init, path)
    out = jax.jit(lambda p: model.apply({"params": p}, ids, mask, types))(params)
    valid = mask.astype(bool)
    ours, theirs = np.asarray(out["hidden"]), hf_bert["out"]
    rel = np.abs(ours[valid] - theirs[valid]).max() / np.abs(theirs[valid]).max()
    print(f"BERT parity ({path.rsplit('/', 1)[-1]}): max relative error {rel:.2e}")
    assert rel <= 1e-4, rel
    weights = mask[..., None].astype(np.float32)
    expected_aggregate = (theirs * weights).sum(1) / weights.sum(1)
    np.testing.assert_allclose(out["aggregate"], expected_aggregate, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(out["embedded"])[~valid] == 0)
    np.testing.assert_array_equal(out["embedded"], ours * weights)
    np.testing.assert_array_equal(out["masks"], mask)
    assert out["masks"].dtype == jnp.int32


def test_convert_is_pure_and_flat(hf_bert):
  flat = bert.convert_hf_bert({k: t.numpy() for k, t in hf_bert["state"].items()}, num_heads=2)
  assert flat["encoder/layer_0/attention/query/kernel"].shape == (32, 2, 16)
  assert flat["encoder/layer_1/attention/out/kernel"].shape == (2, 16, 32)
  assert flat["pooler/dense/kernel"].shape == (32, 32)
  gamma = {"bert.embeddings.LayerNorm.gamma": np.ones(3), "cls.predictions.bias": np.ones(3)}
  assert list(bert.convert_hf_bert(gamma, 1)) == ["embeddings/LayerNorm/scale"]
  with pytest.raises(ValueError, match="decoder.weight"):
    bert.convert_hf_bert({"decoder.weight": np.ones(3)}, 1)


def test_load_is_strict(hf_bert, tmp_path):
  _, init = model_and_params()
  state = dict(hf_bert["state"])
  del state["encoder.layer.1.output.dense.bias"]
  state["embeddings.position_embeddings.weight"] = torch.zeros(10, 32)
  path = str(tmp_path / "broken.safetensors")
  save_safetensors_torch(state, path)
  with pytest.raises(ValueError) as error:
    bert.load(init, path)
  message = str(error.value)
  assert "broken.safetensors" in message
  assert "encoder/layer_1/output/bias" in message
  assert "embeddings/position_embeddings/embedding: checkpoint (10, 32) vs expected (64, 32)" in (
      message)
  with pytest.raises(ValueError, match="'params' collection"):
    bert.load({"params": init}, hf_bert["path"])


def test_block_hook():
  model, params = model_and_params()
  ids, mask, types = batch()
  apply = lambda hook: model.apply({"params": params}, ids, mask, types, block_hook=hook)
  plain = apply(None)
  identity = apply(lambda i, block, x: block(x))
  np.testing.assert_array_equal(plain["hidden"], identity["hidden"])
  calls = []

  def shift_after_first(i, block, x):
    calls.append(i)
    y = block(x)
    return y + 1.0 if i == 0 else y

  shifted = apply(shift_after_first)
  assert calls == [0, 1]
  assert np.abs(np.asarray(shifted["hidden"]) - np.asarray(plain["hidden"])).max() > 1e-3


def test_dropout_live_only_in_train():
  model, params = model_and_params()
  ids, mask, types = batch()
  run = lambda train, seed: np.asarray(model.apply(
      {"params": params}, ids, mask, types, train=train,
      rngs={"dropout": jax.random.PRNGKey(seed)})["hidden"])
  eval_out = np.asarray(model.apply({"params": params}, ids, mask, types)["hidden"])
  np.testing.assert_array_equal(run(False, 1), eval_out)
  a, b = run(True, 1), run(True, 2)
  assert not np.allclose(a, b)
  assert not np.allclose(a, eval_out)
  np.testing.assert_array_equal(a, run(True, 1))


def test_sequence_too_long():
  model, params = model_and_params()
  ids = np.ones((1, 65), np.int32)
  with pytest.raises(ValueError, match="65 exceeds the 64 position"):
    model.apply({"params": params}, ids, ids)


def test_tokenize(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\ncat\ndog\n##s\n", encoding="utf-8")
  ids, mask = bert.tokenize(str(vocab), ["A cat", "dogs zebra a a a a a"], max_length=6)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, [[2, 5, 6, 3, 0, 0], [2, 7, 8, 1, 5, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    bert.tokenize(str(tmp_path / "missing.txt"), ["a cat"], max_length=6)
  (tmp_path / "bad.txt").write_text("a\ncat\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.txt.*\[PAD\]"):
    bert.tokenize(str(tmp_path / "bad.txt"), ["a cat"], max_length=6)
