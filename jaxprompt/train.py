"""The trainer spine: one jitted train step, evaluators, checkpoints, metrics. Read top to bottom.

Shaped after big_vision's `train.py`: build mesh -> data -> model (initialised from the data's
element spec) -> init or load -> optimizer over the trainable subtree -> shardings -> jit the
update -> loop with periodic actions (log, evaluate, checkpoint). A method plugs in through one
record, `METHOD = jaxprompt.method.Method(...)` in `jaxprompt.<config.model_name>` (see
`method.py`): its model, trainable regex, batch inputs, loaders per `model_init` part, loss and
predict functions. Evaluation is `config.evals` (name -> {type, split, every_steps, ...}), run by
`jaxprompt/evaluators/` on the method's predict functions; metrics are '{name}/{metric}'.

The state is {'params', 'model_state', 'opt_state', 'step'}: 'model_state' holds every non-param
collection (ResNet BatchNorm statistics), frozen like the backbone unless the method trains it
through the forward pass (`Method.mutable`); checkpoints hold the trainable params, those
collections, the optimizer state and the step. `config.keep_best = (metric, 'max'|'min')`
also keeps the best checkpoint by an evaluation metric and reports 'best/step' and
'best/<metric>' beside the last step's metrics; `config.eval_at_best` names evaluators rerun with
the best params at the end ('at_best/<name>/<metric>': VPT's and SA2VP's FGVC protocol).
`optim.plateau` (optim.py) lowers the lr when an evaluation metric stops improving, and
`config.early_stop_patience` ends training after that many evaluations in a row without a better
keep_best metric (GLIP's AUTO_TERMINATE_PATIENCE); the final metrics are then those of the step it
stopped at.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

import input_pipeline
from input_pipeline import pipeline, preprocess
from jaxprompt import (checkpointing, config_checks, evaluators, method as method_lib, optim,
                       run_record, sharding, writers)


@dataclasses.dataclass
class Data:
  source: object
  train_pp: object
  eval_pp: object


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def build_data(config, source_kwargs: dict | None = None) -> Data:
  """The data source (`config.dataset_kwargs` plus `source_kwargs`) and its preprocessing: the pp
  specs `config.pp.train` and `config.pp.eval` (`input_pipeline/preprocess.py`), both built
  (so checked) before the source opens."""
  pp, fns = config.pp, []
  for key in ("train", "eval"):
    if not isinstance(pp.get(key), str):
      raise ValueError(f"config.pp.{key} must be a pp spec string such as "
                       f"\"resize(224)|value_range(0, 1)|normalize('imagenet')\"; got "
                       f"{pp.get(key)!r} (config.pp keys: {sorted(pp)}).")
    try:
      fns.append(preprocess.make_preprocess_fn(pp[key]))
    except ValueError as e:
      raise ValueError(f"config.pp.{key}: {e}") from None
  source = input_pipeline.get_source(config.dataset, data_dir=config.get("data_dir") or None,
                                     **config.get("dataset_kwargs", {}), **(source_kwargs or {}))
  return Data(source, *fns)


def build_model(config, method: method_lib.Method, num_classes: int, class_names=None):
  """The method's Model; one with a `class_names` field (CLIP prompt methods) gets the data
  source's names unless `config.model.class_names` sets them."""
  kwargs = dict(config.model)
  if "class_names" in getattr(method.model, "__dataclass_fields__", {}) and \
      not kwargs.get("class_names") and class_names is not None:
    kwargs["class_names"] = tuple(class_names)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  return method.model(num_classes=num_classes, dtype=dtype, **kwargs)


def variables(state) -> dict:
  """The model's variables in `state`: params and the frozen non-param collections."""
  return {"params": state["params"], **state["model_state"]}


def make_train_step(model, tx, labels, *, method, loss_fn, seed: int):
  """(state, batch) -> (state, metrics). Gradients, the optimizer and its state cover the trainable
  subtree only; frozen params and collections pass through untouched (bit-identical)."""
  base_rng = jax.random.PRNGKey(seed)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])
    args, kwargs = method_lib.model_inputs(method, batch)
    trainable = optim.trainable_subset(state["params"], labels)

    def mean_loss(trainable):
      params = optim.with_trainable(state["params"], trainable)
      (logits, aux), updated = model.apply(
          {"params": params, **state["model_state"]}, *args, train=True, rngs={"dropout": rng},
          mutable=list(method.mutable), **kwargs)
      return jnp.mean(loss_fn(logits, aux, batch)), (logits, updated)

    (loss, (logits, updated)), grads = jax.value_and_grad(mean_loss, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    # 1.0 while the loss and every trained param are finite; the loop stops on 0.
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(trainable):
      finite &= jnp.all(jnp.isfinite(leaf))
    new_state = {"params": optim.with_trainable(state["params"], trainable),
                 "model_state": {**state["model_state"], **updated}, "opt_state": opt_state,
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "finite": finite.astype(jnp.float32)}
    if "label" in batch:
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, metrics

  return train_step


def schedule_lengths(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from `*_steps` when set, else from `*_epochs`."""
  total = config.get("total_steps") or int(round(config.num_epochs * steps_per_epoch))
  warmup = config.optim.get("warmup_steps") or int(round(
      config.optim.get("warmup_epochs", 0) * steps_per_epoch))
  return total, warmup


def init_inputs(method, data: Data, config) -> list:
  """Batch-1 zeros of the method's inputs, shaped by the data's element spec (the train split's,
  also in eval mode when the source has it: an evaluation split may batch differently, e.g.
  VATEX's (captions, L) tokens per video; else the first evaluation split's), so a model may take
  images, videos, boxes or tokens. Test-time 'views' (V, H, W, 3) (`tta_views`) stand in for an
  'image' input the spec lacks: the model sees one view at a time."""
  if config.mode == "train" or config.train_split in data.source.splits:
    spec = pipeline.batch_spec(data.source, config.train_split, data.train_pp, train=True)
  else:
    split = next(iter(config.evals.values())).split
    spec = pipeline.batch_spec(data.source, split, data.eval_pp, train=False)
  shapes = {k: (tuple(v.shape[1:]), v.dtype.as_numpy_dtype) for k, v in spec.items()}
  if "views" in shapes and "image" not in shapes:  # test-time views (V, H, W, 3): an image is one
    shapes["image"] = (shapes["views"][0][1:], shapes["views"][1])
  method_lib.check_inputs(method, config.model_name, shapes, data.source.name)
  return [np.zeros((1, *shapes[k][0]), shapes[k][1]) for k in method.inputs]


def init_variables(model, inputs, loaders, parts: dict, *, seed: int, mesh, rule: str,
                   rules=()):
  """(variables, their shardings) of `model`: initialised from example `inputs`, born sharded by
  the sharding `rules` (then `rule`), then each `parts` entry (part -> path) merged by
  `loaders[part]`. The trained model is built so, and so is a frozen model beside it (a reward
  or teacher: e.g. a CLIP with `{'model': coop.load_clip}`), which then never enters the
  optimizer."""
  init_fn = lambda rng: model.init(rng, *inputs, train=False)
  shardings = sharding.tree_shardings(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh, rule,
                                       rules)
  variables_ = jax.jit(init_fn, out_shardings=shardings)(jax.random.PRNGKey(seed))
  if parts:
    host = multihost_utils.process_allgather(variables_, tiled=True)
    for part, path in parts.items():
      log(f"loading pretrained weights ({part}) from {path}")
      host = loaders[part](host, path)
    variables_ = jax.device_put(host, shardings)
  return variables_, shardings


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built from a config: data, model, optimizer, sharded state, steps."""
  config: object
  mesh: object
  data: Data
  method: method_lib.Method
  model: object
  labels: dict
  schedule: object
  state: dict  # {'params', 'model_state', 'opt_state', 'step'}, sharded
  state_shardings: dict
  total_steps: int
  steps_per_epoch: int
  train_step: object  # jitted (state, batch) -> (state, metrics); donates state
  evaluators: dict  # name -> evaluators.Evaluator
  eval_context: evaluators.EvalContext  # what they run on (also for evaluators built later)

  def checkpointed(self, state) -> dict:
    """The part of `state` a checkpoint holds: trainable params, optimizer state, step, and the
    collections training updates (`Method.mutable`)."""
    return {"params": optim.trainable_subset(state["params"], self.labels),
            "model_state": {k: state["model_state"][k] for k in self.method.mutable
                            if k in state["model_state"]},
            "opt_state": state["opt_state"], "step": state["step"]}

  def evaluated(self, state) -> dict:
    """The variables evaluators see: with optim.ema_for_eval the moving average of the trained
    params (optim.ema_decay; GLIP's SOLVER.USE_EMA_FOR_MONITOR), else the params themselves."""
    ema = optim.ema_of(state["opt_state"]) if self.config.optim.get("ema_for_eval") else None
    if isinstance(ema, dict) and any(isinstance(x, jax.ShapeDtypeStruct)
                                     for x in jax.tree.leaves(ema)):
      ema = None  # mode='eval' from model_init: no checkpoint, so no average (the params)
    return variables(state if ema is None else
                     {**state, "params": optim.with_trainable(state["params"], ema)})

  def restored(self, state, checkpoint) -> dict:
    return {"params": optim.with_trainable(state["params"], checkpoint["params"]),
            "model_state": {**state["model_state"], **checkpoint["model_state"]},
            "opt_state": checkpoint["opt_state"], "step": checkpoint["step"]}


def build(config) -> Experiment:
  """Mesh -> data -> model -> init or load -> optimizer -> sharded state -> jitted steps."""
  config_checks.check_spine(config)
  mesh = sharding.make_mesh(config.mesh.num_devices, config.mesh.model)
  sharding.check_batch_size(config.batch_size, mesh)
  asked = config.get("eval_batch_size") or config.batch_size
  eval_batch_size = sharding.padded_batch_size(asked, mesh)
  if eval_batch_size != asked:
    log(f"eval_batch_size {asked} -> {eval_batch_size}, a multiple of the "
        f"{mesh.shape[sharding.DATA]} devices (padding is masked out of the metrics)")
  method = method_lib.load_method(config.model_name)
  data = build_data(config, method.source_kwargs(config) if method.source_kwargs else {})
  if config.mode == "train":
    data.source.check_split(config.train_split)
  model = build_model(config, method, data.source.num_classes,
                      getattr(data.source, "class_names", None))
  inputs = init_inputs(method, data, config)
  parts = method_lib.model_init_parts(config.get("model_init"), method, config.model_name)
  rules = sharding.SHARDING_RULES[config.get("sharding_rules", "none")]
  variables_, var_shardings = init_variables(model, inputs, method.loaders, parts, seed=config.seed,
                                             mesh=mesh, rule=config.param_sharding, rules=rules)
  params = variables_["params"]
  model_state = {k: v for k, v in variables_.items() if k != "params"}

  labels = optim.param_labels(params, config.get("trainable_params") or method.trainable)
  steps_per_epoch = max(1, data.source.num_examples(config.train_split) // config.batch_size) \
      if config.train_split in data.source.splits else 1
  total_steps, warmup_steps = schedule_lengths(config, steps_per_epoch)
  loss_fn = (method.make_loss or method_lib.cross_entropy_loss)(config, data.source)
  eval_context = evaluators.EvalContext(
      config, data.source, mesh,
      evaluators.eval_batches(data.source, data.eval_pp, eval_batch_size, mesh, augment_seed=(
          config.seed if getattr(data.eval_pp, "test_time_augmentation", False) else None)),
      method_lib.predict_functions(method, model, loss_fn, config))
  evals = evaluators.from_config(config.evals, eval_context)
  if optim.plateau_settings(config.optim) and not any(
      e.interval(steps_per_epoch) for e in evals.values()):
    raise ValueError("optim.plateau steps on evaluation metrics: give an evaluator every_steps "
                     "or every_epochs.")
  if config.get("keep_best"):
    name, _, metric = config.keep_best[0].partition("/")
    if metric not in evals[name].metric_names():
      raise ValueError(f"config.keep_best={tuple(config.keep_best)}: evaluator {name!r} reports "
                       f"{list(evals[name].metric_names())}, not {metric!r}.")
  trainable = optim.trainable_subset(params, labels)
  tx, schedule = optim.make_optimizer(config.optim, trainable, total_steps=total_steps,
                                      warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch)
  opt_abstract = jax.eval_shape(tx.init, trainable)
  opt_shardings = sharding.tree_shardings(opt_abstract, mesh, config.param_sharding, rules)
  if config.mode == "train":
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
  else:  # evaluation never steps: only the shapes, to restore a checkpoint with (no memory; a
    # test-time method's trainable set can be several whole CLIPs)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_abstract, opt_shardings)
  state = {"params": params, "model_state": model_state, "opt_state": opt_state,
           "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))}
  state_shardings = {"params": var_shardings["params"],
                     "model_state": {k: v for k, v in var_shardings.items() if k != "params"},
                     "opt_state": opt_shardings, "step": sharding.replicated(mesh)}
  train_step = jax.jit(
      make_train_step(model, tx, labels, method=method, loss_fn=loss_fn, seed=config.seed),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return Experiment(config, mesh, data, method, model, labels, schedule, state, state_shardings,
                    total_steps, steps_per_epoch, train_step, evals, eval_context)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or, with config.mode='eval', only evaluates) and returns the final metrics."""
  run_record.check_workdir(workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  for warning in run_record.prepare(workdir, config, checkpoint_dir,
                                    write=jax.process_index() == 0):
    log(f"WARNING: {warning}")
  log(f"process {jax.process_index()}/{jax.process_count()} with "
      f"{jax.local_device_count()}/{jax.device_count()} {jax.default_backend()} devices")
  exp = build(config)
  log(optim.parameter_table(exp.state["params"], exp.labels))
  state, total_steps = exp.state, exp.total_steps
  ckpt = checkpointing.Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
  best = checkpointing.BestCheckpoint(workdir, *config.keep_best) if config.get("keep_best") \
      else None
  try:
    latest = ckpt.restore_latest(exp.checkpointed(state), strict=config.get("strict_resume"),
                                 warn=log)
    start_step = latest[0] if latest else 0
    if latest:
      state = exp.restored(state, latest[1])
      log(f"resumed from {ckpt.directory} at step {start_step}")
    elif config.mode == "eval" and not config.get("model_init") and \
        not config.get("eval_random_init"):
      raise FileNotFoundError(f"mode='eval' needs a checkpoint in {ckpt.directory} or "
                              f"config.model_init (or config.eval_random_init=True to evaluate "
                              f"the random init); found neither.")
    writer = writers.create_writer(workdir)
    final = {"step": start_step}
    patience = config.get("early_stop_patience", 0)
    stopped_early = bool(patience) and best is not None and best.bad_evals >= patience
    if stopped_early:
      log(f"not training: the run stopped early before ({best.bad_evals} evaluations without a "
          f"better {best.metric}, early_stop_patience={patience})")
    if config.mode == "train" and start_step < total_steps and not stopped_early:
      state, train_metrics, last_step = _train_loop(exp, state, start_step, ckpt, best, writer)
      final.update(train_metrics, step=last_step)  # already written by the loop
    evals = evaluators.run_all(exp.evaluators, exp.evaluated(state))
    if best is not None and config.mode == "train":
      best.update(final["step"], evals, exp.checkpointed(state))
    if best is not None and best.best is not None:  # mode='eval': training's best, if any
      evals.update({"best/step": best.best["step"], f"best/{best.metric}": best.best["value"]})
      if config.get("eval_at_best"):
        at_best = exp.restored(state, best.restore(exp.checkpointed(state)))
        for name in config.eval_at_best:
          evals.update({f"at_best/{name}/{k}": v
                        for k, v in exp.evaluators[name].run(exp.evaluated(at_best)).items()})
    final.update(evals)
  finally:
    ckpt.close()  # waits for pending asynchronous saves, also when training stopped on an error
    if best is not None:
      best.close()
  writer.write_scalars(final["step"], evals)
  writer.flush()
  for key, value in headline_metrics(final).items():
    log(f"{key}: {value:.4f}")
  if jax.process_index() == 0:
    writers.write_json_atomic(os.path.join(workdir, "metrics.json"), final)
  return final


def headline_metrics(final: dict) -> dict[str, float]:
  """The evaluation metrics a run's summary prints: accuracies (and the zero-shot ones a
  test-time adaptation starts from), mAP, R@1/5/10, box AP and captions' CIDEr, by name."""
  return {key: final[key] for key in sorted(final)
          if key.endswith(("/accuracy", "/zeroshot_accuracy", "mAP", "R@1", "R@5", "R@10", "/AP",
                           "/CIDEr"))
          and not key.startswith("train/")}


def _train_loop(exp: Experiment, state, start_step: int, ckpt, best, writer):
  """Steps from `start_step` to the end (or an early stop) with periodic logging, evals and
  checkpoints; returns the state, the last logged train metrics and the last step."""
  config, total_steps = exp.config, exp.total_steps
  batches = pipeline.make_train_dataset(
      exp.data.source, config.train_split, exp.data.train_pp, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  progress = writers.Progress(total_steps, start_step)
  accum = config.optim.get("grad_accum_steps", 1)
  patience = config.get("early_stop_patience", 0)
  window, means = [], {}

  def check_and_log(step: int) -> dict:
    """The train metrics since the last call, logged; a non-finite loss or param stops the run
    here, so every checkpoint is checked finite before it is saved."""
    stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window))
    window.clear()
    if not stacked.pop("finite").all():
      ckpt.wait()
      kept = ckpt.latest_step()
      raise FloatingPointError(
          f"non-finite loss or params by step {step} (losses since the last check: "
          f"{stacked['loss'].tolist()}); stopped. " +
          (f"The last finite checkpoint is step {kept}, in {ckpt.directory} (every checkpoint "
           "is checked finite before it is saved)." if kept else
           "No checkpoint was saved (every checkpoint is checked finite before it is saved)."))
    metrics = {f"train/{k}": float(np.mean(v)) for k, v in stacked.items()}
    metrics["train/lr"] = float(exp.schedule((step - 1) // accum)) * optim.lr_factor(
        state["opt_state"])
    writer.write_scalars(step, metrics)
    log(progress.line(step, metrics))
    return metrics

  step = start_step
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = exp.train_step(state, sharding.global_batch(next(batches), exp.mesh))
    window.append(metrics)
    last = step == total_steps
    save = step % config.checkpoint_every_steps == 0 or last
    if step % config.log_every_steps == 0 or save:
      means = check_and_log(step)
    evals = {} if last else evaluators.run_all(exp.evaluators, exp.evaluated(state), step=step,
                                               steps_per_epoch=exp.steps_per_epoch)
    if evals:
      writer.write_scalars(step, evals)
      if best is not None:
        best.update(step, evals, exp.checkpointed(state))
      if optim.plateau_settings(config.optim):
        state = {**state, "opt_state": optim.plateau_step(state["opt_state"], evals, config.optim)}
    stop = bool(evals) and bool(patience) and best.bad_evals >= patience
    if stop:
      log(f"stopping early at step {step}: {best.bad_evals} evaluations without a better "
          f"{best.metric} (best {best.best['value']:.4f} at step {best.best['step']})")
      if window:
        means = check_and_log(step)
    if save or stop:
      ckpt.save(step, exp.checkpointed(state))
    if stop:
      break
  return state, means, step
