"""Several runs of one config file side by side: `config.variants`.

A config may name variants of itself as config arguments, e.g. `configs/sdpt_coco.py`'s demo

  config.variants = ("mask=release", "mask=full", "mask=language_prompt")

Then `python -m jaxprompt.main --config configs/sdpt_coco.py` runs the file once per variant, with
the variant's arguments after the command line's own (`configs/sdpt_coco.py:mask=full`), each in
`<workdir>/<variant>` and each with the command line's `--config.*` overrides, and prints one table
of every run's headline metrics with their mean (an ODinW suite's averaged AP is that mean, as GLIP
averages its per-dataset runs). `<workdir>/variants.json` holds every run's final metrics. A
variant's own runs are plain runs: its `variants` is emptied.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import jax
import ml_collections
import numpy as np

from jaxprompt import config_checks, train, writers


def variant_argument(config_argument: str, variant: str) -> str:
  """`path[:args]` with `variant`'s arguments after the command line's own (they win)."""
  path, _, args = config_argument.partition(":")
  return f"{path}:{','.join(filter(None, (args, variant)))}"


def overrides(config, file_config) -> dict[str, object]:
  """The dotted keys where `config` (the command line's) differs from `file_config` (the file's
  own), with the command line's values: the `--config.*` overrides."""
  def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)) and value:
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value.to_dict() if isinstance(
            value, ml_collections.ConfigDict) else value
    return out

  given, own = flat(config), flat(file_config)
  return {key: value for key, value in given.items() if key not in own or own[key] != value}


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for parent in parents:
    if parent not in config:
      config[parent] = ml_collections.ConfigDict()
    config = config[parent]
  config[leaf] = value


def run(config_argument: str, config, workdir: str,
        file_config: Callable[[str], ml_collections.ConfigDict]) -> dict[str, dict]:
  """Trains and evaluates every variant of `config` (module docstring); returns
  {variant: final metrics}. `file_config(argument)` builds a config file's own config."""
  changed = overrides(config, file_config(config_argument))
  changed.pop("variants", None)
  finals = {}
  for variant in config.variants:
    variant_config = file_config(variant_argument(config_argument, variant))
    variant_config.unlock()
    for key, value in changed.items():
      _set(variant_config, key, value)
    variant_config.variants = ()
    config_checks.check_spine(variant_config)
    variant_config.lock()
    variant_dir = os.path.join(workdir, re.sub(r"[^A-Za-z0-9=,.+-]", "_", variant))
    train.log(f"variant {variant}: workdir {os.path.abspath(variant_dir)}")
    finals[variant] = train.train_and_evaluate(variant_config, variant_dir)
  train.log("\n" + table(finals))
  if jax.process_index() == 0:
    writers.write_json_atomic(os.path.join(workdir, "variants.json"), finals)
  return finals


def table(finals: dict[str, dict]) -> str:
  """The variants' headline metrics (`train.headline_metrics`) as rows, with their mean."""
  columns = sorted({key for final in finals.values() for key in train.headline_metrics(final)})
  width = max([len("variant"), len("mean")] + [len(v) for v in finals])
  lines = [" | ".join(["variant".ljust(width)] + columns)]
  for variant, final in finals.items():
    lines.append(" | ".join([variant.ljust(width)] + [
        f"{final[c]:.4f}".rjust(len(c)) if c in final else "-".rjust(len(c)) for c in columns]))
  means = [np.mean([final[c] for final in finals.values() if c in final]) for c in columns]
  lines.append(" | ".join(["mean".ljust(width)] + [f"{m:.4f}".rjust(len(c))
                                                   for m, c in zip(means, columns)]))
  return "\n".join(lines)
