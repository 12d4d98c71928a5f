"""Reads pickles of plain data (containers of numpy arrays) without running code from the file.

`pickle.load` calls whatever callable the file names (`posix.system`, `builtins.eval`, ...), so a
downloaded data folder could run arbitrary code. Some files we must read are pickles anyway:
LMPT's `class_freq.pkl` (DistributionBalancedLoss's, a dict of numpy arrays such as 'gt_labels',
'class_freq', 'neg_class_freq', 'condition_prob'). `load` admits only the globals such a file
needs (numpy's array, dtype and scalar reconstruction, builtin containers and scalars) and refuses
any other with an error naming the file and the refused global.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
from typing import Any, Callable

import numpy as np

_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it (bytes saved as latin-1 text), nothing more."""
  if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
    raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}: only latin-1 "
                                 "(protocol-2 bytes) is admitted.")
  return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Callable]:
  numpy_globals = {
      "_reconstruct": _NUMPY_CORE.multiarray._reconstruct,
      "scalar": _NUMPY_CORE.multiarray.scalar,
  }
  allowed: dict[tuple[str, str], Callable] = {}
  # numpy 1.x pickles say numpy.core.*, numpy 2.x numpy._core.*: admit both spellings.
  for core in ("numpy.core", "numpy._core"):
    for name, value in numpy_globals.items():
      allowed[(f"{core}.multiarray", name)] = value
    allowed[(f"{core}.numeric", "_frombuffer")] = _NUMPY_CORE.numeric._frombuffer  # protocol 5
  allowed[("numpy", "ndarray")] = np.ndarray
  allowed[("numpy", "dtype")] = np.dtype
  allowed[("_codecs", "encode")] = _latin1_encode
  allowed[("collections", "OrderedDict")] = collections.OrderedDict
  for builtin in (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex,
                  bool):
    allowed[("builtins", builtin.__name__)] = builtin
  return allowed


_ALLOWED = _allowed()


class _NumpyUnpickler(pickle.Unpickler):
  """An Unpickler whose `find_class` admits only `_ALLOWED` (see the module docstring)."""

  def __init__(self, file, path: str):
    super().__init__(file, encoding="latin1")  # latin1: numpy's advice for Python 2 pickles
    self._path = path

  def find_class(self, module: str, name: str):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"Refusing to unpickle {self._path}: it names the global {module}.{name}, which could "
          "run code; only plain data (dicts/lists of numpy arrays) is read from pickles.") from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f"Refusing to unpickle {self._path}: it uses a persistent id "
                                 f"({pid!r}); only plain data is read from pickles.")


def load(path: str) -> Any:
  """Unpickles `path`, admitting only numpy arrays/scalars/dtypes and builtin containers.

  Raises:
    ValueError naming `path` when the file names any other global (the refused one is named) or
    is not a readable pickle; nothing from the file is called besides the admitted globals.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    try:
      return _NumpyUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
      if str(e).startswith("Refusing to unpickle"):
        raise ValueError(str(e)) from e
      raise ValueError(f"{path} is not a readable pickle of plain data: {e}") from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f"{path} is not a readable pickle of plain data (truncated or corrupt?): "
                       f"{type(e).__name__}: {e}") from e
