"""The spine's seams: the method contract, batch-driven inputs, multi-part weights, the best
checkpoint, and the evaluators' declared metrics."""
import re
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util
from tensorboard.backend.event_processing import event_accumulator

from configs import common, lmpt_voc_lt
from jaxprompt import evaluators, method, run_record, train
from jaxprompt.prompts import vpt
from conftest import run_steps, tiny_config  # pylint: disable=import-error




def flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def fake_method(monkeypatch, **fields):
  """Registers `jaxprompt.fake_method` with METHOD = Method(vpt.Model, ..., **fields)."""
  module = types.ModuleType("jaxprompt.fake_method")
  module.METHOD = method.Method(**{"model": vpt.Model, "trainable": vpt.TRAINABLE_PARAMS,
                                   **fields})
  monkeypatch.setitem(sys.modules, "jaxprompt.fake_method", module)
  return "fake_method"


# --- the method contract --------------------------------------------------------------------------

def test_a_misspelled_hook_is_an_error_when_the_method_is_declared():
  with pytest.raises(TypeError, match="make_los"):
    method.Method(model=vpt.Model, trainable=".*", make_los=lambda c, s: None)  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(TypeError, match=r"Method.loaders\['model'\] must be callable"):
    method.Method(model=vpt.Model, trainable=".*", loaders={"model": "vit.npz"})


def test_a_module_without_method_is_refused(monkeypatch):
  monkeypatch.setitem(sys.modules, "jaxprompt.not_a_method", types.ModuleType("x"))
  with pytest.raises(ValueError, match="defines no METHOD"):
    train.build(tiny_config(model_name="not_a_method"))
  with pytest.raises(ValueError, match="no module jaxprompt.prompts.vtp"):
    train.build(tiny_config(model_name="prompts.vtp"))


def test_every_method_module_declares_its_contract():
  for name in ("vpt", "vpt_swin", "sa2vp", "sa2vp_swin", "coop", "rpl", "lmpt"):
    declared = method.load_method(f"prompts.{name}")
    assert declared.inputs == ("image",) and "model" in declared.loaders, name
  assert method.load_method("prompts.lmpt").optional_inputs == ("caption_tokens",)


# --- batch-driven inputs ---------------------------------------------------------------------------

def test_a_method_consuming_a_key_the_source_lacks_is_an_error_naming_both(monkeypatch):
  name = fake_method(monkeypatch, inputs=("image", "boxes"))
  with pytest.raises(ValueError, match=r"consumes the batch key\(s\) \['boxes'\], which data "
                     r"source 'embedded/shapes' does not produce \(it produces \['image', "
                     r"'label'\]\)"):
    train.build(tiny_config(model_name=name))


def test_the_model_is_initialised_from_the_element_spec():
  # 48 px images from the pp spec alone (pp.image_size is not read): the ViT's position
  # embedding follows the data.
  config = tiny_config(**{"pp.train": "resize(48)|value_range(0, 1)",
                          "pp.eval": "resize(48)|value_range(0, 1)"})
  exp = train.build(config)
  tokens = exp.state["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape[1]
  assert tokens == 1 + (48 // 4) ** 2  # CLS + the 4 px patches of mu/4
  state, losses = run_steps(exp, 2)
  assert np.isfinite(losses).all() and int(state["step"]) == 2


# --- multi-part weights ----------------------------------------------------------------------------

def test_model_init_parts_each_go_to_their_own_loader(monkeypatch):
  calls = []

  def part_loader(leaf, value):
    def load(variables, path):
      calls.append((leaf, path))
      params = jax.tree.map(np.asarray, variables["params"])
      params[leaf] = np.full_like(params[leaf], value)
      return {**variables, "params": params}
    return load

  name = fake_method(monkeypatch, loaders={"image": part_loader("cls", 3.0),
                                           "text": part_loader("prompt_embeddings", 5.0)})
  config = common.base_config(model_name=name, model=dict(tiny_config().model),
                              model_init_parts=("image", "text"))
  config.update({k: v for k, v in tiny_config().items() if k not in config})
  config.model_init.image, config.model_init.text = "a.npz", "b.npz"
  exp = train.build(config)
  assert sorted(calls) == [("cls", "a.npz"), ("prompt_embeddings", "b.npz")]
  assert float(exp.state["params"]["cls"].min()) == 3.0
  assert float(exp.state["params"]["prompt_embeddings"].max()) == 5.0
  config.model_init = ml_collections.ConfigDict({"image": "a.npz", "audio": "c.npz"})
  with pytest.raises(ValueError, match=r"names the part\(s\) \['audio'\], which fake_method "
                     r"cannot load; its parts: \['image', 'text'\]"):
    train.build(config)


# --- the best checkpoint ----------------------------------------------------------------------------

def test_keep_best_reports_best_and_last_and_reevaluates_at_the_best_step(tmp_path):
  config = tiny_config(total_steps=12, checkpoint_every_steps=12, keep_best=("val/accuracy", "max"),
                       eval_at_best=("val", "test"), **{"optim.lr": 0.5})
  config.evals = common.evals("test")
  config.evals.val = dict(type="classification", split="val", every_steps=2)
  final = train.train_and_evaluate(config, str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  history = {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("val/accuracy")}
  assert sorted(history) == [2, 4, 6, 8, 10, 12]
  best_step = max(history, key=lambda s: (history[s], -s))  # the first of equal bests
  assert final["best/step"] == best_step
  assert final["best/val/accuracy"] == pytest.approx(history[best_step])
  # The best params come back from the best checkpoint: val reproduces the recorded best exactly.
  assert final["at_best/val/accuracy"] == final["best/val/accuracy"]
  assert "test/accuracy" in final and "at_best/test/accuracy" in final
  # mode='eval' in the same workdir: the last checkpoint's metrics and training's best, with no
  # optimizer state in memory (its shapes only) and no new best checkpoint.
  config.unlock()
  config.mode = "eval"
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(train.build(config).state["opt_state"]))
  evaluated = train.train_and_evaluate(config, str(tmp_path))
  for key in ("test/accuracy", "val/accuracy", "best/step", "best/val/accuracy",
              "at_best/test/accuracy"):
    assert evaluated[key] == final[key], key


def test_early_stop_patience_ends_training_like_glips_auto_terminate(tmp_path, monkeypatch):
  """GLIP's AUTO_TERMINATE_PATIENCE: a tie resets the count, a worse value adds one; at the
  patience the run stops, saves that step and reports its metrics; a rerun does not train on."""
  scripted = iter([0.5, 0.4, 0.5, 0.3, 0.2, 0.9])  # evaluations at steps 2, 4, 6, 8, 10, (12)
  real_run_all = train.evaluators.run_all

  def run_all(evaluators_, variables, *, step=None, steps_per_epoch=1):
    metrics = real_run_all(evaluators_, variables, step=step, steps_per_epoch=steps_per_epoch)
    if "val/accuracy" in metrics and step is not None:
      metrics["val/accuracy"] = next(scripted)
    return metrics

  monkeypatch.setattr(train.evaluators, "run_all", run_all)
  config = tiny_config(total_steps=12, checkpoint_every_steps=100, early_stop_patience=2,
                       keep_best=("val/accuracy", "max"))
  config.evals = common.evals("test")
  config.evals.val = dict(type="classification", split="val", every_steps=2)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["step"] == 10  # 0.5 best; 0.4 (1); 0.5 tie (0); 0.3 (1); 0.2 (2): stop
  assert final["best/step"] == 2 and final["best/val/accuracy"] == 0.5
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
  again = train.train_and_evaluate(config, str(tmp_path))  # resumes at 10 and stays stopped
  assert again["step"] == 10
  with pytest.raises(ValueError, match="early_stop_patience"):
    from jaxprompt import config_checks  # pylint: disable=import-outside-toplevel
    config_checks.check_spine(tiny_config(early_stop_patience=3))


def test_keep_best_must_name_a_reported_metric():
  config = tiny_config(keep_best=("test/mAP", "max"))
  with pytest.raises(ValueError, match=r"evaluator 'test' reports \['accuracy', 'loss', "
                     r"'examples'\], not 'mAP'"):
    train.build(config)


def test_evaluators_report_exactly_their_declared_metrics():
  exp = train.build(tiny_config())
  variables = train.variables(exp.state)
  for evaluator in exp.evaluators.values():
    assert set(evaluator.run(variables)) == set(evaluator.metric_names())
  config = lmpt_voc_lt.get_config("runlocal")
  exp = train.build(config)
  evaluator = exp.evaluators["test"]
  assert set(evaluator.run(train.variables(exp.state))) == set(evaluator.metric_names())
  assert {"mAP", "head_mAP", "OF1"} <= set(evaluator.metric_names())
  assert isinstance(exp.evaluators["test"], evaluators.multilabel.MultilabelEvaluator)


def test_a_frozen_model_is_built_and_loaded_beside_the_trained_one(tmp_path):
  """A teacher or reward model: the same init-and-load path as the trained model, its own
  weights file, and nothing of it in the trained state."""
  exp = train.build(tiny_config())
  other = train.build(tiny_config(seed=7))
  backbone = {k: np.asarray(v) for k, v in flat(other.state["params"]).items()
              if not re.fullmatch(vpt.TRAINABLE_PARAMS, k)}
  np.savez(tmp_path / "teacher.npz", **backbone)
  trained_before = flat(exp.state["params"])
  teacher, _ = train.init_variables(
      exp.model, [np.zeros((1, 32, 32, 3), np.float32)],
      {"model": method.params_loader(vpt.load)}, {"model": str(tmp_path / "teacher.npz")},
      seed=0, mesh=exp.mesh, rule="replicate")
  loaded = flat(teacher["params"])
  for name, value in backbone.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  for name, value in flat(exp.state["params"]).items():
    np.testing.assert_array_equal(value, trained_before[name], err_msg=name)


def test_evaluation_padding_covers_every_batch_key():
  """The last eval batch is padded in every key a source declares (multi-hot labels, caption
  tokens), not just images, and the padding rows are masked."""
  from input_pipeline import embedded_multilabel, pipeline, preprocess  # pylint: disable=import-outside-toplevel
  source = embedded_multilabel.MultilabelShapesSource(
      caption_tokenizer=lambda texts: np.ones((len(texts), 5), np.int32))
  pp = preprocess.make_preprocess_fn("resize(8)|value_range(0, 1)")
  n = source.num_examples("train")
  batches = list(pipeline.make_eval_dataset(source, "train", pp, global_batch_size=64)
                 .as_numpy_iterator())
  last = batches[-1]
  assert set(last) == {"image", "labels", "caption_tokens", "_mask"}
  real = n - 64 * (len(batches) - 1)
  assert 0 < real < 64 and last["_mask"].sum() == real
  assert (last["caption_tokens"][real:] == 0).all() and (last["caption_tokens"][:real] == 1).all()
  assert (last["labels"][real:] == 0).all() and last["image"].shape == (64, 8, 8, 3)


def test_a_new_run_does_not_inherit_an_earlier_runs_best_checkpoint(tmp_path):
  config = tiny_config(total_steps=4, keep_best=("test/accuracy", "max"))
  train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "best.json").exists() and (tmp_path / "best_checkpoint").is_dir()
  config = tiny_config(total_steps=2, keep_best=("test/accuracy", "max"), overwrite=True,
                       seed=5)
  run_record.prepare(str(tmp_path), config, str(tmp_path / "checkpoints"))
  assert not (tmp_path / "best.json").exists() and not (tmp_path / "best_checkpoint").exists()
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["best/step"] == 2  # the new run's own best
