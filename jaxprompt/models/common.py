"""Backbone-agnostic checkpoint helpers: flat '/'-joined names, strict merging, PyTorch files.

Follows big_vision `big_vision/models/common.py::merge_params`: loading is strict. Every model
parameter must come from the checkpoint with the same shape unless its name full-matches one of the
`dont_load` regexes (then it keeps its init value), and every checkpoint entry must be used unless
it full-matches one of them (then it is dropped). Unlike big_vision, one error lists every problem
at once (missing, unexpected and mis-shaped names) together with the file it came from.

`load_torch_state_dict` reads Hugging Face / PyTorch weights into numpy so that each backbone's
converter (e.g. `jaxprompt.models.vit.convert_hf_vit`) only renames and reshapes. torch is a
test-only dependency: it is imported lazily and `.safetensors` files load without it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np

TORCH_EXTENSIONS = (".bin", ".pt", ".pth")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are anything that is not a Mapping."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}; the inverse of `flatten`."""
  tree: dict = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for i, part in enumerate(parents):
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"Name {name!r} nests under {'/'.join(parents[:i + 1])!r}, "
                         "which is itself a leaf.")
    if leaf in node:
      raise ValueError(f"Name {name!r} is both a leaf and a prefix of other names.")
    node[leaf] = value
  return tree


def _full_matches_any(name: str, patterns: Iterable[str]) -> bool:
  return any(re.fullmatch(pattern, name) for pattern in patterns)


def merge_params(loaded: Mapping, init_params: Mapping, *, dont_load: Iterable[str] = (),
                 source: str = "<checkpoint>") -> dict:
  """Strictly merges checkpoint params `loaded` (flat or nested) into `init_params` (nested).

  Args:
    loaded: checkpoint params, nested or flat with '/'-joined names.
    init_params: freshly initialised model params (the 'params' collection), nested.
    dont_load: regexes full-matched against '/'-joined names. A matching model param keeps its
      init value (whether or not the checkpoint has it, whatever its shape there); a matching
      checkpoint entry that the model lacks is dropped.
    source: the checkpoint file, named in the error.

  Returns:
    A nested dict shaped like `init_params`, with the dtypes of `init_params`.

  Raises:
    ValueError listing every missing, unexpected and mis-shaped name when the two do not match.
  """
  dont_load = tuple(dont_load)
  loaded = flatten(loaded)
  init = flatten(init_params)

  missing, wrong_shape, merged = [], [], {}
  for name, init_value in init.items():
    if _full_matches_any(name, dont_load):
      merged[name] = init_value
    elif name not in loaded:
      missing.append(name)
    elif tuple(np.shape(loaded[name])) != tuple(np.shape(init_value)):
      wrong_shape.append(f"{name}: checkpoint {tuple(np.shape(loaded[name]))} vs expected "
                         f"{tuple(np.shape(init_value))}")
    else:
      merged[name] = jnp.asarray(loaded[name], dtype=init_value.dtype)
  unexpected = [name for name in loaded
                if name not in init and not _full_matches_any(name, dont_load)]

  if missing or unexpected or wrong_shape:
    lines = [f"Checkpoint {source} does not match the model's parameters "
             f"(dont_load={dont_load!r}):"]
    for title, names in (("missing from the checkpoint", missing),
                         ("in the checkpoint but not in the model", unexpected),
                         ("wrong shape", wrong_shape)):
      if names:
        lines.append(f"  {title} ({len(names)}):")
        lines.extend(f"    {name}" for name in sorted(names))
    raise ValueError("\n".join(lines))
  return unflatten(merged)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch/Hugging Face state dict into numpy arrays.

  `.safetensors` goes through `safetensors.numpy` (no torch needed); `.bin`/`.pt`/`.pth` through
  `torch.load(map_location='cpu', weights_only=True)`, unwrapping a top-level 'model' or
  'state_dict' entry (training checkpoints) when present. bfloat16 tensors become float32, since
  numpy has no bfloat16; `merge_params` casts to the model's dtypes afterwards.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Checkpoint file {path!r} does not exist.")
  extension = os.path.splitext(path)[1].lower()

  if extension == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(path))

  if extension not in TORCH_EXTENSIONS:
    raise ValueError(f"Cannot read {path!r}: unknown extension {extension!r}; expected "
                     f"'.safetensors' or one of {TORCH_EXTENSIONS}.")
  import torch  # test-only dependency
  state = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict"):
    if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
      break
  if not isinstance(state, Mapping):
    raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict.")
  arrays = {}
  for name, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      raise ValueError(f"{path!r}: entry {name!r} is a {type(tensor).__name__}, not a tensor.")
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    arrays[name] = tensor.detach().cpu().numpy()
  return arrays
