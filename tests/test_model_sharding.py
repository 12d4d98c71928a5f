"""Megatron-style 'model'-axis sharding: data x model meshes on 8 CPU devices give the 1-device
losses of a ViT method (VPT) and a CLIP method (CoOp), the transformer matmuls really split; a model
axis that does not divide a sharded dimension is refused before training; Swin and BERT (slow) give
their 1-device outputs."""
from __future__ import annotations

import json

import pytest

from conftest import run_on_cpu_devices  # pylint: disable=import-error

SCRIPT = r"""
import json

import pytest
import jax
from configs import coop, vpt_vtab
from conftest import run_steps
from jaxprompt import config_checks, sharding, train
from jaxprompt.models import clip, vit

# Test-only sizes: one block, 4 heads and MLP widths that a model axis of 2 or 4 divides ('mu' has
# 2 heads).
vit.SIZES["q"] = (32, 1, 64, 4)
clip.SIZES["ViT-q/8"] = (16, 32, 1, 32, 4, 8, 32, 4, 1)

def vpt_config():
  config = vpt_vtab.get_config("runlocal")
  config.model.variant = "q/16"
  config.optim.lr = 0.02  # the losses stay near log(10) and comparable
  return config

def coop_config():
  config = coop.get_config("runlocal")
  config.model.variant = "ViT-q/8"
  return config

WATCHED = ("MultiHeadDotProductAttention_1/query/kernel",
           "MultiHeadDotProductAttention_1/out/kernel", "MlpBlock_3/Dense_0/kernel",
           "MlpBlock_3/Dense_0/bias", "MlpBlock_3/Dense_1/kernel",
           "attn/value/kernel", "attn/value/bias", "mlp/c_fc/kernel", "mlp/c_proj/kernel",
           "prompt_embeddings", "ctx")

def run(make_config, num_devices, model, steps=2):
  config = make_config()
  config.mesh.num_devices, config.mesh.model = num_devices, model
  config.sharding_rules = "megatron" if model > 1 else "none"
  config.total_steps = steps
  state, losses = run_steps(train.build(config), steps)
  specs = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
    name = sharding.path_name(path)
    suffix = next((w for w in WATCHED if name.endswith(w)), None)
    if suffix and suffix not in specs:
      specs[suffix] = [str(x.sharding.spec), list(x.shape),
                       list(x.addressable_shards[0].data.shape)]
  return losses, specs, sharding.bytes_on_device(state["params"], jax.devices()[0])

def error(make_config, **settings):
  config = make_config()
  for key, value in settings.items():
    config[key] = value
  try:
    train.build(config)
  except ValueError as e:
    return str(e)
  return "no error"

result = {f"{name}_{mesh}": run(make, n, m)
          for name, make in (("vpt", vpt_config), ("coop", coop_config))
          for mesh, n, m in (("1x1", 1, 1), ("2x4", 8, 4), ("4x2", 8, 2))}
result["bad_divisor"] = error(vpt_config, mesh=dict(num_devices=8, model=8),
                              sharding_rules="megatron", batch_size=1)
result["no_rules"] = error(vpt_config, mesh=dict(num_devices=8, model=2))
print("RESULT" + json.dumps(result))
"""


def test_data_by_model_meshes_match_single_device_and_split_the_matmuls():
  result = json.loads(run_on_cpu_devices(SCRIPT, 8, timeout=600).split("RESULT")[-1])
  for method in ("vpt", "coop"):
    single, _, single_bytes = result[f"{method}_1x1"]
    for mesh, model in (("2x4", 4), ("4x2", 2)):
      losses, specs, device_bytes = result[f"{method}_{mesh}"]
      assert max(abs(a - b) for a, b in zip(single, losses)) <= 1e-5, (method, mesh, single, losses)
      expected = {  # name -> (spec, the dimension that each device holds 1/model of)
          "MultiHeadDotProductAttention_1/query/kernel": ("None, 'model', None", 1),
          "MultiHeadDotProductAttention_1/out/kernel": ("'model', None, None", 0),
          "MlpBlock_3/Dense_0/kernel": ("None, 'model'", 1),
          "MlpBlock_3/Dense_0/bias": ("'model',", 0),
          "MlpBlock_3/Dense_1/kernel": ("'model', None", 0),
          "prompt_embeddings": ("", None),
      } if method == "vpt" else {
          "attn/value/kernel": ("None, 'model', None", 1),
          "attn/value/bias": ("'model', None", 0),
          "mlp/c_fc/kernel": ("None, 'model'", 1),
          "mlp/c_proj/kernel": ("'model', None", 0),
          "ctx": ("", None),
      }
      assert set(specs) == set(expected), (method, sorted(specs))
      for name, (spec, dim) in expected.items():
        got, shape, shard_shape = specs[name]
        assert got == f"P({spec})", (method, mesh, name, got)
        if dim is not None:
          shape[dim] //= model
        assert shard_shape == shape, (method, mesh, name, shard_shape, shape)
    # Device 0 holds less of the params the larger the model axis.
    assert result[f"{method}_2x4"][2] < result[f"{method}_4x2"][2] < single_bytes, method
  bad = result["bad_divisor"]  # 4 heads on a model axis of 8
  assert "encoderblock_0/MultiHeadDotProductAttention_1/key/bias of shape (4, 8)" in bad, bad
  assert "'model' axis of size 8" in bad, bad
  assert "sharding_rules" in result["no_rules"] and "mesh.model > 1" in result["no_rules"]


BACKBONES_SCRIPT = r"""
import json

import pytest
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxprompt import sharding
from jaxprompt.models import bert, swin

bert.SIZES["q"] = (1, 32, 4, 64, 64, 100)  # 4 heads (BERT 'mu' has 2)
rng = np.random.default_rng(0)
tokens = rng.integers(0, 100, (4, 12)).astype(np.int32)
mask = (np.arange(12)[None] < np.array([[12], [7], [3], [10]])).astype(np.int32)
backbones = {
    "swin": (swin.Model(num_classes=0, variant="mu", window_size=2),
             (rng.normal(size=(4, 64, 64, 3)).astype(np.float32),)),
    "bert": (bert.Model(variant="q"), (tokens, mask)),
}
WATCHED = ("attn/qkv/kernel", "attn/proj/kernel", "mlp/fc1/bias", "mlp/fc2/kernel",
           "attention/query/kernel", "attention/out/kernel", "intermediate/kernel",
           "output/kernel")
result = {}
for name, (model, inputs) in backbones.items():
  variables = model.init(jax.random.PRNGKey(0), *inputs)
  forward = jax.jit(lambda v, *x: jax.tree.leaves(model.apply(v, *x)))
  single = forward(variables, *inputs)
  for data, model_axis in ((2, 4), (4, 2)):
    mesh = sharding.make_mesh(8, model_axis)
    shardings = sharding.tree_shardings(variables, mesh, "replicate", sharding.MEGATRON_RULES)
    inputs_ = [jax.device_put(x, NamedSharding(mesh, P(sharding.DATA))) for x in inputs]
    out = forward(jax.device_put(variables, shardings), *inputs_)
    error = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))) /
                      (np.max(np.abs(np.asarray(a, np.float32))) + 1e-9))
                for a, b in zip(single, out))
    specs = {sharding.path_name(p): str(s.spec)
             for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    watched = {w: next(spec for n, spec in sorted(specs.items()) if n.endswith(w))
               for w in WATCHED if any(n.endswith(w) for n in specs)}
    result[f"{name}_{data}x{model_axis}"] = [error, watched]
print("RESULT" + json.dumps(result))
"""


@pytest.mark.slow
def test_swin_and_bert_rules_keep_the_outputs():
  """GLIP-L's backbones (about 40 s of compiles on 2 cores): the same outputs on 2x4 and 4x2."""
  result = json.loads(run_on_cpu_devices(BACKBONES_SCRIPT, 8).split("RESULT")[-1])
  expected = {
      "swin": {"attn/qkv/kernel": "P(None, 'model')", "attn/proj/kernel": "P('model', None)",
               "mlp/fc1/bias": "P('model',)", "mlp/fc2/kernel": "P('model', None)"},
      "bert": {"attention/query/kernel": "P(None, 'model', None)",
               "attention/out/kernel": "P('model', None, None)",
               "intermediate/kernel": "P(None, 'model')", "output/kernel": "P('model', None)"},
  }
  for name, specs in expected.items():
    for mesh in ("2x4", "4x2"):
      error, watched = result[f"{name}_{mesh}"]
      assert error <= 1e-5, (name, mesh, error)
      assert watched == specs, (name, mesh, watched)
