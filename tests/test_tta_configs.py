"""The TTA configs (configs/tpt_imagenet.py, rlcf_imagenet.py, rlcf_finegrained.py): every argument
set resolves to a checked config with the originals' per-sample settings (views, AugMix per
dataset, steps, lr, weight decay, K, selection, reward CLIPs and their `model_init` parts), whose
evaluator settings, model settings and pp specs the library accepts; the no-argument demo pre-fits
two different tiny CLIPs on clean data and adapts on the shifted test split of
`embedded/named_shapes` (`shift='zoom_out'`); bad arguments are errors."""
from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from configs import common
from input_pipeline import embedded, embedded_clip, preprocess
from input_pipeline.imagenet_class_names import IMAGENET_CLASS_NAMES
from jaxprompt import config_checks, method, train
from jaxprompt.evaluators import tta as tta_evaluator
from jaxprompt.prompts import rlcf
from test_input_pipeline import _write_metadata  # pylint: disable=import-error

CONFIGS = ("tpt_imagenet", "rlcf_imagenet", "rlcf_finegrained")
# The originals' settings (TPT `scripts/test_tpt.sh`; RLCF `TPT/scripts/rlcf-prompt.sh`,
# `rlcf-prompt-fine.sh`, `rlcf-tune.sh`, `tpt-tune.sh`): (steps, lr, weight decay).
TPT_PROMPT, TPT_IMAGE = (1, 5e-3, 0.01), (3, 1e-5, 5e-4)
RLCF_PROMPT, RLCF_PROMPT_FINE, RLCF_IMAGE = (3, 7e-3, 5e-4), (5, 7e-3, 5e-4), (3, 1e-5, 5e-4)
IMAGENET = ("imagenet/val", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
FINEGRAINED = ("oxford_flowers", "dtd", "oxford_pets", "stanford_cars", "ucf101", "caltech101",
               "food101", "sun397", "fgvc_aircraft", "eurosat")

# (config, argument, dataset, method, mode, (steps, lr, wd), AugMix, reward CLIPs, coop_ctx,
# momentum)
REAL_RUNS = [
    *[("tpt_imagenet", f"dataset={d}", d, "tpt", "prompt", TPT_PROMPT, False, (), "", False)
      for d in IMAGENET],
    ("tpt_imagenet", "dataset=imagenet_r,mode=image", "imagenet_r", "tpt", "image", TPT_IMAGE,
     False, (), "", False),
    ("tpt_imagenet", "dataset=imagenet_v2,coop_ctx=/ckpt/model.pth.tar-50", "imagenet_v2", "tpt",
     "prompt", TPT_PROMPT, False, (), "/ckpt/model.pth.tar-50", False),
    *[("rlcf_imagenet", f"dataset={d}", d, "rlcf", "prompt", RLCF_PROMPT, False, ("ViT-L/14",),
       "", False) for d in IMAGENET],
    ("rlcf_imagenet", "dataset=imagenet_a,variant=image", "imagenet_a", "rlcf", "image",
     RLCF_IMAGE, False, ("ViT-L/14",), "", False),
    ("rlcf_imagenet", "dataset=imagenet_a,variant=prompt_coop,coop_ctx=/c.pth", "imagenet_a",
     "rlcf", "prompt", RLCF_PROMPT, False, ("ViT-L/14",), "/c.pth", False),
    ("rlcf_imagenet", "dataset=imagenet_sketch,variant=image,rewards=3", "imagenet_sketch",
     "rlcf", "image", RLCF_IMAGE, False, ("ViT-L/14@336px", "RN50x64", "ViT-L/14"), "", False),
    ("rlcf_imagenet", "dataset=imagenet_r,variant=image,rewards=3,momentum", "imagenet_r", "rlcf",
     "image", RLCF_IMAGE, False, ("ViT-L/14@336px", "RN50x64", "ViT-L/14"), "", True),
    *[("rlcf_finegrained", f"dataset={d}", f"coop/{d}", "rlcf", "prompt", RLCF_PROMPT_FINE, True,
       ("ViT-L/14",), "", False) for d in FINEGRAINED],
    ("rlcf_finegrained", "dataset=dtd,variant=image", "coop/dtd", "rlcf", "image", RLCF_IMAGE,
     True, ("ViT-L/14",), "", False),
    ("rlcf_finegrained", "dataset=eurosat,method=tpt", "coop/eurosat", "tpt", "prompt",
     TPT_PROMPT, True, (), "", False),
    ("rlcf_finegrained", "dataset=food101,rewards=3,momentum", "coop/food101", "rlcf", "prompt",
     RLCF_PROMPT_FINE, True, ("ViT-L/14@336px", "RN50x64", "ViT-L/14"), "", True),
]


def get_config(name: str, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def model_class(config):
  return importlib.import_module(f"jaxprompt.{config.model_name}").Model


def check_accepted(config):
  """The spine, the evaluators' settings, the model's fields and the pp specs accept the config."""
  config_checks.check_spine(config)
  evaluator_args = set(inspect.signature(tta_evaluator.TtaEvaluator.__init__).parameters)
  for settings in config.evals.values():
    assert settings["type"] == "tta" and settings["split"] == "test"
    assert set(settings) - {"type"} <= evaluator_args
  model_class(config)(num_classes=2, class_names=("cat", "dog"), **config.model)
  preprocess.make_preprocess_fn(config.pp.eval)
  assert config.dataset in input_pipeline.SOURCE_NAMES


@pytest.mark.parametrize(
    "name, arg, dataset, method_name, mode, recipe, augmix, rewards, coop_ctx, momentum",
    REAL_RUNS, ids=[f"{r[0]}:{r[1]}" for r in REAL_RUNS])
def test_real_runs_have_the_originals_settings(name, arg, dataset, method_name, mode, recipe,
                                               augmix, rewards, coop_ctx, momentum):
  config = get_config(name, arg)
  check_accepted(config)
  assert config.mode == "eval" and config.dataset == dataset
  assert config.model_name == ("prompts.rlcf" if rewards else "prompts.tpt")
  assert config.model.variant == "ViT-B/16" and config.model.ctx_init == "a photo of a"
  assert config.pp.eval == (f"tta_views(64, 224, augmix={augmix})|value_range(0, 1)|"
                            "normalize('clip')")
  evaluator = config.evals.test
  assert (evaluator.method, evaluator.mode) == (method_name, mode)
  assert (evaluator.steps, evaluator.lr, evaluator.weight_decay) == recipe
  assert evaluator.selection == 0.1 and evaluator.image_prompt_quirk
  assert evaluator.coop_ctx == coop_ctx
  # Every CLIP loads from its own model_init part; nothing else is a part.
  parts = {"model", *(f"reward_{i}" for i in range(len(rewards)))}
  assert set(config.model_init) == parts
  loaded = method.model_init_parts({part: f"/w/{part}.pt" for part in parts},
                                   method.load_method(config.model_name), config.model_name)
  assert set(loaded) == parts
  if rewards:
    assert tuple(config.model.reward_variants) == rewards and evaluator.top_k == 3
    assert rlcf.effective_reward_weights(rewards, config.model.reward_weights) == (
        (1.0,) if len(rewards) == 1 else (0.56, 0.17, 0.28))
    assert (evaluator.momentum is not None) == momentum
    if momentum:
      assert dict(evaluator.momentum) == dict(momentum=0.9998, update_freq=64, update_w=1.0)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_demo_pre_fits_a_policy_and_a_stronger_reward_then_adapts_on_shifted_data(name):
  config = get_config(name)
  check_accepted(config)
  assert config.mode == "train" and config.model_name == "prompts.rlcf"
  assert config.dataset == embedded_clip.NAME and config.dataset_kwargs.shift == "zoom_out"
  source = input_pipeline.get_source(config.dataset, **config.dataset_kwargs)
  assert source.num_examples("test") == config.dataset_kwargs.test_examples < 1000
  assert config.model.variant == "ViT-mu/8"
  assert tuple(config.model.reward_variants) == ("ViT-mu/4",)  # a different, finer-patch CLIP
  assert config.trainable_params == ".*" and not config.model_init
  assert set(config.evals) == {"tpt", "rlcf"}
  assert config.evals.tpt.method == "tpt" and config.evals.rlcf.method == "rlcf"
  finegrained = name == "rlcf_finegrained"
  assert f"augmix={finegrained}" in config.pp.eval
  assert config.evals.rlcf.steps == (5 if finegrained else 3)
  # The demo's views keep int(16 * 0.25) = 4 (0.1 would keep 1).
  assert "tta_views(16, 32" in config.pp.eval and config.evals.tpt.selection == 0.25


def test_the_shift_changes_only_the_test_split_and_the_test_split_can_be_cut():
  clean, shifted = (embedded_clip.NamedShapesSource(shift=s) for s in ("", "zoom_out"))
  for split in ("train", "val"):
    for a, b in zip(clean.arrays(split), shifted.arrays(split)):
      np.testing.assert_array_equal(a, b)
  images, labels = clean.arrays("test")
  moved, same_labels = shifted.arrays("test")
  np.testing.assert_array_equal(labels, same_labels)
  assert moved.shape == images.shape and moved.dtype == np.uint8
  # The content is the 2x2 box average of the image, centred, at 0.7 contrast about 128.
  expected = 128 + 0.7 * (images.astype(np.float64).reshape(-1, 16, 2, 16, 2, 3).mean((2, 4))
                          - 128)
  assert np.abs(moved[:, 8:24, 8:24].astype(np.float64) - expected).max() <= 0.5 + 1e-9
  # Every square keeps its class's half: the brightest pixels of the centre crop (the square's
  # colour beats the dark background) lie in the top half for classes 0-4.
  rows = np.argmax(moved[:, 8:24, 8:24].max(axis=(2, 3)), axis=1)
  assert np.mean((rows < 8) == (labels < embedded.NUM_CLASSES // 2)) > 0.95
  cut = embedded_clip.NamedShapesSource(shift="zoom_out", test_examples=10).arrays("test")
  np.testing.assert_array_equal(cut[0], moved[:10])
  np.testing.assert_array_equal(cut[1], labels[:10])
  with pytest.raises(ValueError, match="shift='blur'"):
    embedded_clip.NamedShapesSource(shift="blur")
  with pytest.raises(ValueError, match="test_examples=1001"):
    embedded_clip.NamedShapesSource(test_examples=1001)


@pytest.mark.parametrize("name, arg, message", [
    ("tpt_imagenet", "dataset=imagenet", "dataset='imagenet'"),
    ("tpt_imagenet", "dataset=dtd", "rlcf_finegrained.py:method=tpt"),
    ("tpt_imagenet", "mode=text", "mode='text'"),
    ("tpt_imagenet", "dataset=imagenet_a,mode=image,coop_ctx=/c.pth", "coop_ctx"),
    ("tpt_imagenet", "views=32", "Unknown config argument 'views'"),
    ("rlcf_imagenet", "variant=text", "variant='text'"),
    ("rlcf_imagenet", "dataset=imagenet_a,variant=prompt_coop", "needs coop_ctx"),
    ("rlcf_imagenet", "dataset=imagenet_a,coop_ctx=/c.pth", "needs coop_ctx"),
    ("rlcf_imagenet", "dataset=imagenet_a,rewards=2", "rewards=2"),
    ("rlcf_imagenet", "dataset=coop/dtd", "rlcf_finegrained"),
    ("rlcf_finegrained", "dataset=imagenet_a", "rlcf_imagenet"),
    ("rlcf_finegrained", "dataset=dtd,method=kd", "method='kd'"),
    ("rlcf_finegrained", "dataset=dtd,method=tpt,rewards=3", "no reward CLIP"),
    ("rlcf_finegrained", "dataset=dtd,momentum=maybe", "not a boolean"),
])
def test_bad_arguments_are_errors(name, arg, message):
  with pytest.raises(ValueError, match=message):
    get_config(name, arg)


def test_the_helpers_name_the_originals_sets():
  assert common.TTA_IMAGENET == IMAGENET and common.TTA_FINEGRAINED == FINEGRAINED
  for dataset in FINEGRAINED:
    assert f"coop/{dataset}" in input_pipeline.SOURCE_NAMES


@pytest.mark.slow  # 16 s alone, 92 s late in the full suite: the default suite runs the Karpathy
# real config end to end (test_rlcf_retrieval.py) and prompts.rlcf in eval mode on views
# (test_tta_evaluator.py)
def test_a_real_run_adapts_every_sample_of_mocked_imagenet_a_in_its_200_class_space(tmp_path):
  """configs/rlcf_imagenet.py:dataset=imagenet_a end to end through the trainer (eval mode), with
  tiny random CLIPs and 8 views of 32 px: every test image (5x7 px: upscaled, not an error) is
  adapted, in ImageNet-A's 200-class label space; 1000 class names are refused naming both."""
  data_dir = str(tmp_path / "tfds")
  _write_metadata(data_dir, "imagenet_a", "0.1.*", {"test": 6})
  png = tf.io.encode_png(np.full((5, 7, 3), 90, np.uint8)).numpy()

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, decoders, read_config, kwargs
    return tf.data.Dataset.from_tensor_slices(  # ImageNet indices of stingray .. acorn
        {"image": [png] * 6, "label": np.array([6, 11, 13, 988, 6, 11], np.int64)})

  config = get_config("rlcf_imagenet", "dataset=imagenet_a,batch=4")
  config.unlock()
  config.data_dir = data_dir
  config.model.update(variant="ViT-mu/8", reward_variants=("RN-mu",),
                      vocab_path=embedded_clip.byte_vocabulary())
  config.eval_random_init = True
  config.pp.train, config.pp.eval = common.vtab_pp(32, "clip"), common.tta_pp(8, 32, False)
  config.evals.test.selection = 0.25
  with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=as_dataset):
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert final["test/examples"] == 6
    assert 0 <= final["test/zeroshot_accuracy"] <= final["test/zeroshot_top5"] <= 1
    assert 0 <= final["test/accuracy"] <= final["test/top5"] <= 1
    config.model.class_names = IMAGENET_CLASS_NAMES
    with pytest.raises(ValueError, match="1000 names for 200 classes"):
      train.build(config)
