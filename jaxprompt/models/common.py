"""Backbone-agnostic checkpoint helpers: flat '/'-joined names, strict merging, PyTorch files.

Follows big_vision `big_vision/models/common.py::merge_params`: loading is strict. Every model
parameter must come from the checkpoint with the same shape unless its name full-matches one of the
`dont_load` regexes (then it keeps its init value), and every checkpoint entry must be used unless
it full-matches one of them (then it is dropped). Unlike big_vision, one error lists every problem
at once (missing, unexpected and mis-shaped names) together with the file it came from.

`load_torch_state_dict` reads Hugging Face / PyTorch weights into numpy so that each backbone's
converter (e.g. `jaxprompt.models.vit.convert_hf_vit`) only renames and reshapes. torch is an
optional dependency (`pip install -e '.[torch]'`): it is imported lazily, only for `torch.save`
files; `.safetensors`, `.npz` and TorchScript archives load without it.

Weight files come from the internet, so reading one never runs code from it: `.npz`/`.npy` with
allow_pickle=False, `torch.load` with weights_only=True, and TorchScript archives (OpenAI's CLIP
`.pt`) through `read_torchscript_state_dict`, which unpickles only tensors and inert module
records instead of `torch.jit.load` (that compiles the archive's code and runs its `__setstate__`
methods). Whatever goes wrong while reading (a truncated download, another format, a pickled
object), the error is one ValueError naming the file and the format that was expected.

Also shared by the models and methods: the argument checks (`require`), the block hook of deep
prompts (`BlockHook`), and PyTorch's default nn.Linear initialisers (`torch_linear_kernel_init`,
`torch_linear_bias_init`) for new layers that must start as the originals' do, and PyTorch's
bicubic resize as a matrix (`torch_bicubic_matrix`).
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TORCH_EXTENSIONS = (".bin", ".pt", ".pth")

# The formats named in read errors.
NPZ_FORMAT = "a NumPy .npz archive (a zip of .npy arrays)"
NPY_FORMAT = "a NumPy .npy array"
SAFETENSORS_FORMAT = "a .safetensors file"
TORCH_FORMAT = "a PyTorch checkpoint (a torch.save file of tensors)"
TORCHSCRIPT_FORMAT = "a TorchScript archive (e.g. OpenAI's CLIP .pt)"

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip
_NPY_MAGIC = b"\x93NUMPY"


class CheckpointError(ValueError):
  """A weight file that cannot be read; the message names the file and the expected format."""


def _first_line(error: BaseException, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def reading(path: str, file_format: str):
  """Turns any failure of a third-party reader inside the block (BadZipFile, SafetensorError,
  UnpicklingError, RuntimeError, EOFError, ...) into one `CheckpointError` naming `path` and
  `file_format`, chained to the original. A missing file or a missing optional package (an
  ImportError) passes through unchanged, and so do `CheckpointError`s."""
  try:
    yield
  except (CheckpointError, FileNotFoundError, ImportError, MemoryError):
    raise
  except Exception as e:
    raise CheckpointError(
        f"Cannot read {path!r} as {file_format}: {type(e).__name__}: {_first_line(e)}. Is the "
        "file truncated (an interrupted download) or in another format?") from e


def _check_file(path: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"File {path!r} does not exist.")
  return path


def _check_magic(path: str, magics: tuple[bytes, ...], file_format: str, what: str) -> None:
  with open(path, "rb") as f:
    start = f.read(max(len(m) for m in magics))
  if not any(start.startswith(m) for m in magics):
    raise CheckpointError(f"Cannot read {path!r} as {file_format}: it is not {what} (it starts "
                          f"with {start[:8]!r}). Is it truncated or in another format?")


def _object_array_error(path: str, entry: str) -> CheckpointError:
  return CheckpointError(
      f"Cannot read {path!r}: {entry} is an object array (pickled Python objects), which is "
      "refused because unpickling can run code. Save plain numeric arrays instead.")


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an `.npz` (allow_pickle=False), read eagerly so that errors surface here.

  Raises:
    FileNotFoundError when `path` is missing; CheckpointError (a ValueError) naming `path` when it
    is not a zip (numpy's own error would suggest allow_pickle), is truncated, or holds an object
    array.
  """
  path = _check_file(path)
  _check_magic(path, _ZIP_MAGICS, NPZ_FORMAT, "a zip archive")
  with reading(path, NPZ_FORMAT), np.load(path, allow_pickle=False) as npz:
    arrays = {}
    for name in npz.files:
      try:
        arrays[name] = npz[name]
      except ValueError as e:
        if "allow_pickle" in str(e):
          raise _object_array_error(path, f"entry {name!r}") from e
        raise
    return arrays


def load_npy(path: str) -> np.ndarray:
  """The array of an `.npy` (allow_pickle=False); errors name `path` as `load_npz`'s do."""
  path = _check_file(path)
  _check_magic(path, (_NPY_MAGIC,), NPY_FORMAT, "an .npy file")
  with reading(path, NPY_FORMAT):
    try:
      return np.load(path, allow_pickle=False)
    except ValueError as e:
      if "allow_pickle" in str(e):
        raise _object_array_error(path, "its array") from e
      raise


def import_torch(path: str):
  """`import torch`, or an ImportError saying how to get it for reading `path`."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Reading {path} (a PyTorch checkpoint) needs PyTorch: pip install -e "
                      "'.[torch]' (or convert it to .safetensors)") from e
  return torch


def torch_load(path: str):
  """`torch.load(weights_only=True)` on CPU; a refused global is named in a CheckpointError."""
  torch = import_torch(path)
  try:
    with reading(path, TORCH_FORMAT):
      return torch.load(path, map_location="cpu", weights_only=True)
  except CheckpointError as e:
    cause = str(e.__cause__)
    if "Weights only load failed" not in cause:
      raise
    # torch's message first suggests weights_only=False, which would run the file's code.
    match = re.search(r"\bGLOBAL ([\w.]+)", cause)
    if match:
      raise CheckpointError(
          f"Cannot read {path!r} as {TORCH_FORMAT}: it names the global {match.group(1)}, which "
          "is refused because unpickling it could run code. Save a plain state dict of tensors "
          "(or .safetensors).") from e.__cause__
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", cause)
    raise CheckpointError(
        f"Cannot read {path!r} as {TORCH_FORMAT}: "
        f"{detail.group(1) if detail else 'not a pickle of tensors'}. Is the file truncated (an "
        "interrupted download) or in another format?") from e.__cause__


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

  `.safetensors` goes through `safetensors.numpy` (no torch needed); a TorchScript archive through
  `read_torchscript_state_dict` (no torch needed); other `.bin`/`.pt`/`.pth` through
  `torch.load(map_location='cpu', weights_only=True)`, unwrapping a top-level 'model' or
  'state_dict' entry (training checkpoints) when present. bfloat16 tensors become float32, since
  numpy has no bfloat16; `merge_params` casts to the model's dtypes afterwards.

  Raises:
    FileNotFoundError for a missing file, ImportError when a torch.save file needs the missing
    torch, and CheckpointError (a ValueError naming the file and format) for an unreadable one.
  """
  path = _check_file(path)
  extension = os.path.splitext(path)[1].lower()

  if extension == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    with reading(path, SAFETENSORS_FORMAT):
      return dict(load_file(path))

  if extension not in TORCH_EXTENSIONS:
    raise ValueError(f"Cannot read {path!r}: unknown extension {extension!r}; expected "
                     f"'.safetensors' or one of {TORCH_EXTENSIONS}.")
  if is_torchscript_archive(path):
    return read_torchscript_state_dict(path)
  torch = import_torch(path)
  state = torch_load(path)
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


# ------------------------------------------------------------------------------------------------
# TorchScript archives, read without torch.jit.load.
#
# An archive (torch.jit.save) is a zip <prefix>/{data.pkl, data/<key>, code/**.py, constants.pkl,
# byteorder, ...}. data.pkl pickles the module tree: each module is GLOBAL '__torch__.<qualified
# class>' + NEWOBJ + BUILD with a dict of its attributes; each tensor is
# torch._utils._rebuild_tensor_v2 of a persistent id ('storage', torch.<Type>Storage, key,
# location, numel) whose bytes are data/<key>. Which attributes are parameters and buffers (the
# state dict) is written in the class's code file as `__parameters__ = [...]` and
# `__buffers__ = [...]`, read here as text, never run.
# ------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": "f4", "HalfStorage": "f2", "DoubleStorage": "f8", "BFloat16Storage": "u2",
    "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


def is_torchscript_archive(path: str) -> bool:
  """TorchScript zips hold '<prefix>/constants.pkl' and 'code/'; `torch.save` zips do not."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


class _ScriptObject:
  """An inert record of one TorchScript object of data.pkl: class name and attributes."""
  qualified_name = ""

  def __setstate__(self, state):
    self.attributes = state


class _StorageType(str):
  """torch.<Type>Storage in a persistent id (its name; `_STORAGE_DTYPES` has its dtype)."""


def _identity(value, *unused):
  return value


def _script_classes(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[bool, list, list]]:
  """{qualified class name: (is a Module, parameter names, buffer names)} from code/**.py."""
  classes = {}
  code = f"{prefix}/code/"
  for entry in archive.namelist():
    if not (entry.startswith(code) and entry.endswith(".py")):
      continue
    module = entry[len(code):-len(".py")].replace("/", ".")
    text = archive.read(entry).decode("utf-8", errors="replace")
    for block in re.split(r"^(?=class )", text, flags=re.M):
      header = re.match(r"class (\w+)\s*(\(\s*Module\s*\))?\s*:", block)
      if not header:
        continue
      members = []
      for field in ("__parameters__", "__buffers__"):
        found = re.search(rf"^\s+{field} = \[([^\]]*)\]", block, flags=re.M)
        members.append(re.findall(r'"([^"]*)"', found.group(1)) if found else [])
      classes[f"{module}.{header.group(1)}"] = (bool(header.group(2)), *members)
  return classes


class _TorchScriptUnpickler(pickle.Unpickler):
  """Unpickles data.pkl into `_ScriptObject`s and numpy arrays; any other global is refused."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(archive.open(f"{prefix}/data.pkl"))
    self._archive, self._prefix, self._path = archive, prefix, path
    order = archive.read(f"{prefix}/byteorder").decode().strip() if (
        f"{prefix}/byteorder" in archive.namelist()) else "little"
    self._byteorder = {"little": "<", "big": ">"}.get(order)
    if self._byteorder is None:
      raise CheckpointError(f"{path!r}: unknown byteorder {order!r}.")
    self._storages: dict[str, np.ndarray] = {}
    self._classes: dict[str, type] = {}

  def find_class(self, module: str, name: str):
    if module == "__torch__" or module.startswith("__torch__."):
      qualified = f"{module}.{name}"
      if qualified not in self._classes:
        self._classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
      return self._classes[qualified]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor
    if (module, name) == ("collections", "OrderedDict"):
      return OrderedDict
    if module == "torch.jit._pickle" and (name.startswith("build_") or name == "restore_type_tag"):
      return _identity  # typed-list / type-tag markers: the value itself
    raise CheckpointError(
        f"Cannot read {self._path!r} as {TORCHSCRIPT_FORMAT}: its data.pkl names the global "
        f"{module}.{name}, which is refused because unpickling it could run code.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointError(f"{self._path!r}: unexpected persistent id {pid!r} in data.pkl.")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder(self._byteorder)
      data = self._archive.read(f"{self._prefix}/data/{key}")
      if len(data) < numel * dtype.itemsize:
        raise CheckpointError(f"{self._path!r}: storage {key} has {len(data)} bytes for "
                              f"{numel} elements of {dtype}.")
      self._storages[key] = np.frombuffer(data, dtype, count=numel)
    return self._storages[key], storage_type == "BFloat16Storage"

  def _rebuild_tensor(self, storage, offset, size, stride, *unused):
    storage, is_bfloat16 = storage
    size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0:
      raise CheckpointError(f"{self._path!r}: bad tensor size {size} / stride {stride}.")
    if 0 in size:
      array = np.zeros(size, storage.dtype)
    else:
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if offset < 0 or last >= storage.size:
        raise CheckpointError(f"{self._path!r}: a tensor (offset {offset}, size {size}, stride "
                              f"{stride}) overruns its storage of {storage.size} elements.")
      array = np.lib.stride_tricks.as_strided(
          storage[offset:], size, tuple(s * storage.itemsize for s in stride))
    array = np.array(array, storage.dtype.newbyteorder("="))  # a native-order copy
    if is_bfloat16:  # bfloat16 is the top half of a float32
      array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_torchscript_state_dict(path: str) -> dict[str, np.ndarray]:
  """The state dict of a TorchScript archive (what `torch.jit.load(path).state_dict()` gives) as
  numpy arrays, without torch and without running the archive's code (see above). bfloat16
  becomes float32, as in `load_torch_state_dict`.

  Raises:
    CheckpointError naming `path` when the archive names a global other than tensors, storages
    and TorchScript classes, or is truncated or malformed.
  """
  path = _check_file(path)
  with reading(path, TORCHSCRIPT_FORMAT), zipfile.ZipFile(path) as archive:
    prefixes = [name[:-len("/data.pkl")] for name in archive.namelist()
                if re.fullmatch(r"[^/]+/data\.pkl", name)]
    if len(prefixes) != 1:
      raise CheckpointError(f"Cannot read {path!r} as {TORCHSCRIPT_FORMAT}: expected one "
                            f"<name>/data.pkl, found {len(prefixes)}.")
    classes = _script_classes(archive, prefixes[0])
    root = _TorchScriptUnpickler(archive, prefixes[0], path).load()

  state: dict[str, np.ndarray] = {}
  seen: set[int] = set()

  def visit(obj: _ScriptObject, prefix: str) -> None:
    if id(obj) in seen:
      return
    seen.add(id(obj))
    attributes = getattr(obj, "attributes", None)
    if not isinstance(attributes, dict):
      return
    _, params, buffers = classes.get(
        obj.qualified_name,
        (True, [k for k, v in attributes.items() if isinstance(v, np.ndarray)], []))
    for name in (*params, *buffers):
      value = attributes.get(name)
      if isinstance(value, np.ndarray):
        state[prefix + name] = value
      elif value is not None:
        raise CheckpointError(f"{path!r}: {prefix + name} is a {type(value).__name__}, not a "
                              "tensor.")
    for name, value in attributes.items():
      if isinstance(value, _ScriptObject) and classes.get(value.qualified_name, (True,))[0]:
        visit(value, f"{prefix}{name}.")

  if not isinstance(root, _ScriptObject):
    raise CheckpointError(f"Cannot read {path!r} as {TORCHSCRIPT_FORMAT}: data.pkl holds a "
                          f"{type(root).__name__}, not a module.")
  visit(root, "")
  return state


def require(module, **conditions: tuple[bool, str]) -> None:
  """Raises a ValueError naming `module`'s field, its value and what was expected when a condition
  is False; for checking a method's sizes when its Model is constructed, before any tracing:
  `require(self, num_prompts=(self.num_prompts >= 1, "an integer >= 1"))`."""
  for field, (ok, expected) in conditions.items():
    if not ok:
      raise ValueError(f"{type(module).__module__}.{type(module).__name__}: config.model.{field}="
                       f"{getattr(module, field)!r}; expected {expected}.")


# The block hook every encoder here takes (ViT `Encoder`, Swin `Stage`, CLIP `Transformer`; BERT
# and GPT-2 towers follow it): hook(index, block, x) -> x runs instead of `block(x)` for block
# `index` of a stack. `block(y)` runs that frozen block on any input of its kind (a token
# sequence, a Swin map), so a prompt method may change x before the block (VPT's deep prompts),
# after it, run the block on a second stream too (SA2VP), or skip nothing at all. The hook's own
# modules must exist before the call: one built inside it becomes a child of the running stack.
# Swin's `Model` binds the stage first: block_hook(stage, index, block, x).
BlockHook = Callable[[int, Callable, Any], Any]


def run_block(index: int, block: Callable, x, hook: BlockHook | None):
  """`block(x)`, or `hook(index, block, x)` when there is a hook."""
  return block(x) if hook is None else hook(index, block, x)


def torch_linear_kernel_init():
  """PyTorch's default nn.Linear / nn.Conv2d weight init (kaiming-uniform, a=sqrt(5)):
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) over a (fan_in, fan_out) kernel."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default nn.Linear / nn.Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda rng, shape, dtype=jnp.float32: jax.random.uniform(rng, shape, dtype, -bound, bound)


def torch_bicubic_matrix(size_in: int, size_out: int, *, align_corners: bool = False,
                         a: float = -0.75) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's 1-D bicubic `F.interpolate`: the Keys kernel with
  a = -0.75 on the 4 taps around each source position, out-of-range taps clamped to the edge.
  Source positions: half-pixel centres, (i + 0.5) in / out - 0.5 (align_corners=False), or
  i (in - 1) / (out - 1) (align_corners=True)."""
  if align_corners:
    source = np.arange(size_out) * ((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
  else:
    source = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  base = np.floor(source).astype(int)
  matrix = np.zeros((size_out, size_in))
  for tap in range(-1, 3):
    d = np.abs(source - base - tap)
    weight = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                      ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
    np.add.at(matrix, (np.arange(size_out), np.clip(base + tap, 0, size_in - 1)), weight)
  return matrix
