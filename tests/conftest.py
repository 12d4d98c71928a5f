"""Helpers shared by the tests (import them with `from conftest import ...`): a tiny VPT config
with overrides, the first training batches of an experiment, a few real train steps, and the
check that only trainable params changed, and a script run on N forced CPU devices."""
import os
import shutil
import subprocess
import sys
import tempfile

# XLA's persistent compilation cache for the whole session, this process and every subprocess a
# test starts (they inherit the environment): many tests compile the same tiny models' programs,
# and on a 2-core CPU the compiles are most of the suite's time. Set before jax is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE_DIR = tempfile.mkdtemp(prefix="jaxprompt-tests-xla-cache-")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_XLA_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
else:
  _XLA_CACHE_DIR = None

import numpy as np  # pylint: disable=wrong-import-position

from configs import vpt_vtab  # pylint: disable=wrong-import-position
from input_pipeline import pipeline  # pylint: disable=wrong-import-position
from jaxprompt import optim, sharding  # pylint: disable=wrong-import-position


def pytest_unconfigure(config):
  """Removes the session's compilation cache (only the one this conftest made)."""
  del config
  if _XLA_CACHE_DIR is not None:
    shutil.rmtree(_XLA_CACHE_DIR, ignore_errors=True)


def tiny_config(**overrides):
  """`configs/vpt_vtab.py:runlocal` (the embedded demo, 4 steps) with dotted-key overrides."""
  config = vpt_vtab.get_config("runlocal")
  config.unlock()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def train_batches(exp, n: int, seed: int = 0) -> list:
  """The first `n` global training batches of the experiment's own stream."""
  it = pipeline.make_train_dataset(
      exp.data.source, exp.config.train_split, exp.data.train_pp,
      global_batch_size=exp.config.batch_size, seed=seed).as_numpy_iterator()
  return [sharding.global_batch(next(it), exp.mesh) for _ in range(n)]


def run_steps(exp, steps: int, seed: int = 0):
  """(state after `steps` train steps from exp.state, the losses)."""
  state, losses = exp.state, []
  for batch in train_batches(exp, steps, seed):
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def assert_only_trainable_changed(before: dict, after: dict, labels: dict) -> None:
  """Flat '/'-named params: every 'train' leaf changed and every frozen leaf is bit-identical."""
  for name, value in after.items():
    same_bits = np.array_equal(np.asarray(value).view(np.uint32),
                               np.asarray(before[name]).view(np.uint32))
    assert same_bits == (labels[name] == optim.FROZEN), name


def run_on_cpu_devices(code: str, devices: int, timeout: int = 300) -> str:
  """Runs `code` in a fresh Python with `devices` forced host CPU devices, the repository and
  tests/ importable; returns its stdout, or fails the test with the tail of its output."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]))
  proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


def tiny_hf_clip(*, vocab_size: int = 49408, logit_scale: float = 100.0):
  """A random transformers CLIPModel at ViT-mu/8 sizes (2 layers, width 32, 32 px, embedding 16),
  in eval mode, its norms and biases perturbed so that they count in a parity test."""
  import math  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel  (only the parity tests need it)
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.CLIPConfig(
      vision_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2,
                         num_hidden_layers=2, patch_size=8, image_size=32),
      text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2,
                       num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77),
      projection_dim=16)
  torch.manual_seed(0)
  hf = transformers.CLIPModel(config).eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" in name or "layrnorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn(p.shape, generator=generator))
    hf.logit_scale.fill_(math.log(logit_scale))
  return hf
