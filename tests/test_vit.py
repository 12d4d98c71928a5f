"""Tests for jaxprompt/models/vit.py and its checkpoint loading (jaxprompt/models/common.py).

Parity is checked against transformers' PyTorch `ViTModel` with random weights; the Google `.npz`
path with files written here in Google's key layout (no downloads).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file as save_safetensors_numpy
from safetensors.torch import save_file as save_safetensors_torch

from jaxprompt.models import common
from jaxprompt.models import vit
from conftest import run_on_cpu_devices  # pylint: disable=import-error

QUERY_KERNEL = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


@functools.cache  # one compile per (model, size, seed); loading never mutates init params
def init_params(model, image_size, seed=0):
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(model.init)(jax.random.PRNGKey(seed), images)["params"]


def zeros_like_init(model, image_size):
  """Init params as zeros from `jax.eval_shape`: skips generating 86M random numbers for B/16."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def randomize_params(tree, seed):
  """Every leaf replaced by N(0, 0.1) noise, so that no name can be confused with another."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), tree)


def hf_vit_config(variant, image_size, **kw):
  v = vit.decode_variant(variant)
  return transformers.ViTConfig(
      hidden_size=v["width"], num_hidden_layers=v["depth"], num_attention_heads=v["num_heads"],
      intermediate_size=v["mlp_dim"], patch_size=v["patch_size"], image_size=image_size,
      hidden_act="gelu", layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, qkv_bias=True, **kw)


def randomize_torch_(model, seed):
  """transformers initialises biases to 0 and LayerNorms to (1, 0): perturb them so they count."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias") or "layernorm" in name:
        p.copy_(0.02 * torch.randn_like(p))
  return model.eval()


def write_npz(path, flat):
  np.savez(path, **{name: np.asarray(value) for name, value in flat.items()})
  return str(path)


# ------------------------------------------------------------------------------------------------
# Parity with transformers' ViTModel at ViT-B/16.


@pytest.fixture(scope="module")
def hf_b16(tmp_path_factory):
  """A random transformers ViT-B/16, its output on 2 images, and its weights in three files."""
  torch.manual_seed(0)
  hf = randomize_torch_(transformers.ViTModel(hf_vit_config("B/16", 224), add_pooling_layer=False),
                        seed=1)
  images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = hf(pixel_values=images).last_hidden_state.numpy()  # (2, 197, 768)
  folder = tmp_path_factory.mktemp("hf_b16")
  hf.save_pretrained(str(folder))  # model.safetensors with the Hub's (legacy) names
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers>=5 names
  save_safetensors_torch(state, str(folder / "state_dict.safetensors"))
  torch.save(state, str(folder / "pytorch_model.bin"))
  model = vit.Model(num_classes=0, variant="B/16")
  return dict(folder=folder, images=jnp.asarray(images.numpy().transpose(0, 2, 3, 1)),
              expected=expected, init=zeros_like_init(model, 224), apply=jax.jit(model.apply))


@pytest.mark.parametrize("filename",
                         ["model.safetensors", "state_dict.safetensors", "pytorch_model.bin"])
def test_parity_with_transformers_vit_b16(hf_b16, filename):
  params = vit.load(hf_b16["init"], hf_b16["folder"] / filename)
  assert common.flatten(params)[QUERY_KERNEL].shape == (768, 12, 64)
  _, aux = hf_b16["apply"]({"params": params}, hf_b16["images"])
  encoded, expected = np.asarray(aux["encoded"]), hf_b16["expected"]
  assert encoded.shape == expected.shape == (2, 197, 768)
  rel_err = np.abs(encoded - expected).max() / np.abs(expected).max()
  print(f"\nmax relative error vs transformers ViTModel ({filename}): {rel_err:.2e}")
  assert rel_err <= 1e-4


def test_parity_with_transformers_classifier_and_pooler(tmp_path):
  """Tiny ViTForImageClassification ('vit.' prefix, classifier -> head); a pooler is dropped."""
  torch.manual_seed(0)
  hf = randomize_torch_(transformers.ViTForImageClassification(
      hf_vit_config("mu/8", 32, num_labels=5)), seed=1)
  images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = hf(pixel_values=images).logits.numpy()
  path = tmp_path / "classifier.safetensors"
  save_safetensors_torch({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
  model = vit.Model(num_classes=5, variant="mu/8")
  params = vit.load(init_params(model, 32), path, dont_load=())
  logits, _ = model.apply({"params": params}, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)

  with_pooler = transformers.ViTModel(hf_vit_config("mu/8", 32), add_pooling_layer=True)
  state = with_pooler.state_dict()
  assert any(name.startswith("pooler.") for name in state)
  torch.save({"model": state}, str(tmp_path / "pooler.pth"))  # training-style wrapper
  model = vit.Model(num_classes=0, variant="mu/8")
  params = vit.load(init_params(model, 32), tmp_path / "pooler.pth")
  np.testing.assert_array_equal(params["cls"], state["embeddings.cls_token"].numpy())


def test_convert_hf_vit_lists_unknown_names():
  state = {"embeddings.cls_token": np.zeros((1, 1, 32)), "foo.weight": np.zeros(3),
           "encoder.layer.0.attention.bogus.weight": np.zeros(3)}
  with pytest.raises(ValueError) as error:
    vit.convert_hf_vit(state, num_heads=2, source="x.safetensors")
  message = str(error.value)
  assert "x.safetensors" in message
  assert "foo.weight" in message and "encoder.layer.0.attention.bogus.weight" in message
  assert "cls_token" not in message

  both_layouts = {"layers.0.mlp.fc1.bias": np.zeros(64),
                  "encoder.layer.0.intermediate.dense.bias": np.zeros(64)}
  with pytest.raises(ValueError, match="both map to .*MlpBlock_3/Dense_0/bias"):
    vit.convert_hf_vit(both_layouts, num_heads=2)


# ------------------------------------------------------------------------------------------------
# Google .npz checkpoints.


def google_checkpoint(image_size=32, seed=0, num_classes=21):
  """Flat params of a random mu/8 model, plus an upstream head and pre_logits, as in a 21k npz."""
  flat = common.flatten(randomize_params(
      init_params(vit.Model(num_classes=num_classes, variant="mu/8"), image_size), seed))
  flat["pre_logits/kernel"] = np.ones((32, 32), np.float32)
  flat["pre_logits/bias"] = np.ones((32,), np.float32)
  return flat


def test_load_google_npz(tmp_path):
  flat = google_checkpoint()
  path = write_npz(tmp_path / "imagenet21k_ViT-mu_8.npz", flat)
  with np.load(path) as npz:
    assert npz[QUERY_KERNEL].shape == (32, 2, 16)  # (D, H, D/H)
    assert npz["head/kernel"].shape == (32, 21)

  model = vit.Model(num_classes=3, variant="mu/8", head_zeroinit=False)
  init = init_params(model, 32, seed=1)
  params = vit.load(init, path)
  loaded, init_flat = common.flatten(params), common.flatten(init)
  assert set(loaded) == set(init_flat)
  for name, value in loaded.items():
    expected = init_flat[name] if name.startswith("head/") else flat[name]
    np.testing.assert_array_equal(value, expected, err_msg=name)
    assert value.dtype == init_flat[name].dtype
  assert np.abs(np.asarray(loaded["head/kernel"])).max() > 0  # really the (non-zero) init head


def test_load_google_npz_nested_matches_flat(tmp_path):
  flat = google_checkpoint()
  nested = vit.load_google_vit_npz(write_npz(tmp_path / "c.npz", flat))
  assert set(common.flatten(nested)) == set(flat)
  assert common.unflatten(common.flatten(nested)).keys() == nested.keys()


def test_pos_embedding_is_resized_for_a_larger_image(tmp_path):
  flat = google_checkpoint(image_size=32)  # 4x4 grid: (1, 17, 32)
  posemb = flat[vit.POSEMB_NAME]
  constant_row = np.linspace(-1, 1, 32, dtype=np.float32)
  posemb = np.concatenate([posemb[:, :1], np.broadcast_to(constant_row, (1, 16, 32))], axis=1)
  flat[vit.POSEMB_NAME] = posemb
  path = write_npz(tmp_path / "c32.npz", flat)

  model = vit.Model(num_classes=0, variant="mu/8")
  params = vit.load(init_params(model, 48), path)  # 6x6 grid
  resized = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert resized.shape == (1, 37, 32)
  np.testing.assert_array_equal(resized[:, 0], posemb[:, 0])  # CLS row kept
  np.testing.assert_allclose(resized[0, 1:], np.broadcast_to(constant_row, (36, 32)), atol=1e-6)
  logits, _ = model.apply({"params": params}, jnp.zeros((2, 48, 48, 3)))
  assert logits.shape == (2, 32)


def test_resize_pos_embedding():
  posemb = np.random.default_rng(0).normal(size=(1, 17, 8)).astype(np.float32)
  np.testing.assert_array_equal(vit.resize_pos_embedding(posemb, 17), posemb)
  resized = vit.resize_pos_embedding(posemb, 50)  # 4x4 -> 7x7
  assert resized.shape == (1, 50, 8)
  # scipy.ndimage.zoom(order=1) is corner-aligned: the four grid corners are kept exactly.
  grid_old, grid_new = posemb[0, 1:].reshape(4, 4, 8), resized[0, 1:].reshape(7, 7, 8)
  np.testing.assert_allclose(grid_new[[0, 0, -1, -1], [0, -1, 0, -1]],
                             grid_old[[0, 0, -1, -1], [0, -1, 0, -1]], rtol=1e-6)
  with pytest.raises(ValueError, match="square"):
    vit.resize_pos_embedding(np.zeros((1, 1 + 12, 8)), 17)
  with pytest.raises(ValueError, match="square"):
    vit.resize_pos_embedding(posemb, 1 + 20)


# ------------------------------------------------------------------------------------------------
# Bad checkpoints and bad configurations.


@pytest.fixture
def mu8_init():
  return init_params(vit.Model(num_classes=0, variant="mu/8"), 32)


def test_missing_keys_are_listed(tmp_path, mu8_init):
  flat = google_checkpoint()
  del flat["Transformer/encoderblock_1/LayerNorm_2/scale"], flat["cls"]
  path = write_npz(tmp_path / "missing.npz", flat)
  with pytest.raises(ValueError) as error:
    vit.load(mu8_init, path)
  message = str(error.value)
  assert path in message and "missing" in message
  assert "Transformer/encoderblock_1/LayerNorm_2/scale" in message
  assert re.search(r"^\s+cls$", message, re.M)


def test_extra_keys_are_listed(tmp_path, mu8_init):
  flat = google_checkpoint()
  flat["Transformer/encoderblock_2/LayerNorm_0/scale"] = np.ones(32, np.float32)
  flat["adapter/kernel"] = np.ones((2, 2), np.float32)
  path = write_npz(tmp_path / "extra.npz", flat)
  with pytest.raises(ValueError) as error:
    vit.load(mu8_init, path)
  message = str(error.value)
  assert path in message
  assert "Transformer/encoderblock_2/LayerNorm_0/scale" in message and "adapter/kernel" in message
  assert not re.search(r"^\s+(head|pre_logits)/", message, re.M)  # dropped, not listed
  # The same extra names are fine once dont_load covers them.
  vit.load(mu8_init, path, dont_load=("head/.*", "adapter/.*", "Transformer/encoderblock_2/.*"))


def test_misshaped_keys_are_listed(tmp_path, mu8_init):
  flat = google_checkpoint()
  flat[QUERY_KERNEL] = np.zeros((32, 4, 8), np.float32)
  flat["embedding/bias"] = np.zeros((33,), np.float32)
  path = write_npz(tmp_path / "shapes.npz", flat)
  with pytest.raises(ValueError) as error:
    vit.load(mu8_init, path)
  message = str(error.value)
  assert path in message
  assert f"{QUERY_KERNEL}: checkpoint (32, 4, 8) vs expected (32, 2, 16)" in message
  assert "embedding/bias: checkpoint (33,) vs expected (32,)" in message


def test_all_problems_in_one_error(tmp_path, mu8_init):
  flat = google_checkpoint()
  del flat["embedding/kernel"]
  flat["extra"] = np.zeros(1, np.float32)
  flat["cls"] = np.zeros((1, 2, 32), np.float32)
  with pytest.raises(ValueError) as error:
    common.merge_params(flat, mu8_init, dont_load=("head/.*", "pre_logits/.*"), source="f.npz")
  message = str(error.value)
  for name in ("f.npz", "embedding/kernel", "extra", "cls: checkpoint (1, 2, 32)"):
    assert name in message


def test_merge_params_keeps_dont_load_from_init_and_casts_dtype():
  init = {"a": {"w": jnp.ones((2,), jnp.bfloat16)}, "prompt": jnp.zeros((3,))}
  loaded = {"a/w": np.array([2.0, 3.0], np.float64), "prompt": np.ones((5,))}
  merged = common.merge_params(loaded, init, dont_load=("prompt",), source="m")
  assert merged["a"]["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(merged["a"]["w"], np.float32), [2.0, 3.0])
  np.testing.assert_array_equal(merged["prompt"], np.zeros(3))


def test_load_rejects_bad_paths(tmp_path, mu8_init):
  with pytest.raises(ValueError, match=r"unknown extension '\.h5'"):
    vit.load(mu8_init, tmp_path / "weights.h5")
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    vit.load(mu8_init, tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    common.load_torch_state_dict(tmp_path / "nope.safetensors")
  (tmp_path / "weights.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"unknown extension '\.ckpt'"):
    common.load_torch_state_dict(tmp_path / "weights.ckpt")
  with pytest.raises(ValueError, match="'params' collection"):
    vit.load({"params": mu8_init}, tmp_path / "x.npz")


def test_load_torch_state_dict_reads_safetensors_without_torch(tmp_path):
  path = str(tmp_path / "w.safetensors")
  save_safetensors_numpy({"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, path)
  state = common.load_torch_state_dict(path)
  assert isinstance(state["a.weight"], np.ndarray) and state["a.weight"].shape == (2, 3)


def test_flatten_unflatten_roundtrip():
  tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
  assert common.flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
  assert common.unflatten(common.flatten(tree)) == tree
  with pytest.raises(ValueError, match="a/b"):
    common.unflatten({"a": 1, "a/b": 2})


def test_image_size_not_divisible_by_patch_raises():
  with pytest.raises(ValueError, match="not divisible by the patch size 8"):
    init_params(vit.Model(num_classes=0, variant="mu/8"), 30)


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/", ""])
def test_unknown_variant_raises(variant):
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit.decode_variant(variant)
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    init_params(vit.Model(num_classes=0, variant=variant), 32)


def test_dropout_drops_at_the_rate_and_rescales():
  x = jnp.ones((128, 512))
  apply = lambda rate, key, y=x: vit.Dropout(rate).apply({}, y, deterministic=False,
                                                        rngs={"dropout": jax.random.PRNGKey(key)})
  out = np.asarray(apply(0.1, 0))
  assert abs((out == 0).mean() - 0.1) < 0.005
  np.testing.assert_allclose(out[out != 0], 1 / 0.9, rtol=1e-6)
  other = np.asarray(apply(0.1, 1))
  assert not np.array_equal(out, other)
  # Masks of two keys are independent: P(both drop) = 0.01, and neighbours are uncorrelated.
  assert abs(((out == 0) & (other == 0)).mean() - 0.01) < 0.002
  dropped = (out == 0).astype(float)
  assert abs(np.corrcoef(dropped[:, :-1].ravel(), dropped[:, 1:].ravel())[0, 1]) < 0.02
  assert abs(np.corrcoef(dropped[:-1].ravel(), dropped[1:].ravel())[0, 1]) < 0.02
  odd = np.asarray(apply(0.5, 0, jnp.ones((64, 33))))
  assert 0.45 < (odd == 0).mean() < 0.55
  np.testing.assert_array_equal(vit.Dropout(0.1).apply({}, x, deterministic=True), x)


def test_counter_bits_are_uniform_and_refuse_too_many_elements():
  bits = np.asarray(vit.counter_bits(jax.random.PRNGKey(3), (256, 300)), np.float64) / 2**32
  assert bits.min() >= 0 and bits.max() < 1
  histogram = np.histogram(bits, bins=16, range=(0, 1))[0]
  assert np.abs(histogram / bits.size - 1 / 16).max() < 0.003
  with pytest.raises(ValueError, match="2\\^32"):
    vit.counter_bits(jax.random.PRNGKey(0), (2**16, 2**16))


def test_dropout_mask_is_the_same_on_8_sharded_devices():
  """The mask depends on each element's global position only, so sharding the batch changes
  nothing (threefry without jax_threefry_partitionable would)."""
  out = run_on_cpu_devices("""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxprompt.models import vit
x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 10, 24)), jnp.float32)
drop = jax.jit(lambda y, key: vit.Dropout(0.3).apply({}, y, deterministic=False,
                                                     rngs={"dropout": key}))
key = jax.random.PRNGKey(5)
single = np.asarray(drop(jax.device_put(x, jax.devices()[0]), key))
mesh = Mesh(np.array(jax.devices()), ("data",))
sharded = drop(jax.device_put(x, NamedSharding(mesh, P("data"))), key)
assert len(sharded.sharding.device_set) == 8
print("EQUAL", np.array_equal(single, np.asarray(sharded)), (single == 0).mean())
""", 8)
  assert "EQUAL True" in out, out
