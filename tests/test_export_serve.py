"""Prompt artefacts (jaxprompt/export.py) and multi-task serving (jaxprompt/serve.py) on a tiny
VPT run: round trip, size, refusals of foreign backbones/methods/shapes, and a mixed-task batch
equal to each task served alone; the same for SA2VP (marked slow). The class-prompt path (CoOp,
LMPT on the tiny CLIP 'ViT-mu/8'): a CoOp run's artefact carries its class names and serves
without data; mixed batches of tasks with different class sets equal each task alone and the
method's own forward; LMPT predicts as its multi-label evaluator; refusals."""
from __future__ import annotations

import functools
import os
import re

import jax
import numpy as np
import pytest
import tensorflow as tf
from configs import coop as coop_config
from configs import lmpt_voc_lt, sa2vp_vtab
from conftest import tiny_config
from flax import traverse_util

import input_pipeline
from jaxprompt import checkpointing, export, method as method_lib, run_record, serve, train
from jaxprompt.evaluators import multilabel

PP = "resize(64, antialias=False)|value_range(0, 1)|normalize('imagenet')"


def _config(**overrides):
  # 64 px and 2 prompts: the frozen params (dominated by the position embedding) outweigh the
  # prompts and head 20:1, as ViT-B's do by far more.
  return tiny_config(**{"total_steps": 2, "evals": {}, "model.num_prompts": 2,
                        "pp.image_size": 64, "pp.train": PP, "pp.eval": PP, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, artefact of task 'a', its backbone variables, a second task 'b' with 3 classes)."""
  root = tmp_path_factory.mktemp("export")
  workdir = str(root / "run")
  train.train_and_evaluate(_config(), workdir)
  record = export.export(workdir, str(root / "a.prompt"), task="a")
  variables = export.build_backbone(export.config_from_record(record.config))[0]
  rng = np.random.default_rng(0)
  other = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in record.flat_params().items()}
  other["head/kernel"], other["head/bias"] = other["head/kernel"][:, :3], other["head/bias"][:3]
  export.save_artefact(str(root / "b.prompt"), traverse_util.unflatten_dict(other, sep="/"),
                       task="b", method=record.method, fingerprint=record.fingerprint, step=7,
                       config=record.config, num_classes=3)
  return workdir, record, variables, export.load_artefact(str(root / "b.prompt"))


def _frozen_bytes(variables, record) -> int:
  trainable = set(record.flat_params())
  return sum(v.nbytes for k, v in traverse_util.flatten_dict(variables["params"], sep="/").items()
             if k not in trainable)


def test_round_trip_and_size(run):
  workdir, record, variables, _ = run
  step, state = checkpointing.read_run(workdir)
  saved = traverse_util.flatten_dict(state["params"], sep="/")
  assert record.step == step == 2 and record.method == "prompts.vpt" and record.task == "a"
  assert record.num_classes == 10 and record.class_names == ()
  assert sorted(saved) == sorted(record.flat_params())
  for name, value in saved.items():
    np.testing.assert_array_equal(record.flat_params()[name], np.asarray(value))
  assert export.config_from_record(record.config).model.num_prompts == 2
  assert os.path.getsize(record.path) < 0.05 * _frozen_bytes(variables, record)
  applied = export.apply_artefact(record, variables, method="prompts.vpt")
  np.testing.assert_array_equal(applied["params"]["head"]["bias"], record.params["head"]["bias"])


def test_refusals(run, tmp_path):
  _, record, variables, other = run
  foreign = export.build_backbone(_config(seed=1))[0]
  with pytest.raises(ValueError, match=f"{record.fingerprint}.*is [0-9a-f]{{64}}"):
    export.apply_artefact(record, foreign, method="prompts.vpt")
  with pytest.raises(ValueError, match=record.fingerprint):
    serve.Server([record], foreign)
  with pytest.raises(ValueError, match="of method 'prompts.vpt'.*runs 'prompts.sa2vp'"):
    export.apply_artefact(record, variables, method="prompts.sa2vp")
  sa2vp = str(tmp_path / "sa2vp.prompt")
  export.save_artefact(sa2vp, record.params, task="c", method="prompts.sa2vp",
                       fingerprint=record.fingerprint, step=1, config=record.config,
                       num_classes=10)
  with pytest.raises(ValueError, match="of method 'prompts.sa2vp'"):
    serve.Server([record, sa2vp], variables)
  with pytest.raises(ValueError, match=r"'head/bias' has shape \(3,\), the model's has \(10,\)"):
    export.apply_artefact(other, variables, method="prompts.vpt")
  with pytest.raises(ValueError, match="Two artefacts have the task name 'a'"):
    serve.Server([record, record.path], variables)
  garbage = tmp_path / "garbage.prompt"
  garbage.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="garbage.prompt"):
    export.load_artefact(str(garbage))


def test_mixed_batch_equals_each_task_alone(run):
  _, record, variables, other = run
  server = serve.Server([record, other], variables)
  assert server.tasks == ["a", "b"] and server.num_classes == [10, 3]
  images = np.random.default_rng(1).normal(size=(6, 64, 64, 3)).astype(np.float32)
  ids = np.array([0, 1, 1, 0, 1, 0])
  mixed = server.logits(images, ids)
  assert np.all(np.isneginf(mixed[ids == 1, 3:])) and np.all(np.isfinite(mixed[ids == 0]))
  for task, (rec, classes) in enumerate([(record, 10), (other, 3)]):
    alone = serve.Server([rec], variables).logits(images[ids == task], ids[ids == task] * 0)
    np.testing.assert_allclose(mixed[ids == task, :classes], alone, atol=1e-5, rtol=0)
  model = train.build_model(server.config, method_lib.load_method("prompts.vpt"), 10)
  direct = model.apply(export.apply_artefact(record, variables, method="prompts.vpt"),
                       images[ids == 0], train=False)[0]
  np.testing.assert_allclose(mixed[ids == 0], direct, atol=1e-5, rtol=0)
  assert server.predict(images[:2], ids[:2]) == [("a", int(mixed[0].argmax())),
                                                 ("b", int(mixed[1].argmax()))]
  with pytest.raises(ValueError, match="task id 2 is out of range: 2 tasks"):
    server.logits(images[:2], np.array([0, 2]))
  with pytest.raises(ValueError, match=r"shape \(2, 32, 32, 3\).*64, 64, 3"):
    server.logits(images[:2, :32, :32], ids[:2])


def _write_images(folder, sizes: dict) -> None:
  """folder/<task>/x.png, a grey image of sizes[task] (height, width), per task."""
  for task, size in sizes.items():
    os.makedirs(folder / task)
    (folder / task / "x.png").write_bytes(
        tf.io.encode_png(np.full((*size, 3), 128, np.uint8)).numpy())


def test_cli_resizes_images(run, tmp_path, capsys):
  _, record, _, other = run
  _write_images(tmp_path / "images", {"a": (50, 40), "b": (64, 64)})
  assert serve.load_images([str(tmp_path / "images/a/x.png")], PP).shape == (1, 64, 64, 3)
  serve.main(["--artefact", record.path, "--artefact", other.path,
              "--images", str(tmp_path / "images")])
  out = capsys.readouterr().out
  assert "task a (10 classes):\n  a/x.png: class" in out
  assert "task b (3 classes):\n  b/x.png: class" in out


@pytest.mark.slow  # ~9 s: SA2VP's init and forward compile; the VPT tests cover the same code
def test_sa2vp_mixed_batch(tmp_path):
  config = sa2vp_vtab.get_config("runlocal")
  variables, names = export.build_backbone(config)
  fingerprint = export.backbone_fingerprint(variables["params"], names)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  rng = np.random.default_rng(2)
  records = []
  for task in ("x", "y"):
    params = {k: (flat[k] + 0.1 * rng.normal(size=flat[k].shape)).astype(np.float32)
              for k in names}
    path = str(tmp_path / f"{task}.prompt")
    export.save_artefact(path, traverse_util.unflatten_dict(params, sep="/"), task=task,
                         method="prompts.sa2vp", fingerprint=fingerprint, step=1,
                         config=run_record.flat_config(config), num_classes=10)
    records.append(export.load_artefact(path))
  server = serve.Server(records, variables)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  ids = np.array([1, 0, 0, 1])
  mixed = server.logits(images, ids)
  apply = jax.jit(functools.partial(server.model.apply, train=False))
  for task, record in enumerate(records):
    alone = apply(export.apply_artefact(record, variables, method="prompts.sa2vp"),
                  images[ids == task])[0]
    np.testing.assert_allclose(mixed[ids == task], alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Class prompts (CoOp, LMPT): per-task class features once, image features once per batch.

CLASS_SETS = {"shapes": ("red square", "blue circle", "green triangle"),
              "animals": ("cat", "dog", "small yellow bird", "tree", "car")}


def _class_prompt_artefacts(config, variables, folder, class_sets, seed=0) -> list:
  """Artefacts of random contexts (class-specific ones sized per task) for `class_sets`."""
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  names = [k for k in flat if k.startswith("prompt_learner/")]
  fingerprint = export.backbone_fingerprint(variables["params"], names)
  rng = np.random.default_rng(seed)
  records = []
  for task, class_names in class_sets.items():
    params = {}
    for name in names:
      shape = ((len(class_names),) if config.model.csc else ()) + flat[name].shape[-2:]
      params[name] = rng.normal(scale=0.5, size=shape).astype(np.float32)
    path = os.path.join(folder, f"{task}.prompt")
    export.save_artefact(path, traverse_util.unflatten_dict(params, sep="/"), task=task,
                         method=config.model_name, fingerprint=fingerprint, step=1,
                         config=run_record.flat_config(config), num_classes=len(class_names),
                         class_names=class_names)
    records.append(export.load_artefact(path))
  return records


@pytest.fixture(scope="module")
def coop_run(tmp_path_factory):
  """(config, the artefact of a CoOp demo run, task 'demo'; the backbone built from the artefact
  without data; artefacts 'shapes' and 'animals' of random contexts on it). The run's workdir is
  written as training writes it (config record, a checkpoint of step 3), without the training."""
  root = tmp_path_factory.mktemp("coop")
  config = coop_config.get_config("runlocal")
  workdir, checkpoints = str(root / "run"), str(root / "run" / "checkpoints")
  run_record.prepare(workdir, config, checkpoints)
  checkpointer = checkpointing.Checkpointer(checkpoints, keep=1)
  context = np.random.default_rng(4).normal(scale=0.02, size=(16, 32)).astype(np.float32)
  checkpointer.save(3, {"params": {"prompt_learner": {"ctx": context}}, "step": 3})
  checkpointer.wait()
  checkpointer.close()
  record = export.export(workdir, str(root / "demo.prompt"), task="demo")
  np.testing.assert_array_equal(record.params["prompt_learner"]["ctx"], context)
  variables = export.build_backbone(config, num_classes=record.num_classes,
                                    class_names=record.class_names)[0]
  return config, record, variables, _class_prompt_artefacts(config, variables, str(root),
                                                             CLASS_SETS)


@pytest.fixture(scope="module")
def lmpt_tasks(tmp_path_factory):
  """(config, backbone, artefacts 'shapes' and 'animals' of random class-specific contexts)."""
  config = lmpt_voc_lt.get_config("runlocal")
  variables = export.build_backbone(config, num_classes=3, class_names=CLASS_SETS["shapes"])[0]
  records = _class_prompt_artefacts(config, variables, str(tmp_path_factory.mktemp("lmpt")),
                                    CLASS_SETS, seed=1)
  return config, variables, records


def test_coop_artefact_carries_class_names(coop_run):
  config, record, variables, _ = coop_run
  source = input_pipeline.get_source(config.dataset, **config.dataset_kwargs)
  assert record.method == "prompts.coop" and record.step == 3
  assert record.num_classes == source.num_classes == 10
  assert record.class_names == tuple(source.class_names)
  assert list(record.flat_params()) == ["prompt_learner/ctx"]
  # The data-free build is the run's backbone: serving needs no dataset.
  assert export.backbone_fingerprint(variables["params"], ["prompt_learner/ctx"]) == \
      record.fingerprint


@pytest.mark.parametrize("method_name", ["coop", "lmpt"])
def test_class_prompt_mixed_batch(method_name, coop_run, lmpt_tasks):
  if method_name == "coop":
    config, _, variables, records = coop_run
  else:
    config, variables, records = lmpt_tasks
  server = serve.Server(records, variables)
  assert server.tasks == ["shapes", "animals"] and server.num_classes == [3, 5]
  images = np.random.default_rng(3).normal(size=(6, 32, 32, 3)).astype(np.float32)
  ids = np.array([1, 0, 0, 1, 1, 0])
  mixed = server.logits(images, ids)
  assert np.all(np.isneginf(mixed[ids == 0, 3:])) and np.all(np.isfinite(mixed[ids == 1]))
  method = method_lib.load_method(config.model_name)
  frozen = {k: v for k, v in traverse_util.flatten_dict(variables["params"], sep="/").items()
            if not k.startswith("prompt_learner/")}
  for task, record in enumerate(records):
    rows, classes = ids == task, record.num_classes
    alone = serve.Server([record], variables).logits(images[rows], ids[rows] * 0)
    np.testing.assert_allclose(mixed[rows, :classes], alone, atol=1e-5, rtol=0)
    model = train.build_model(config, method, classes, record.class_names)
    params = traverse_util.unflatten_dict({**frozen, **record.flat_params()}, sep="/")
    own = jax.jit(functools.partial(model.apply, train=False))({"params": params}, images[rows])[0]
    np.testing.assert_allclose(mixed[rows, :classes], own, atol=1e-5, rtol=1e-5)
  predictions = server.predict(images, ids)
  for (task, prediction), row, t in zip(predictions, mixed, ids):
    logits = row[:server.num_classes[t]]
    if method_name == "coop":
      assert (task, prediction) == (server.tasks[t], int(logits.argmax()))
    else:  # LMPT's evaluator: softmax over the task's classes, over config.lmpt.threshold
      scores = multilabel.class_softmax(logits[None])[0]
      assert prediction == tuple(np.flatnonzero(scores > 0.3))
  if method_name == "lmpt":
    assert {len(p) for _, p in predictions} != {1}, "multi-label: not always one class"


def test_class_prompt_refusals(coop_run, lmpt_tasks):
  config, _, variables, records = coop_run
  _, _, lmpt_records = lmpt_tasks
  with pytest.raises(ValueError, match="is of method 'prompts.lmpt'.*of 'prompts.coop'"):
    serve.Server([records[0], lmpt_records[1]], variables)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  flat["clip/ln_final/scale"] = flat["clip/ln_final/scale"] + 1e-3  # another (fine-tuned) CLIP
  foreign = {"params": traverse_util.unflatten_dict(flat, sep="/")}
  with pytest.raises(ValueError, match=f"{records[0].fingerprint}.*is [0-9a-f]{{64}}"):
    serve.Server(records, foreign)
  with pytest.raises(ValueError, match="Two artefacts have the task name 'shapes'"):
    serve.Server([records[0], records[0].path], variables)
  server = serve.Server(records, variables)
  images = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match="task id -1 is out of range: 2 tasks"):
    server.logits(images, np.array([0, -1]))
  with pytest.raises(ValueError, match=r"shape \(2, 64, 64, 3\).*32, 32, 3"):
    server.logits(np.zeros((2, 64, 64, 3), np.float32), np.array([0, 1]))


def test_cli_serves_class_prompts_without_data(coop_run, tmp_path, capsys):
  _, record, _, records = coop_run
  _write_images(tmp_path / "images", {"demo": (50, 40), "animals": (32, 32)})
  serve.main(["--artefact", record.path, "--artefact", records[1].path,
              "--images", str(tmp_path / "images")])
  out = capsys.readouterr().out
  demo_names = "|".join(record.class_names)
  assert re.search(rf"task demo \(10 classes\):\n  demo/x.png: class \d \(({demo_names})\)\n",
                   out), out
  assert re.search(r"task animals \(5 classes\):\n  animals/x.png: class \d \((cat|dog|small "
                   r"yellow bird|tree|car)\)", out), out
