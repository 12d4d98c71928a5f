"""Megatron-style 'model'-axis sharding: data x model meshes on 8 CPU devices give the 1-device
losses of a ViT method (VPT) and a CLIP method (CoOp), the transformer matmuls really split; a model
axis that does not divide a sharded dimension is refused before training; Swin and BERT (slow) give
their 1-device outputs; GLIP's fusion tower splits on GLIP-L's real param shapes (from
`jax.eval_shape`), one layer of its tower gives the 1-device loss and gradients, and a tiny GLIP
trains to the 1-device losses (slow); the mesh takes the same number of devices from every
process."""
from __future__ import annotations

import json
import math
import re
import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

from conftest import run_on_cpu_devices  # pylint: disable=import-error
from jaxprompt import sharding
from jaxprompt.models.glip import detector

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


def assert_split(specs: dict, expected: dict, model: int, context) -> None:
  """`specs` (name -> [spec, shape, device 0's shard shape]) has exactly the `expected` names, each
  with its spec and a shard of 1/model of the dimension named there (None: the whole array)."""
  assert set(specs) == set(expected), (context, sorted(specs))
  for name, (spec, dim) in expected.items():
    got, shape, shard_shape = specs[name]
    assert got == f"P({spec})", (context, name, got)
    if dim is not None:
      shape[dim] //= model
    assert shard_shape == shape, (context, name, shard_shape, shape)


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
      assert_split(specs, expected, model, (method, mesh))
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


def test_glip_l_rules_split_the_fusion_tower_and_name_a_model_axis_too_large():
  """On GLIP-L's param shapes (Swin-L, bert-base, 8 fusion layers; `jax.eval_shape`, nothing run):
  every fusion projection, in-head BERT matmul and DyConv conv is split on the model axis, the
  head's replicated rest is under 2 % of it, and a model axis of 8 is refused (12 BERT heads)."""
  model = detector.Model(num_classes=80, size="L")
  text = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             text, text))["params"]
  assert detector.decode_size("L")["backbone"] == "L"
  mesh = lambda size: AbstractMesh((8 // size, size), (sharding.DATA, sharding.MODEL),
                                   axis_types=(AxisType.Auto, AxisType.Auto))
  for size in (2, 4):
    shardings = sharding.tree_shardings(shapes, mesh(size), "replicate", sharding.MEGATRON_RULES)
    specs = {sharding.path_name(path): (tuple(s.spec), x.shape) for (path, x), s in zip(
        jax.tree_util.tree_flatten_with_path(shapes)[0], jax.tree.leaves(shardings))}
    expected = {  # GLIP-L's 8th fusion layer (tower blocks 21, 22, 23)
        "b_attn/attn/v_proj/kernel": ((None, "model"), (256, 2048)),
        "b_attn/attn/l_proj/kernel": ((None, "model"), (768, 2048)),
        "b_attn/attn/values_v_proj/bias": (("model",), (2048,)),
        "b_attn/attn/values_l_proj/kernel": ((None, "model"), (768, 2048)),
        "b_attn/attn/out_v_proj/kernel": (("model", None), (2048, 256)),
        "b_attn/attn/out_l_proj/kernel": (("model", None), (2048, 768)),
        "b_attn/attn/out_l_proj/bias": ((), (768,)),
        "attention/query/kernel": ((None, "model", None), (768, 12, 64)),
        "attention/out/kernel": (("model", None, None), (12, 64, 768)),
        "intermediate/kernel": ((None, "model"), (768, 3072)),
        "output/kernel": (("model", None), (3072, 768)),
        "DyConv_2/conv/kernel": ((None, None, None, "model"), (3, 3, 256, 256)),
        "DyConv_2/conv/bias": (("model",), (256,)),
        "offset/kernel": ((), (3, 3, 256, 27)),
    }
    for suffix, spec_and_shape in expected.items():
      block = 21 + (suffix.startswith(("attention", "intermediate", "output"))
                    + 2 * suffix.startswith(("DyConv", "offset")))
      assert specs[f"head/dyhead_tower_{block}/{suffix}"] == spec_and_shape, (size, suffix)
    assert specs["backbone/body/layers_3/blocks_1/attn/qkv/kernel"][0] == (None, "model")
    assert specs["language_backbone/encoder/layer_11/intermediate/kernel"][0] == (None, "model")
    # All 8 layers' matmuls and convs, and nothing of the prediction heads.
    split = re.compile(r"b_attn/attn/\w+/kernel|/(attention/\w+|intermediate|output|DyConv_\d/conv)"
                       r"/kernel")
    tower = {n: spec for n, (spec, _) in specs.items() if n.startswith("head/dyhead_tower_")}
    assert sum(1 for n in tower if split.search(n)) == 8 * (6 + 6 + 3)
    assert all(spec for n, spec in tower.items() if split.search(n))
    assert not any(spec for n, (spec, _) in specs.items() if n.startswith("head/heads/"))
    replicated = sum(math.prod(shape) for n, (spec, shape) in specs.items()
                     if n.startswith("head/") and not spec)
    head = sum(math.prod(shape) for n, (_, shape) in specs.items() if n.startswith("head/"))
    assert replicated < 0.02 * head, (replicated, head)
  with pytest.raises(ValueError, match=r"head/dyhead_tower_1/attention/key/bias of shape \(12, "
                                       r"64\).*'model' axis of size 8"):
    sharding.tree_shardings(shapes, mesh(8), "replicate", sharding.MEGATRON_RULES)


GLIP_SCRIPT = r"""
import json

import jax
from configs import glip_coco
from conftest import run_steps
from jaxprompt import sharding, train
from jaxprompt.models import bert, swin
from jaxprompt.models.glip import backbone, detector

# Test-only GLIP: the 'tiny' layout with one block per Swin stage, one fusion layer and 4 heads
# in the fusion and both BERTs, so that a model axis of 2 or 4 splits them by head.
swin.SIZES["q"] = (16, (1, 1, 1, 1), (1, 2, 4, 8))
backbone.VARIANTS["q"] = dict(backbone.VARIANTS["tiny"], swin_variant="q")
bert.SIZES["q"] = (1, 32, 4, 64, 64, 100)
detector.SIZES["q"] = dict(detector.SIZES["tiny"], backbone="q", text="q", layers=1,
                           fusion_heads=4)
WATCHED = ("b_attn/attn/v_proj/kernel", "b_attn/attn/values_l_proj/bias",
           "b_attn/attn/out_v_proj/kernel", "dyhead_tower_1/attention/query/kernel",
           "dyhead_tower_1/output/kernel", "DyConv_1/conv/kernel", "heads/bbox_pred/kernel")

def run(num_devices, model):
  config = glip_coco.get_config("runlocal")
  config.model.size = "q"
  config.pp.train, config.pp.eval = glip_coco.detection_pp(64, 64, 64, 8, size_divisible=0)
  config.batch_size = config.eval_batch_size = 4
  config.mesh.num_devices, config.mesh.model = num_devices, model
  config.sharding_rules = "megatron" if model > 1 else "none"
  state, losses = run_steps(train.build(config), 2)
  specs = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:
    name = sharding.path_name(path)
    for suffix in WATCHED:
      if name.endswith(suffix):
        specs[suffix] = [str(x.sharding.spec), list(x.shape),
                         list(x.addressable_shards[0].data.shape)]
  return losses, specs

print("RESULT" + json.dumps({mesh: run(n, m) for mesh, n, m in
                             (("1x1", 1, 1), ("2x4", 8, 4), ("4x2", 8, 2))}))
"""


@pytest.mark.slow
def test_glip_data_by_model_meshes_match_single_device():
  """A tiny GLIP fine-tuned 2 steps (three train-step compiles of the whole detector, about 4 CPU
  minutes): the 1-device losses on 2x4 and 4x2, fusion, in-head BERT and DyConv really split."""
  result = json.loads(run_on_cpu_devices(GLIP_SCRIPT, 8, timeout=900).split("RESULT")[-1])
  single, _ = result["1x1"]
  expected = {  # name -> (spec, the dimension that each device holds 1/model of)
      "b_attn/attn/v_proj/kernel": ("None, 'model'", 1),
      "b_attn/attn/values_l_proj/bias": ("'model',", 0),
      "b_attn/attn/out_v_proj/kernel": ("'model', None", 0),
      "dyhead_tower_1/attention/query/kernel": ("None, 'model', None", 1),
      "dyhead_tower_1/output/kernel": ("'model', None", 0),
      "DyConv_1/conv/kernel": ("None, None, None, 'model'", 3),
      "heads/bbox_pred/kernel": ("", None),
  }
  for mesh, model in (("2x4", 4), ("4x2", 2)):
    losses, specs = result[mesh]
    assert max(abs(a - b) for a, b in zip(single, losses)) <= 1e-5, (mesh, single, losses)
    assert_split(specs, expected, model, mesh)


GLIP_TOWER_SCRIPT = r"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxprompt import sharding
from jaxprompt.models.glip import dyconv, fusion

class Tower(nn.Module):
  # One layer of GLIP's VL-DyHead tower under detector.VLDyHead's names: VLFuse (8 heads of 4),
  # the in-head BERT layer (4 heads of 8), DyConv (deformable) on 2 pyramid levels.
  @nn.compact
  def __call__(self, levels, hidden, text_mask):
    levels, hidden = fusion.BiAttentionBlock(16, 32, 32, 8, init_values=0.5,
                                             name="dyhead_tower_0")(levels, hidden, text_mask)
    hidden = fusion.ClampedBertLayer(64, 4, name="dyhead_tower_1")(hidden, text_mask)
    return dyconv.DyConv(16, gn_groups=4, name="dyhead_tower_2")(levels), hidden

tower = Tower()
rng = np.random.default_rng(0)
inputs = ([rng.normal(size=(4, side, side, 16)).astype(np.float32) for side in (4, 2)],
          rng.normal(size=(4, 6, 32)).astype(np.float32),
          (np.arange(6) < np.array([[6], [4], [2], [5]])).astype(np.int32))
# Random params of the init's shapes: no init compile, and no zero-initialised leaf.
shapes = jax.eval_shape(tower.init, jax.random.PRNGKey(0), *inputs)["params"]
params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)
names = [sharding.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

def loss_and_grads(params, *inputs):
  outputs = lambda params: jax.tree.leaves(tower.apply({"params": params}, *inputs))
  return jax.value_and_grad(lambda params: sum(jnp.sum(y * y) for y in outputs(params)))(params)

# LLVM's optimisations off: a third less CPU time; XLA partitions the program before they run.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
run = lambda *args: jax.jit(loss_and_grads).lower(*args).compile(FAST_COMPILE)(*args)
single_loss, single_grads = jax.device_get(run(params, *inputs))  # numpy: no eager ops
result = {}
for data, model in ((2, 4), (4, 2)):
  mesh = sharding.make_mesh(8, model)
  placed = jax.device_put(params, sharding.tree_shardings(params, mesh, "replicate",
                                                          sharding.MEGATRON_RULES))
  loss, grads = run(placed, *jax.device_put(inputs, NamedSharding(mesh, P(sharding.DATA))))
  result[f"{data}x{model}"] = dict(
      loss=[float(single_loss), float(loss)],
      grads={name: [float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))] for name, a, b in
             zip(names, jax.tree.leaves(single_grads), jax.tree.leaves(jax.device_get(grads)))},
      specs={name: [str(x.sharding.spec), list(x.shape), list(x.addressable_shards[0].data.shape)]
             for name, x in zip(names, jax.tree.leaves(placed))})
print("RESULT" + json.dumps(result))
"""


def test_glip_tower_rules_keep_the_loss_and_gradients():
  """One layer of GLIP's VL-DyHead tower at tiny widths (VLFuse, the in-head BERT layer, the
  deformable DyConv; the whole detector is the slow test above): with its params split by
  MEGATRON_RULES on 2x4 and 4x2 meshes and the batch over 'data', one jitted forward and backward
  gives the 1-device loss and every param's gradient to 1e-5 relative, and exactly the fusion
  projections, the BERT matmuls and the DyConv convs are split on 'model'."""
  result = json.loads(run_on_cpu_devices(GLIP_TOWER_SCRIPT, 8).split("RESULT")[-1])
  split = {  # name -> (spec, the dimension that each device holds 1/model of); the rest replicated
      **{f"dyhead_tower_0/b_attn/attn/{proj}/{param}": spec
         for proj in ("v_proj", "l_proj", "values_v_proj", "values_l_proj")
         for param, spec in (("kernel", ("None, 'model'", 1)), ("bias", ("'model',", 0)))},
      **{f"dyhead_tower_0/b_attn/attn/{proj}/kernel": ("'model', None", 0)
         for proj in ("out_v_proj", "out_l_proj")},
      **{f"dyhead_tower_1/attention/{proj}/{param}": spec
         for proj in ("query", "key", "value") for param, spec in (
             ("kernel", ("None, 'model', None", 1)), ("bias", ("'model', None", 0)))},
      "dyhead_tower_1/attention/out/kernel": ("'model', None, None", 0),
      "dyhead_tower_1/intermediate/kernel": ("None, 'model'", 1),
      "dyhead_tower_1/intermediate/bias": ("'model',", 0),
      "dyhead_tower_1/output/kernel": ("'model', None", 0),
      **{f"dyhead_tower_2/DyConv_{k}/conv/{param}": spec for k in range(3) for param, spec in (
          ("kernel", ("None, None, None, 'model'", 3)), ("bias", ("'model',", 0)))},
  }
  for mesh, model in (("2x4", 4), ("4x2", 2)):
    single, loss = result[mesh]["loss"]
    assert abs(loss - single) <= 1e-5 * abs(single), (mesh, single, loss)
    grads = result[mesh]["grads"]
    for name, (error, scale) in grads.items():
      if name.endswith("attention/key/bias"):
        # Its exact gradient is 0 (a softmax ignores a shift shared by all of a query's scores):
        # only rounding, measured at the scale of the key kernel's gradient.
        scale = grads[name.replace("bias", "kernel")][1]
      assert scale > 0 and error <= 1e-5 * scale, (mesh, name, error, scale)
    specs = result[mesh]["specs"]
    assert set(split) <= set(specs), (mesh, sorted(set(split) - set(specs)))
    assert_split(specs, {name: split.get(name, ("", None)) for name in specs}, model, mesh)


def test_the_mesh_takes_the_same_devices_from_every_process():
  """`mesh_devices` on two processes' devices listed interleaved (as jax.devices() may)."""
  devices = [types.SimpleNamespace(id=i, process_index=i % 2) for i in range(8)]
  ids = lambda n, model=1: [d.id for d in sharding.mesh_devices(devices, n, model)]
  assert ids(0) == [0, 2, 4, 6, 1, 3, 5, 7]  # process 0's devices first, each in JAX's order
  assert ids(4) == [0, 2, 1, 3]  # two from each process, not process 0's first four
  assert ids(4, 2) == [0, 2, 1, 3]
  with pytest.raises(ValueError, match="num_devices=3 is not a multiple of the 2 processes"):
    ids(3)
  with pytest.raises(ValueError, match="num_devices=10 but only 8 devices exist"):
    ids(10)
  with pytest.raises(ValueError, match="mesh.model=4 does not divide the 2 devices that each of "
                                       "the 2 processes"):
    ids(4, 4)
  with pytest.raises(ValueError, match=r"different device counts \[4, 3\]"):
    sharding.mesh_devices(devices[:7], 0, 1)
  assert [d.id for d in sharding.mesh_devices(devices[:7], 6, 1)] == [0, 2, 4, 1, 3, 5]
