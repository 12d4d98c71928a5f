"""Checkpoints of the original SA2VP ViT (tommy-xq/SA2VP) as `config.model_init`: `sa2vp.load`.

The file is what the original's `utils.save_model` writes: torch.save of {'model': the training
script's `Dual_model.state_dict()` (the ViT under 'vit_base.', the shared head 'class_head.'),
'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}. The state dicts here are written from
the original's key names and shapes (`vpt_main/src/models/vit_backbones/vit_tinypara.py`) at a
tiny size with random tensors; every value must land in its place in our tree, with the layout
changes written out below. The logits of a real original model are compared by
`benchmarks/sa2vp_original.py --check_parity` (the original's code cannot ship here).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxprompt.models import common
from jaxprompt.prompts import sa2vp

WIDTH, DEPTH, MLP_DIM, HEADS, PATCH, TOKENS, INTER_DIM, CLASSES = 32, 2, 64, 2, 4, 17, 4, 3
HEAD_DIM = WIDTH // HEADS


class NotAllowed:  # an object that a weights-only load must refuse
  pass


def tiny_model(**overrides):
  kwargs = dict(num_classes=CLASSES, variant=f"mu/{PATCH}", inter_dim=INTER_DIM,
                deep_prompt_layers=(1,), cross_attention="acc")
  return sa2vp.Model(**{**kwargs, **overrides})


def init_variables(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))


def original_state_dict(*, inter_dim=INTER_DIM, training_script=True, seed=0) -> dict:
  """A random state dict with the original's keys and shapes (ViT-mu/4 at 16 px, one deep map)."""
  generator = torch.Generator().manual_seed(seed)
  random = lambda *shape: torch.randn(*shape, generator=generator)
  state = {
      "transformer.embeddings.position_embeddings": random(1, TOKENS, WIDTH),
      "transformer.embeddings.cls_token": random(1, 1, WIDTH),
      "transformer.embeddings.ppt": random(1, TOKENS, inter_dim),
      "transformer.embeddings.patch_embeddings.weight": random(WIDTH, 3, PATCH, PATCH),
      "transformer.embeddings.patch_embeddings.bias": random(WIDTH),
      "transformer.embeddings.ppt_proj.weight": random(WIDTH, inter_dim),
      "transformer.embeddings.ppt_proj.bias": random(WIDTH),
      "transformer.encoder.encoder_norm.weight": random(WIDTH),
      "transformer.encoder.encoder_norm.bias": random(WIDTH),
      "transformer.encoder.cross_conv": random(1, WIDTH),
      "transformer.encoder.deep_ppt": random(1, 1, TOKENS, inter_dim),
      "transformer.encoder.deep_proj.0.weight": random(WIDTH, inter_dim),
      "transformer.encoder.deep_proj.0.bias": random(WIDTH),
  }
  for i in range(DEPTH):
    block, cross = f"transformer.encoder.layer.{i}.", f"transformer.encoder.cross_attn.{i}."
    for norm in ("attention_norm", "ffn_norm"):
      state.update({f"{block}{norm}.weight": random(WIDTH), f"{block}{norm}.bias": random(WIDTH)})
    for projection in ("query", "key", "value", "out"):
      state.update({f"{block}attn.{projection}.weight": random(WIDTH, WIDTH),
                    f"{block}attn.{projection}.bias": random(WIDTH)})
    state.update({f"{block}ffn.fc1.weight": random(MLP_DIM, WIDTH),
                  f"{block}ffn.fc1.bias": random(MLP_DIM),
                  f"{block}ffn.fc2.weight": random(WIDTH, MLP_DIM),
                  f"{block}ffn.fc2.bias": random(WIDTH)})
    # Cross_Block i's frozen LN_0 and attention: copies of block i's (its `load_from`).
    for leaf in ("weight", "bias"):
      state[f"{cross}attention_norm.{leaf}"] = state[f"{block}attention_norm.{leaf}"].clone()
      for copy, projection in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                               ("to_out", "out")):
        state[f"{cross}attn.{copy}.{leaf}"] = state[f"{block}attn.{projection}.{leaf}"].clone()
    state.update({f"{cross}ffn_norm.weight": random(WIDTH), f"{cross}ffn_norm.bias": random(WIDTH),
                  f"{cross}ffn.fc1.weight": random(inter_dim, WIDTH),
                  f"{cross}ffn.fc1.bias": random(inter_dim),
                  f"{cross}ffn.fc2.weight": random(WIDTH, inter_dim),
                  f"{cross}ffn.fc2.bias": random(WIDTH)})
  if not training_script:  # a bare VisionTransformer(num_classes=C)
    return {**state, "head.weight": random(CLASSES, WIDTH), "head.bias": random(CLASSES)}
  return {**{f"vit_base.{k}": v for k, v in state.items()},
          "class_head.weight": random(CLASSES, WIDTH), "class_head.bias": random(CLASSES)}


def save_checkpoint(path, state, **extra):
  """torch.save as the original's `utils.save_model` (optimizer and scaler states abridged)."""
  torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
              "epoch": "best", "scaler": {"scale": 65536.0},
              "args": argparse.Namespace(lr=1e-3, nb_classes=CLASSES, output_dir="./model_save"),
              **extra}, path)
  return str(path)


def expected_params(state: dict) -> dict:
  """Our flat params from the original's tensors: Linear (out, in) -> (in, out), the attention's
  heads split head-major (query/key/value (D, H, D/H), out (H, D/H, D)), Conv2d OIHW -> HWIO."""
  get = lambda key: state[key].numpy()
  prefix = "vit_base." if "class_head.weight" in state else ""
  head = "class_head" if prefix else "head"
  embeddings, encoder = f"{prefix}transformer.embeddings.", f"{prefix}transformer.encoder."
  ours = {
      "embedding/kernel": get(f"{embeddings}patch_embeddings.weight").transpose(2, 3, 1, 0),
      "embedding/bias": get(f"{embeddings}patch_embeddings.bias"),
      "cls": get(f"{embeddings}cls_token"),
      "Transformer/posembed_input/pos_embedding": get(f"{embeddings}position_embeddings"),
      "Transformer/ppt": get(f"{embeddings}ppt"),
      "Transformer/ppt_proj/kernel": get(f"{embeddings}ppt_proj.weight").T,
      "Transformer/ppt_proj/bias": get(f"{embeddings}ppt_proj.bias"),
      "Transformer/encoder_norm/scale": get(f"{encoder}encoder_norm.weight"),
      "Transformer/encoder_norm/bias": get(f"{encoder}encoder_norm.bias"),
      "Transformer/cross_conv": get(f"{encoder}cross_conv"),
      "Transformer/deep_ppt": get(f"{encoder}deep_ppt"),
      "Transformer/deep_proj_0/kernel": get(f"{encoder}deep_proj.0.weight").T,
      "Transformer/deep_proj_0/bias": get(f"{encoder}deep_proj.0.bias"),
      "head/kernel": get(f"{head}.weight").T,
      "head/bias": get(f"{head}.bias"),
  }
  for i in range(DEPTH):
    block, cross = f"{encoder}layer.{i}.", f"{encoder}cross_attn.{i}."
    ours_block, ours_cross = f"Transformer/encoderblock_{i}/", f"Transformer/cross_block_{i}/"
    for norm, ours_norm in (("attention_norm", "LayerNorm_0"), ("ffn_norm", "LayerNorm_2")):
      ours[f"{ours_block}{ours_norm}/scale"] = get(f"{block}{norm}.weight")
      ours[f"{ours_block}{ours_norm}/bias"] = get(f"{block}{norm}.bias")
    attention = f"{ours_block}MultiHeadDotProductAttention_1/"
    for projection in ("query", "key", "value"):
      ours[f"{attention}{projection}/kernel"] = get(f"{block}attn.{projection}.weight").T.reshape(
          WIDTH, HEADS, HEAD_DIM)
      ours[f"{attention}{projection}/bias"] = get(f"{block}attn.{projection}.bias").reshape(
          HEADS, HEAD_DIM)
    ours[f"{attention}out/kernel"] = get(f"{block}attn.out.weight").T.reshape(
        HEADS, HEAD_DIM, WIDTH)
    ours[f"{attention}out/bias"] = get(f"{block}attn.out.bias")
    for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
      ours[f"{ours_block}MlpBlock_3/{dense}/kernel"] = get(f"{block}ffn.{fc}.weight").T
      ours[f"{ours_block}MlpBlock_3/{dense}/bias"] = get(f"{block}ffn.{fc}.bias")
      ours[f"{ours_cross}ffn/{dense}/kernel"] = get(f"{cross}ffn.{fc}.weight").T
      ours[f"{ours_cross}ffn/{dense}/bias"] = get(f"{cross}ffn.{fc}.bias")
    ours[f"{ours_cross}ffn_norm/scale"] = get(f"{cross}ffn_norm.weight")
    ours[f"{ours_cross}ffn_norm/bias"] = get(f"{cross}ffn_norm.bias")
  return ours


@pytest.fixture(scope="module")
def variables():
  return init_variables(tiny_model())


def load(variables, path):  # config.model_init=path
  return sa2vp.METHOD.loaders["model"](variables, path)


@pytest.mark.parametrize("training_script", [True, False], ids=["save_model", "bare_vit"])
def test_every_value_lands_in_place(tmp_path, variables, training_script):
  state = original_state_dict(training_script=training_script)
  path = save_checkpoint(tmp_path / "checkpoint-best.pth", state)
  loaded = common.flatten(load(variables, path)["params"])
  expected = expected_params(state)
  assert sorted(loaded) == sorted(expected)
  for name, value in expected.items():
    assert loaded[name].dtype == jnp.float32, name
    np.testing.assert_array_equal(np.asarray(loaded[name]), value, err_msg=name)


def test_a_different_inter_dim_is_refused_naming_file_and_key(tmp_path, variables):
  path = save_checkpoint(tmp_path / "d8.pth", original_state_dict(inter_dim=8))
  with pytest.raises(ValueError) as error:
    load(variables, path)
  message = str(error.value)
  assert path in message
  assert ("vit_base.transformer.embeddings.ppt: checkpoint (1, 17, 8) vs expected (1, 17, 4) "
          "(for Transformer/ppt)") in message
  assert "vit_base.transformer.encoder.cross_attn.1.ffn.fc1.weight: checkpoint (8, 32)" in message
  assert "model.inter_dim" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, variables):
  state = original_state_dict()
  del state["vit_base.transformer.encoder.deep_ppt"], state["class_head.bias"]
  state["vit_base.transformer.encoder.deep_proj.1.weight"] = torch.zeros(WIDTH, INTER_DIM)
  path = save_checkpoint(tmp_path / "edited.pth", state)
  with pytest.raises(ValueError, match="missing from the checkpoint") as error:
    load(variables, path)
  message = str(error.value)
  assert "vit_base.transformer.encoder.deep_ppt (1, 1, 17, 4) (for Transformer/deep_ppt)" in message
  assert "class_head.bias (3,) (for head/bias)" in message
  assert "in the checkpoint but not in the model (1):\n    " \
         "vit_base.transformer.encoder.deep_proj.1.weight" in message


def test_a_cross_adapter_copy_unlike_its_block_is_refused(tmp_path, variables):
  state = original_state_dict()
  state["vit_base.transformer.encoder.cross_attn.1.attn.to_v.bias"] += 1.0
  with pytest.raises(ValueError, match=r"cross_attn\.1\.attn\.to_v\.bias differs from vit_base\."
                                       r"transformer\.encoder\.layer\.1\.attn\.value\.bias"):
    load(variables, save_checkpoint(tmp_path / "copy.pth", state))


def test_not_an_original_vit_checkpoint(tmp_path, variables):
  swin = {"vit_base.patch_embed.deep_ppt": torch.zeros(1, 3136, 8),
          "vit_base.layers.0.blocks.0.attn.qkv.weight": torch.zeros(384, 128),
          "class_head.weight": torch.zeros(CLASSES, 1024)}
  path = save_checkpoint(tmp_path / "swin.pth", swin)
  with pytest.raises(ValueError, match="not a checkpoint of the original SA2VP on ViT.*"
                                       "vit_base.layers.0.blocks.0.attn.qkv.weight"):
    load(variables, path)
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    load(variables, str(tmp_path / "absent.pth"))


def test_only_namespace_args_are_allowed_beside_the_tensors(tmp_path, variables):
  path = save_checkpoint(tmp_path / "object.pth", original_state_dict(), extra=NotAllowed())
  with pytest.raises(ValueError, match="NotAllowed.*could run code"):
    load(variables, path)


def test_a_hugging_face_vit_still_loads_as_a_backbone(tmp_path, variables):
  """`load` tells the original's files apart by their keys; a transformers ViT (>= 5 names) loads
  the backbone only, the SA2VP params keeping their init."""
  generator = torch.Generator().manual_seed(0)
  random = lambda *shape: torch.randn(*shape, generator=generator)
  state = {"embeddings.cls_token": random(1, 1, WIDTH),
           "embeddings.position_embeddings": random(1, TOKENS, WIDTH),
           "embeddings.patch_embeddings.projection.weight": random(WIDTH, 3, PATCH, PATCH),
           "embeddings.patch_embeddings.projection.bias": random(WIDTH),
           "layernorm.weight": random(WIDTH), "layernorm.bias": random(WIDTH)}
  for i in range(DEPTH):
    square = (WIDTH, WIDTH)
    for module, shape in (("attention.q_proj", square), ("attention.k_proj", square),
                          ("attention.v_proj", square), ("attention.o_proj", square),
                          ("mlp.fc1", (MLP_DIM, WIDTH)), ("mlp.fc2", (WIDTH, MLP_DIM)),
                          ("layernorm_before", (WIDTH,)), ("layernorm_after", (WIDTH,))):
      state[f"layers.{i}.{module}.weight"] = random(*shape)
      state[f"layers.{i}.{module}.bias"] = random(shape[0])
  path = tmp_path / "pytorch_model.bin"
  torch.save(state, path)
  init = jax.tree.map(lambda x: np.full(x.shape, 7.0, x.dtype), variables)  # the 'init' values
  loaded = common.flatten(load(init, str(path))["params"])
  np.testing.assert_array_equal(loaded["cls"], state["embeddings.cls_token"].numpy())
  np.testing.assert_array_equal(loaded["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
                                state["layers.1.mlp.fc1.weight"].numpy().T)
  for name in ("Transformer/ppt", "Transformer/cross_block_1/ffn/Dense_0/kernel", "head/kernel"):
    assert (np.asarray(loaded[name]) == 7.0).all(), name
