"""Checks of a run's config that can be made before anything is built, each a one-line error.

Two kinds:

  * `check_overrides(config, file_config)`: the command line may add keys only under the free-form
    kwargs dicts (`dataset_kwargs`, whose keys belong to the data source); any other new key is a
    typo and is refused with the valid keys of its parent. `main.py` parses `--config.*` with
    new attributes accepted so that the README's `--config.dataset_kwargs.root=DIR` works, and
    calls this to keep every other key strict.
  * `check_spine(config)`: every spine setting has a value the trainer can use (positive
    intervals and sizes, finite learning rate, known modes and dtypes). Without it
    `log_every_steps=0` divided by zero mid-run, `keep_checkpoints=0` silently kept nothing and
    `optim.lr=nan` trained NaNs.

Method-specific sizes (`num_prompts`, `n_ctx`, ...) are checked by each method's `Model` when it
is constructed (`models.common.require`), which is also before the first step.
"""
from __future__ import annotations

import math

import ml_collections

FREE_FORM_KEYS = ("dataset_kwargs",)  # their keys are the data source's keyword arguments
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SHARDING_RULES = ("none", "megatron")  # the names of jaxprompt.sharding.SHARDING_RULES


class ConfigError(ValueError):
  """A config value the trainer cannot use; the message names the key and what was expected."""


def _flat_keys(config) -> set[str]:
  flat = set()
  for key, value in config.items():
    flat.add(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)) and key not in FREE_FORM_KEYS:
      flat.update(f"{key}.{sub}" for sub in _flat_keys(value))
  return flat


def check_overrides(config, file_config) -> None:
  """Refuses keys that `config` has and `file_config` (the config file's own) does not, except
  under `FREE_FORM_KEYS`."""
  new = sorted(_flat_keys(config) - _flat_keys(file_config))
  if new:
    key = new[0]
    parent, _, _ = key.rpartition(".")
    holder = file_config
    for part in filter(None, parent.split(".")):
      holder = holder[part]
    raise ConfigError(f"Unknown config key --config.{key}; valid keys"
                      f"{' of ' + parent if parent else ''}: {', '.join(sorted(holder.keys()))}.")


def _require(ok: bool, key: str, value, expected: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}={value!r}: expected {expected}.")


def _int_at_least(config, key: str, minimum: int, default=None) -> None:
  value = _get(config, key, default)
  if value is None and default is not None:
    value = default
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value,
           f"an integer >= {minimum}")


def _number_at_least(config, key: str, minimum: float, default=0.0) -> None:
  value = _get(config, key, default)
  _require(isinstance(value, (int, float)) and not isinstance(value, bool) and
           math.isfinite(value) and value >= minimum, key, value, f"a finite number >= {minimum}")


def _get(config, dotted: str, default=None):
  *parents, leaf = dotted.split(".")
  for parent in parents:
    config = config.get(parent) or {}
  return config.get(leaf, default)


def check_spine(config) -> None:
  """Every spine key the trainer reads, checked before the data or the model are built."""
  _require(config.get("mode") in ("train", "eval"), "mode", config.get("mode"), "'train' or 'eval'")
  _require(not config.get("eval_random_init") or config.mode == "eval", "eval_random_init",
           config.get("eval_random_init"), "False unless mode='eval' (training starts from the "
           "random init anyway)")
  _require(config.get("compute_dtype", "float32") in COMPUTE_DTYPES, "compute_dtype",
           config.get("compute_dtype"), f"one of {COMPUTE_DTYPES}")
  _require(config.get("param_sharding", "replicate") in ("replicate", "fsdp"), "param_sharding",
           config.get("param_sharding"), "'replicate' or 'fsdp'")
  for key in ("batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _int_at_least(config, key, 1)
  for key in ("total_steps", "eval_batch_size"):
    _int_at_least(config, key, 0, default=0)
  _int_at_least(config, "mesh.num_devices", 0, default=0)
  _int_at_least(config, "mesh.model", 1, default=1)
  rules = config.get("sharding_rules", "none")
  _require(rules in SHARDING_RULES, "sharding_rules", rules, f"one of {SHARDING_RULES}")
  _require(_get(config, "mesh.model", 1) == 1 or rules != "none", "sharding_rules", rules,
           "a rule set ('megatron') when mesh.model > 1: without one no param is split on the "
           "model axis")
  if not config.get("total_steps"):
    _require(isinstance(config.get("num_epochs"), (int, float)) and config.num_epochs > 0,
             "num_epochs", config.get("num_epochs"), "> 0 when total_steps is 0")
  smoothing = config.get("label_smoothing", 0.0)
  _require(0.0 <= smoothing < 1.0, "label_smoothing", smoothing, "a number in [0, 1)")
  _require(isinstance(config.get("train_split"), str) and config.train_split, "train_split",
           config.get("train_split"), "a split name")
  evals = config.get("evals") or {}
  _require(config.mode == "train" or bool(evals), "evals", evals, "at least one evaluator in "
           "mode='eval'")
  keep_best = tuple(config.get("keep_best") or ())
  if keep_best:
    _require(len(keep_best) == 2 and isinstance(keep_best[0], str) and
             keep_best[1] in ("max", "min"), "keep_best", keep_best,
             "('<evaluator>/<metric>', 'max' or 'min'), e.g. ('val/accuracy', 'max')")
    _require(keep_best[0].split("/")[0] in evals, "keep_best", keep_best,
             f"a metric of one of the evaluators {sorted(evals)} ('<evaluator>/<metric>')")
  _int_at_least(config, "early_stop_patience", 0, default=0)
  variants = config.get("variants") or ()
  _require(isinstance(variants, (tuple, list)) and all(
      isinstance(v, str) and v and all("=" in item or item.isidentifier()
                                       for item in v.split(",")) for v in variants),
           "variants", variants, "a tuple of config arguments, e.g. ('mask=release', 'mask=full')")
  _require(not config.get("early_stop_patience") or bool(keep_best), "early_stop_patience",
           config.get("early_stop_patience"), "0 without keep_best (it counts evaluations that do "
           "not improve the keep_best metric)")
  at_best = tuple(config.get("eval_at_best") or ())
  _require(not at_best or bool(keep_best), "eval_at_best", at_best, "() without keep_best")
  _require(all(name in evals for name in at_best), "eval_at_best", at_best,
           f"names of evaluators among {sorted(evals)}")
  optim = config.get("optim")
  _require(optim is not None, "optim", optim, "the optimizer settings (configs/common.optimizer)")
  _require(optim.get("name") in ("sgd", "adamw"), "optim.name", optim.get("name"),
           "'sgd' or 'adamw'")
  for key in ("lr", "weight_decay", "min_lr", "warmup_epochs", "warmup_steps", "grad_clip_norm",
              "warmup_init"):
    _number_at_least(config, f"optim.{key}", 0.0)
  _int_at_least(config, "optim.grad_accum_steps", 1, default=1)
  _require(optim.get("decay", "cosine") in ("cosine", "linear", "multistep"), "optim.decay",
           optim.get("decay"), "'cosine', 'linear' or 'multistep'")
  wd_ratio = optim.get("weight_decay_schedule_ratio", 0.0)
  _require(isinstance(wd_ratio, (int, float)) and not isinstance(wd_ratio, bool)
           and 0.0 <= wd_ratio <= 1.0, "optim.weight_decay_schedule_ratio", wd_ratio,
           "a number in [0, 1] (0: a constant weight decay; GLIP: 0.667)")
  _require(not wd_ratio or optim.get("decay") == "multistep", "optim.weight_decay_schedule_ratio",
           wd_ratio, "0 unless optim.decay='multistep' (it follows the lr milestones)")
  ema = optim.get("ema_decay", 0.0)
  _require(isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0.0 <= ema < 1.0,
           "optim.ema_decay", ema, "a number in [0, 1) (0: no moving average; GLIP: 0.999)")
  _require(not optim.get("ema_for_eval") or ema > 0, "optim.ema_for_eval",
           optim.get("ema_for_eval"), "False unless optim.ema_decay > 0")
  momentum = optim.get("momentum", 0.9)
  _require(momentum is None or 0.0 <= momentum < 1.0, "optim.momentum", momentum,
           "a number in [0, 1)")
