"""The trainer spine: one jitted train step, evaluation, checkpoints, metrics. Read top to bottom.

Shaped after big_vision's `train.py`: build mesh -> data -> model -> init or load -> optimizer ->
shardings -> jit the update -> loop with periodic actions (log, eval, checkpoint). Every method
plugs in as a module `jaxprompt.<config.model_name>` that exports

  * `Model(num_classes=..., dtype=..., **config.model)`: a Linen module whose
    `apply({'params': p}, images, train=bool, rngs=...)` returns `(logits, aux)`;
  * `TRAINABLE_PARAMS`: the regex of param names that train (overridable by
    `config.trainable_params`);
  * `load(init_params, path)`: pretrained backbone weights merged into `init_params`;
  * optionally `make_loss(config, source) -> loss(logits, aux, batch)`: per-example losses (or a
    scalar for the whole batch) for training and evaluation; default `cross_entropy_loss`.
    Accuracy always uses `logits`.

Methods whose inputs or metrics need more than `batch['label']` (multi-label LMPT) may also export

  * `MODEL_INPUTS`: batch keys besides 'image' passed to the model as keyword arguments when the
    batch has them (LMPT: 'caption_tokens', which only training batches carry);
  * `source_kwargs(config) -> dict`: extra keyword arguments of the data source (LMPT: the
    caption tokenizer, which a config cannot hold);
  * `make_metrics(config, source) -> metrics(logits, labels) -> dict`: metrics of a whole eval
    split from its logits (N, C) and labels (N, ...) ('labels' when the batches carry them, else
    'label'), on the host; they replace accuracy and loss as '{split}/{name}'.

Training batches without 'label' log no accuracy. `optim.plateau` (optim.py) lowers the lr when an
evaluation metric stops improving (evaluations every `eval_every_steps`, or `eval_every_epochs`).
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

import input_pipeline
from input_pipeline import pipeline, preprocess
from jaxprompt import checkpointing, config_checks, optim, run_record, sharding, writers


@dataclasses.dataclass
class Data:
  source: object
  train_pp: object
  eval_pp: object


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def check_workdir(workdir: str) -> None:
  """Fails early, naming the folder, when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); pass "
                          f"--workdir with a folder you can write to.") from e


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


def method_module(config):
  """The method's module, `jaxprompt.<config.model_name>`."""
  return importlib.import_module(f"jaxprompt.{config.model_name}")


def build_model(config, num_classes: int, class_names=None):
  """The method module and its Model; a Model with a `class_names` field (CLIP prompt methods)
  gets the data source's names unless `config.model.class_names` sets them."""
  module = method_module(config)
  dtype = jnp.dtype(config.get("compute_dtype", "float32"))
  kwargs = dict(config.model)
  if "class_names" in getattr(module.Model, "__dataclass_fields__", {}) and \
      not kwargs.get("class_names") and class_names is not None:
    kwargs["class_names"] = tuple(class_names)
  return module, module.Model(num_classes=num_classes, dtype=dtype, **kwargs)


def trainable_subset(params, labels):
  flat, flat_labels = (traverse_util.flatten_dict(t, sep="/") for t in (params, labels))
  return traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if flat_labels[k] == optim.TRAIN}, sep="/")


def with_trainable(params, subset):
  flat = traverse_util.flatten_dict(params, sep="/")
  flat.update(traverse_util.flatten_dict(subset, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def cross_entropy_loss(config, source):
  """The default `make_loss`: softmax cross-entropy on batch['label'] (config.label_smoothing)."""
  smoothing = config.get("label_smoothing", 0.0)
  return lambda logits, aux, batch: optim.cross_entropy(logits, batch["label"],
                                                        source.num_classes, smoothing)


def model_inputs(batch, keys) -> dict:
  """The `MODEL_INPUTS` keyword arguments that `batch` has."""
  return {k: batch[k] for k in keys if k in batch}


def make_train_step(model, tx, labels, *, loss_fn, seed: int, input_keys=()):
  """(state, batch) -> (state, metrics); state = {'params', 'opt_state', 'step'}; the loss is the
  mean of `loss_fn(logits, aux, batch)`."""
  base_rng = jax.random.PRNGKey(seed)

  def train_step(state, batch):
    rng = jax.random.fold_in(base_rng, state["step"])

    def mean_loss(params):
      logits, aux = model.apply({"params": params}, batch["image"], train=True,
                                rngs={"dropout": rng}, **model_inputs(batch, input_keys))
      return jnp.mean(loss_fn(logits, aux, batch)), logits

    (loss, logits), grads = jax.value_and_grad(mean_loss, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optim.apply_updates(state["params"], updates, labels)
    # 1.0 while the loss and every trained param are finite; the loop stops on 0.
    finite = jnp.isfinite(loss)
    for leaf in jax.tree.leaves(trainable_subset(params, labels)):
      finite &= jnp.all(jnp.isfinite(leaf))
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss, "finite": finite.astype(jnp.float32)}
    if "label" in batch:
      metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, metrics

  return train_step


def make_eval_step(model, *, loss_fn, keep_logits: bool = False, input_keys=()):
  """(params, batch) -> sums of correct predictions, loss and real (unpadded) examples; with
  `keep_logits` -> the batch's 'logits', labels ('labels', else 'label') and '_mask' instead."""

  def eval_step(params, batch):
    logits, aux = model.apply({"params": params}, batch["image"], train=False,
                              **model_inputs(batch, input_keys))
    if keep_logits:
      return {"logits": logits, "labels": batch["labels" if "labels" in batch else "label"],
              "_mask": batch["_mask"]}
    mask = batch["_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    loss = jnp.broadcast_to(loss_fn(logits, aux, batch), mask.shape)
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}

  return eval_step


def evaluate(exp: "Experiment", params, split: str) -> dict:
  """Accuracy and loss over every example of `split` (padding masked out), or the method's
  `make_metrics` on the logits of every example."""
  dataset = pipeline.make_eval_dataset(
      exp.data.source, split, exp.data.eval_pp,
      global_batch_size=exp.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  if exp.metrics_fn is not None:
    outputs = [jax.device_get(exp.eval_step(params, sharding.global_batch(local, exp.mesh)))
               for local in dataset.as_numpy_iterator()]
    keep = np.concatenate([o["_mask"] for o in outputs]).astype(bool)
    logits = np.concatenate([o["logits"] for o in outputs])[keep]
    labels = np.concatenate([o["labels"] for o in outputs])[keep]
    metrics = {f"{split}/{k}": v for k, v in exp.metrics_fn(logits, labels).items()}
    return {**metrics, f"{split}/examples": int(keep.sum())}
  totals = None
  for local in dataset.as_numpy_iterator():
    sums = exp.eval_step(params, sharding.global_batch(local, exp.mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {f"{split}/accuracy": float(totals["correct"]) / count,
          f"{split}/loss": float(totals["loss"]) / count, f"{split}/examples": int(count)}


def schedule_lengths(config, num_train_examples: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from `*_steps` when set, else from `*_epochs`."""
  steps_per_epoch = max(1, num_train_examples // config.batch_size)
  total = config.get("total_steps") or int(round(config.num_epochs * steps_per_epoch))
  warmup = config.optim.get("warmup_steps") or int(round(
      config.optim.get("warmup_epochs", 0) * steps_per_epoch))
  return total, warmup


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built from a config: data, model, optimizer, sharded state, steps."""
  config: object
  mesh: object
  data: Data
  module: object
  model: object
  labels: dict
  schedule: object
  state: dict  # {'params', 'opt_state', 'step'}, sharded
  state_shardings: dict
  total_steps: int
  train_step: object  # jitted (state, batch) -> (state, metrics); donates state
  eval_step: object  # jitted (params, batch) -> sums (or logits, with metrics_fn)
  metrics_fn: object = None  # the method's `make_metrics(config, source)`, or None
  eval_every_steps: int = 0  # periodic evaluations during training (0: only at the end)
  eval_batch_size: int = 1  # config.eval_batch_size rounded up to a multiple of the devices

  def checkpointed(self, state) -> dict:
    """The part of `state` a checkpoint holds: trainable params, optimizer state, step."""
    return {"params": trainable_subset(state["params"], self.labels),
            "opt_state": state["opt_state"], "step": state["step"]}


def build(config) -> Experiment:
  """Mesh -> data -> model -> init or load -> optimizer -> sharded state -> jitted steps."""
  config_checks.check_spine(config)
  mesh = sharding.make_mesh(config.mesh.num_devices, config.mesh.model)
  sharding.check_batch_size(config.batch_size, mesh)
  eval_batch_size = sharding.padded_batch_size(config.get("eval_batch_size") or config.batch_size,
                                               mesh)
  if eval_batch_size != (config.get("eval_batch_size") or config.batch_size):
    log(f"eval_batch_size {config.get('eval_batch_size') or config.batch_size} -> "
        f"{eval_batch_size}, a multiple of the {mesh.shape[sharding.DATA]} devices (padding is "
        "masked out of the metrics)")
  module = method_module(config)
  data = build_data(config, getattr(module, "source_kwargs", lambda _: {})(config))
  for split in ((config.train_split,) if config.mode == "train" else ()) + tuple(
      config.eval_splits):
    data.source.check_split(split)
  num_classes = data.source.num_classes
  module, model = build_model(config, num_classes, getattr(data.source, "class_names", None))
  image_shape = (1, config.pp.image_size, config.pp.image_size, 3)
  init_fn = lambda rng: model.init(rng, jnp.zeros(image_shape, jnp.float32))["params"]
  param_shardings = sharding.tree_shardings(
      jax.eval_shape(init_fn, jax.random.PRNGKey(0)), mesh, config.param_sharding)
  params = jax.jit(init_fn, out_shardings=param_shardings)(jax.random.PRNGKey(config.seed))
  if config.get("model_init"):
    log(f"loading pretrained weights from {config.model_init}")
    host_params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_put(module.load(host_params, config.model_init), param_shardings)

  labels = optim.param_labels(params, config.get("trainable_params") or module.TRAINABLE_PARAMS)
  num_train = data.source.num_examples(config.train_split)
  total_steps, warmup_steps = schedule_lengths(config, num_train)
  eval_every = config.get("eval_every_steps") or int(round(
      config.get("eval_every_epochs", 0) * max(1, num_train // config.batch_size)))
  if optim.plateau_settings(config.optim) and not eval_every:
    raise ValueError("optim.plateau steps on evaluation metrics: set eval_every_steps or "
                     "eval_every_epochs.")
  tx, schedule = optim.make_optimizer(config.optim, params, labels, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, params), mesh,
                                          config.param_sharding)
  state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
           "step": jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))}
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                     "step": sharding.replicated(mesh)}
  loss_fn = getattr(module, "make_loss", cross_entropy_loss)(config, data.source)
  metrics_fn = module.make_metrics(config, data.source) if hasattr(module, "make_metrics") \
      else None
  input_keys = tuple(getattr(module, "MODEL_INPUTS", ()))
  train_step = jax.jit(
      make_train_step(model, tx, labels, loss_fn=loss_fn, seed=config.seed,
                      input_keys=input_keys),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, loss_fn=loss_fn, keep_logits=metrics_fn is not None,
                                     input_keys=input_keys),
                      in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.replicated(mesh))
  return Experiment(config, mesh, data, module, model, labels, schedule, state, state_shardings,
                    total_steps, train_step, eval_step, metrics_fn, eval_every, eval_batch_size)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains (or, with config.mode='eval', only evaluates) and returns the final metrics."""
  check_workdir(workdir)
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
  try:
    latest = ckpt.restore_latest(exp.checkpointed(state), strict=config.get("strict_resume"),
                                 warn=log)
    start_step = latest[0] if latest else 0
    if latest:
      restored = latest[1]
      state = {"params": with_trainable(state["params"], restored["params"]),
               "opt_state": restored["opt_state"], "step": restored["step"]}
      log(f"resumed from {ckpt.directory} at step {start_step}")
    elif config.mode == "eval" and not config.get("model_init"):
      raise FileNotFoundError(f"mode='eval' needs a checkpoint in {ckpt.directory} or "
                              f"config.model_init; found neither.")
    run_evals = lambda params: {k: v for split in config.eval_splits
                                for k, v in evaluate(exp, params, split).items()}
    writer = writers.create_writer(workdir)
    final = {"step": start_step}
    if config.mode == "train" and start_step < total_steps:
      state, train_metrics = _train_loop(exp, state, start_step, ckpt, writer, run_evals)
      final.update(train_metrics, step=total_steps)  # already written by the loop
    evals = run_evals(state["params"])
    final.update(evals)
  finally:
    ckpt.close()  # waits for pending asynchronous saves, also when training stopped on an error
  writer.write_scalars(final["step"], evals)
  writer.flush()
  for key in sorted(final):
    if key.endswith(("/accuracy", "mAP")):
      log(f"{key}: {final[key]:.4f}")
  if jax.process_index() == 0:
    writers.write_json_atomic(os.path.join(workdir, "metrics.json"), final)
  return final


def _train_loop(exp: Experiment, state, start_step: int, ckpt, writer, run_evals):
  """Steps from `start_step` to the end with periodic logging, evals and checkpoints."""
  config, total_steps = exp.config, exp.total_steps
  batches = pipeline.make_train_dataset(
      exp.data.source, config.train_split, exp.data.train_pp, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  progress = writers.Progress(total_steps, start_step)
  accum = config.optim.get("grad_accum_steps", 1)
  window, means = [], {}
  for step in range(start_step + 1, total_steps + 1):
    state, metrics = exp.train_step(state, sharding.global_batch(next(batches), exp.mesh))
    window.append(metrics)
    last = step == total_steps
    save = step % config.checkpoint_every_steps == 0 or last
    if step % config.log_every_steps == 0 or save:
      # Also before every checkpoint: a NaN loss stops the run before it can be saved.
      stacked = jax.device_get(jax.tree.map(lambda *x: jnp.stack(x), *window))
      window = []
      if not stacked.pop("finite").all():
        ckpt.wait()
        kept = ckpt.latest_step()
        raise FloatingPointError(
            f"non-finite loss or params by step {step} (losses since the last check: "
            f"{stacked['loss'].tolist()}); stopped. " +
            (f"The last finite checkpoint is step {kept}, in {ckpt.directory} (every checkpoint "
             "is checked finite before it is saved)." if kept else
             "No checkpoint was saved (every checkpoint is checked finite before it is saved)."))
      means = {f"train/{k}": float(np.mean(v)) for k, v in stacked.items()}
      means["train/lr"] = float(exp.schedule((step - 1) // accum)) * optim.lr_factor(
          state["opt_state"])
      writer.write_scalars(step, means)
      log(progress.line(step, means))
    if exp.eval_every_steps and step % exp.eval_every_steps == 0 and not last:
      evals = run_evals(state["params"])
      writer.write_scalars(step, evals)
      if optim.plateau_settings(config.optim):
        state = {**state, "opt_state": optim.plateau_step(state["opt_state"], evals, config.optim)}
    if save:
      ckpt.save(step, exp.checkpointed(state))
  return state, means
