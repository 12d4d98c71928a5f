"""Data-parallel and FSDP runs on 8 CPU devices give the 1-device losses (fresh process each)."""
import json

from conftest import run_on_cpu_devices  # pylint: disable=import-error

SCRIPT = r"""
import json, sys
import jax, numpy as np
from configs import vpt_vtab
from conftest import run_steps
from jaxprompt import train

def losses(num_devices, strategy, steps=4):
  config = vpt_vtab.get_config("runlocal")
  config.mesh.num_devices = num_devices
  config.model.variant = "Ti/8"  # big enough that FSDP shards its matrices
  config.param_sharding = strategy
  config.total_steps = steps
  config.optim.lr = 0.02  # a sane step size: the losses stay near log(10) and comparable
  state, out = run_steps(train.build(config), steps)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
  return out, sorted(specs)

result = {name: losses(n, s) for name, (n, s) in
          {"single": (1, "replicate"), "dp8": (8, "replicate"), "fsdp8": (8, "fsdp")}.items()}
try:
  config = vpt_vtab.get_config("runlocal")
  config.batch_size = 12
  train.build(config)
  result["bad_batch"] = "no error"
except ValueError as e:
  result["bad_batch"] = str(e)
print("RESULT" + json.dumps(result))
"""


def test_data_parallel_and_fsdp_match_single_device():
  result = json.loads(run_on_cpu_devices(SCRIPT, 8, timeout=600).split("RESULT")[-1])
  single, _ = result["single"]
  for name in ("dp8", "fsdp8"):
    losses, _ = result[name]
    assert max(abs(a - b) for a, b in zip(single, losses)) <= 1e-5, (name, single, losses)
  # FSDP really shards some params over the data axis; data parallel replicates them all.
  assert any("data" in spec for spec in result["fsdp8"][1])
  assert not any("data" in spec for spec in result["dp8"][1])
  assert "batch_size=12" in result["bad_batch"] and "8 devices" in result["bad_batch"]
