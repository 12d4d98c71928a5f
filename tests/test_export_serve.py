"""Prompt artefacts (jaxprompt/export.py) and multi-task serving (jaxprompt/serve.py) on a tiny
VPT run: round trip, size, refusals of foreign backbones/methods/shapes, and a mixed-task batch
equal to each task served alone; the same for SA2VP (marked slow)."""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from configs import sa2vp_vtab
from conftest import tiny_config
from flax import traverse_util

from jaxprompt import checkpointing, export, method as method_lib, run_record, serve, train

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
                       config=record.config)
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
                       fingerprint=record.fingerprint, step=1, config=record.config)
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


def test_cli_resizes_images(run, tmp_path, capsys):
  _, record, _, other = run
  for task, size in (("a", (50, 40)), ("b", (64, 64))):
    os.makedirs(tmp_path / "images" / task)
    png = tf.io.encode_png(np.full((*size, 3), 128, np.uint8)).numpy()
    (tmp_path / "images" / task / "x.png").write_bytes(png)
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
                         config=run_record.flat_config(config))
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
