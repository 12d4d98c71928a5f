"""Two processes x 4 CPU devices (jax.distributed, gloo) give the one-device run: the same global
batches, losses, evaluation metrics and checkpoints, which either topology restores, also for
SA2VP's two streams; a mesh of fewer devices takes them evenly from both processes; processes
that cannot join stop with a clear error (`sharding.join_processes`)."""
import json
import os
import socket
import subprocess
import sys

import pytest

from jaxprompt import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: num_processes process_id coordinator workroot reference_workroot job...
WORKER = r"""
import json, os, shutil, sys, time
num_processes, process_id, coordinator, workroot, reference, *jobs = sys.argv[1:]
from jaxprompt import sharding
if int(num_processes) > 1:
  sharding.join_processes(coordinator, int(num_processes), int(process_id), timeout_s=120)
import jax
from jax.experimental import multihost_utils
from configs import coop, sa2vp_vtab, vpt_vtab
from input_pipeline import pipeline
from jaxprompt import evaluators, train

CONFIGS = {  # job -> (config module, overrides); a run uses all of this topology's devices
    "vpt": (vpt_vtab, {}),
    "vpt_fsdp": (vpt_vtab, {"model.variant": "Ti/8", "param_sharding": "fsdp", "optim.lr": 0.02}),
    "coop": (coop, {}),
    "coop_fsdp": (coop, {"param_sharding": "fsdp"}),
    # The demo's two-block mu/4 ViT (the prompt stream meets the image stream in block 1).
    "sa2vp": (sa2vp_vtab, {"eval_batch_size": 500}),
}

def configured(job):
  module, overrides = CONFIGS[job]
  config = module.get_config("runlocal")
  config.eval_batch_size = 200  # few evaluation steps
  config.update_from_flattened_dict(overrides)
  return config

def steps(job, count=3):
  # Losses, the first global batch's labels (as every process sees them) and the evaluation
  # metrics after `count` steps on this process's part of the input stream.
  config = configured(job)
  exp = train.build(config)
  batches = pipeline.make_train_dataset(
      exp.data.source, config.train_split, exp.data.train_pp, global_batch_size=config.batch_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count()).as_numpy_iterator()
  state, losses, labels = exp.state, [], None
  for _ in range(count):
    batch = sharding.global_batch(next(batches), exp.mesh)
    if labels is None and "label" in batch:
      labels = multihost_utils.process_allgather(batch["label"], tiled=True).tolist()
    state, metrics = exp.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  return {"losses": losses, "labels": labels,
          "evals": evaluators.run_all(exp.evaluators, exp.evaluated(state)),
          "data_sharded": any("data" in str(x.sharding.spec)
                              for x in jax.tree.leaves(state["params"]))}

def run(workdir):
  # A whole run (4 steps, checkpoints at 2 and 4, metrics.json) in `workdir`.
  config = configured("vpt")
  config.checkpoint_every_steps, config.keep_checkpoints = 2, 3
  return train.train_and_evaluate(config, os.path.join(workroot, workdir))

result = {}
if jax.process_count() > 1:  # the processes that give a 4-device and a 2 x 2 mesh's devices
  result["mesh_processes"] = [[d.process_index for d in sharding.make_mesh(4, model).devices.flat]
                              for model in (1, 2)]
for job in jobs:
  if job == "run":
    result[job] = run("run")
  elif job == "resume":  # the reference topology's run, its step-4 checkpoint deleted
    for _ in range(1200):  # the reference run may still be going: wait up to 10 minutes
      if os.path.exists(os.path.join(reference, "run", "metrics.json")):
        break
      time.sleep(0.5)
    if jax.process_index() == 0:
      shutil.copytree(os.path.join(reference, "run"), os.path.join(workroot, "resumed"))
      shutil.rmtree(os.path.join(workroot, "resumed", "checkpoints", "4"))
    multihost_utils.sync_global_devices("copied")
    result[job] = run("resumed")
  else:
    result[job] = steps(job)
print("RESULT" + json.dumps(result), flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(runs, timeout: int) -> list[tuple[int, str, str]]:
  """Starts one Python per (argv, CPU devices) in `runs`, all at once; their (rc, stdout,
  stderr)."""
  env = lambda devices: dict(
      os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for argv, devices in runs]
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs)]
  finally:
    for p in procs:
      p.kill()


def _compare_topologies(tmp_path, jobs):
  """The jobs' results from one process with one device and from two processes x 4 devices, run
  at the same time; with 'run' in `jobs`, the pair also resumes the single device's run."""
  single, pair = tmp_path / "single", tmp_path / "pair"
  coordinator = f"localhost:{_free_port()}"
  argv = lambda n, i, root, extra: (["-c", WORKER, str(n), str(i), coordinator, str(root),
                                     str(single), *jobs, *extra], 1 if n == 0 else 4)
  outputs = _launch([argv(0, 0, single, []), *(argv(2, i, pair, ["resume"] * ("run" in jobs))
                                                for i in range(2))], timeout=900)
  for rc, out, err in outputs:
    assert rc == 0, out[-2000:] + err[-4000:]
  results = [json.loads(out.split("RESULT")[-1]) for _, out, _ in outputs]
  assert results[1] == results[2]  # both processes of the pair saw the same metrics
  for job in jobs:
    layout = "data_sharded"  # where the params live differs, nothing else
    _assert_close({k: v for k, v in results[0][job].items() if k != layout},
                  {k: v for k, v in results[1][job].items() if k != layout}, job)
  return results[0], results[1]


def _assert_close(a, b, name):
  if isinstance(a, dict):
    assert a.keys() == b.keys(), name
    for key in a:
      _assert_close(a[key], b[key], f"{name}/{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), name
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{name}[{i}]")
  elif isinstance(a, float):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (name, a, b)
  else:
    assert a == b, (name, a, b)


def test_two_processes_match_one_device_and_share_checkpoints(tmp_path):
  single, pair = _compare_topologies(tmp_path, ["run", "coop_fsdp", "sa2vp"])
  # The same global batches in the same order, not only the same loss.
  assert single["coop_fsdp"]["labels"] == pair["coop_fsdp"]["labels"]
  assert pair["coop_fsdp"]["data_sharded"]  # FSDP really splits params (CLIP's token table)
  assert pair["run"]["test/examples"] == 1000  # every test example once over both processes
  # The checkpoints are written once (one folder per step) by the two processes together, and a
  # one-device run's checkpoint resumes on two processes to the end of the uninterrupted run.
  assert sorted(os.listdir(tmp_path / "pair" / "run" / "checkpoints")) == ["2", "4"]
  with open(tmp_path / "pair" / "run" / "metrics.json") as f:
    _assert_close(json.load(f), single["run"], "metrics.json")
  _assert_close(pair["resume"], single["run"], "resumed")
  assert single["sa2vp"]["evals"]["test/examples"] == 1000
  assert pair["mesh_processes"] == [[0, 0, 1, 1], [0, 0, 1, 1]]  # not process 0's 4 devices


@pytest.mark.slow
def test_two_processes_match_one_device_for_vpt_fsdp_and_coop(tmp_path):
  _compare_topologies(tmp_path, ["vpt_fsdp", "coop"])


def test_processes_that_cannot_join_stop_with_a_clear_error():
  """No coordinator (only process 1 of 2 started), and two processes that disagree on the count."""
  main = lambda port, n, i: ["-m", "jaxprompt.main", "--config", "configs/vpt_vtab.py:runlocal",
                             f"--coordinator_address=localhost:{port}", f"--num_processes={n}",
                             f"--process_id={i}", "--distributed_timeout=5"]
  port = _free_port()
  alone, *disagreeing = _launch([(main(_free_port(), 2, 1), 1), (main(port, 2, 0), 1),
                                 (main(port, 3, 1), 1)], timeout=120)
  rc, _, err = alone
  assert rc == 1 and "did not all join within 5 s" in err, err[-2000:]
  assert "coordinator_address=localhost:" in err and "num_processes=2, process_id=1" in err
  for rc, _, err in disagreeing:
    assert rc == 1 and "disagree on num_processes: [2, 3]" in err, err[-2000:]


def test_join_settings_are_checked_before_joining():
  with pytest.raises(ValueError, match="process_id=2 must be in"):
    sharding.join_processes("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="give all three"):
    sharding.join_processes("localhost:1234", 2)
  with pytest.raises(ValueError, match="expected 'host:port'"):
    sharding.join_processes("localhost", 2, 0)
