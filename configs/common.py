"""Helpers shared by every config file (in the manner of big_vision's `configs/common.py`).

A config is `configs/<method>_<benchmark>.py` with `get_config(arg=None)`; `arg` is the text after
the colon in `--config configs/x.py:task=dtd,runlocal`, parsed here into typed knobs once.
"""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2,k3=v3' against `defaults` (their types convert the values).

  A bare `k` means `k=True`. Unknown keys raise with the list of valid ones.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      value = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key}={value!r} is not a boolean.")
      value = value.lower() in ("true", "1")
    elif default is not None:
      value = type(default)(value)
    parsed[key] = value
  return parsed
