"""The DGL configs (configs/dgl_*.py): every method and benchmark resolves to a checked config whose
pp specs build; the demos train and evaluate end to end (single- and multi-sentence); the
zero-shot baseline evaluates the random init only when asked to; real data needs a vocabulary; the
contrastive loss spans the global batch on 8 devices."""
import importlib
import json

import pytest

from input_pipeline import preprocess
from jaxprompt import config_checks, train
from conftest import run_on_cpu_devices  # pylint: disable=import-error

BENCHMARKS = ("msrvtt", "vatex", "lsmdc", "activitynet")
METHODS = ("dgl", "zeroshot", "clip4clip", "vpt_coop")


def get_config(benchmark: str, arg=None):
  return importlib.import_module(f"configs.dgl_{benchmark}").get_config(arg)


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_method_resolves(benchmark):
  for method in METHODS:
    for arg in (f"method={method}", f"method={method},data=/data,vocab=/vocab.txt.gz"):
      config = get_config(benchmark, arg)
      config_checks.check_spine(config)
      demo = "data=" not in arg
      assert config.mode == ("eval" if method == "zeroshot" else "train")
      assert config.get("eval_random_init") == (method == "zeroshot" and demo)
      assert config.evals.test.type == "video_retrieval"
      assert config.keep_best == ("test/t2v_R@1", "max")
      if demo:  # the real specs name a vocabulary that is not here
        for key in ("train", "eval"):
          preprocess.make_preprocess_fn(config.pp[key])
  real = get_config(benchmark, "data=/data,vocab=/vocab.txt.gz")
  assert "center_crop(224)" in real.pp.train and real.model.vocab_path == "/vocab.txt.gz"
  assert real.optim.warmup_epochs == pytest.approx(0.1 * real.num_epochs)
  assert (real.optim.b1, real.optim.b2, real.optim.eps) == (0.9, 0.98, 1e-6)


def test_the_originals_settings_per_benchmark():
  """knightyxp/DGL scripts/*.sh: latent space, lr, epochs, batch, frames, words, sampling."""
  expected = {"msrvtt": ("transformer", 2e-3, 5, 512, 12, 32, "segments"),
              "vatex": ("linear", 5e-3, 10, 512, 12, 32, "centre"),
              "lsmdc": ("linear", 1e-2, 10, 512, 12, 32, "segments"),
              "activitynet": ("linear", 1e-2, 10, 128, 64, 64, "segments")}
  for benchmark, (latent, lr, epochs, batch, frames, words, sampling) in expected.items():
    config = get_config(benchmark, "data=/data,vocab=/v")
    assert (config.model.latent_space, config.optim.lr, config.num_epochs, config.batch_size,
            config.model.num_frames) == (latent, lr, epochs, batch, frames)
    assert config.pp.train.startswith(f"sample_frames_{sampling}({frames})")
    assert f"context_length={words}" in config.pp.train
  assert "max_captions=10" in get_config("vatex", "data=/d,vocab=/v").pp.eval
  clip4clip = get_config("msrvtt", "method=clip4clip,data=/d,vocab=/v")
  assert clip4clip.optim.lr == pytest.approx(1e-7)  # CLIP4Clip: lr 1e-4 x coef_lr 1e-3


def test_real_data_without_a_vocabulary_is_refused():
  with pytest.raises(ValueError, match="vocab="):
    get_config("msrvtt", "data=/data/msrvtt")
  with pytest.raises(ValueError, match="method='dpl'"):
    get_config("msrvtt", "method=dpl")


@pytest.mark.parametrize("benchmark,captions", [("msrvtt", 60), ("vatex", 180)])
def test_the_demo_trains_and_evaluates(benchmark, captions, tmp_path):
  config = get_config(benchmark, "runlocal")
  final = train.train_and_evaluate(config, str(tmp_path / "dgl"))
  assert final["step"] == config.total_steps
  assert final["test/examples"] == 60 and final["test/captions"] == captions
  for direction in ("t2v", "v2t"):
    for metric in ("R@1", "R@5", "R@10", "MdR", "MnR"):
      assert f"test/{direction}_{metric}" in final
  assert 0.0 <= final["test/t2v_R@1"] <= final["test/t2v_R@5"] <= final["test/t2v_R@10"] <= 100


def test_zero_shot_evaluates_the_random_init_only_when_asked(tmp_path):
  # VATEX's test split batches (captions, L) tokens per video; the model is built from train's.
  vatex = train.train_and_evaluate(get_config("vatex", "method=zeroshot,runlocal"),
                                   str(tmp_path / "vatex"))
  assert vatex["step"] == 0 and vatex["test/captions"] == 180
  config = get_config("msrvtt", "method=zeroshot,runlocal")
  final = train.train_and_evaluate(config, str(tmp_path / "zeroshot"))
  assert final["step"] == 0 and "test/t2v_R@1" in final
  config.unlock()
  config.eval_random_init = False
  with pytest.raises(FileNotFoundError, match="eval_random_init"):
    train.train_and_evaluate(config, str(tmp_path / "no_weights"))
  config.mode = "train"
  config.eval_random_init = True
  with pytest.raises(config_checks.ConfigError, match="eval_random_init"):
    config_checks.check_spine(config)


EIGHT_DEVICES = r"""
import json
from configs import dgl_msrvtt
from conftest import run_steps
from jaxprompt import train

def losses(num_devices, steps=3):
  config = dgl_msrvtt.get_config("runlocal")
  config.mesh.num_devices = num_devices
  return run_steps(train.build(config), steps)[1]

print("RESULT" + json.dumps({"single": losses(1), "eight": losses(8)}))
"""


def test_the_contrastive_loss_spans_the_global_batch_on_8_devices():
  """One video per device: the InfoNCE over the 8 x 8 global similarity equals the 1-device run's
  (a per-device similarity would be 1 x 1, a zero loss)."""
  result = json.loads(run_on_cpu_devices(EIGHT_DEVICES, 8).split("RESULT")[-1])
  assert min(result["single"]) > 0.5
  assert max(abs(a - b) for a, b in zip(result["single"], result["eight"])) <= 1e-4, result
