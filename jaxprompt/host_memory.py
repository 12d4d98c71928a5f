"""Keeping freed host memory for reuse: on CPU, XLA's per-step temporaries stop costing page faults.

XLA:CPU allocates a compiled step's temporaries as one block per execution and frees it when the
step ends (SA2VP ViT-B/16, batch 8: 4.3 GB). glibc's malloc serves a block that large with a fresh
`mmap` and returns it with `munmap`, so every step the kernel maps and zero-fills each 4 KiB page
again on first touch: 1.08 M page faults and 1.5 s of system CPU per step on the 2-core CPU we
measure on, a sixth of the step's CPU time, with no FLOP done (`benchmarks/train_step.py` prints
the step with and without it).

`reuse_freed_memory` sets glibc's allocator (`mallopt`) to keep what is freed: one arena for all
threads (M_ARENA_MAX=1: another thread's arena could only get a block that large from `mmap`),
no `mmap` for large blocks (M_MMAP_MAX=0), and no return of the heap's free top to the system
(M_TRIM_THRESHOLD at its maximum). The next step's temporaries then land on pages already mapped.
The cost is that the process keeps its peak heap resident, as caching allocators (jemalloc,
tcmalloc, PyTorch's) do. Accelerator memory is not affected; on a GPU/TPU host only host-side
buffers are kept.

It must run before the first JAX computation (before XLA's worker threads take their arenas);
`jaxprompt.main` and the benchmarks call it first thing. Where the C library is not glibc
(macOS, musl) it does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module docstring); True if it
  did, False where the C library is not glibc. Call before the first JAX computation."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
  except (OSError, TypeError):
    return False
  if not hasattr(libc, "gnu_get_libc_version"):  # the parameter numbers above are glibc's
    return False
  mallopt = libc.mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # M_TRIM_THRESHOLD takes a size_t through mallopt's int: -1 is SIZE_MAX, i.e. never trim.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)
