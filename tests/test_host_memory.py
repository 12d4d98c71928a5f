"""host_memory.reuse_freed_memory: repeated steps stop page-faulting their XLA temporaries."""
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES_OF_TEMPORARY = 4096 * 4096 * 4 // 4096

# A jitted step whose temporary (a 4096 x 4096 f32 product, 64 MiB) is far above glibc's largest
# mmap threshold (32 MiB); the output is 4096 x 8. Prints the minor page faults of each of 12
# calls after 3 warm-up calls.
_STEP_FAULTS = textwrap.dedent("""
    import resource, sys
    from jaxprompt import host_memory
    applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else None
    import jax, jax.numpy as jnp
    x, w, v = (jax.random.normal(jax.random.PRNGKey(i), s)
               for i, s in enumerate([(4096, 64), (64, 4096), (4096, 8)]))
    step = jax.jit(lambda x, w, v: (x @ w) @ v)
    faults = []
    for call in range(15):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(step(x, w, v))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults[3:])
""")


def step_faults(mode: str) -> tuple[str, list[int]]:
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout.splitlines()[-1]
  applied, *faults = out.split()
  return applied, [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_reused_host_memory_spares_repeated_steps_their_page_faults():
  applied, faults = step_faults("reuse")
  assert applied == "True"
  # A call that maps its temporary afresh faults on each of its 16,384 pages; with the freed
  # memory kept, a typical call reuses pages already mapped. (Now and then the small heap of this
  # toy step fragments and one call maps anew; a real step's settles: benchmarks/train_step.py.)
  assert statistics.median(faults) < 0.05 * PAGES_OF_TEMPORARY, faults
  assert sum(faults) < 0.5 * len(faults) * PAGES_OF_TEMPORARY, faults
  # The default allocator maps the temporary afresh on every call: the test can tell them apart.
  _, default_faults = step_faults("default")
  assert min(default_faults) > 0.8 * PAGES_OF_TEMPORARY, default_faults
