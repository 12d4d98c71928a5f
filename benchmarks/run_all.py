"""One table for every method with a config: its train step and eval step on this machine
(examples/s, XLA FLOPs, achieved FLOP/s, MFU, compile time, XLA memory) beside its input
pipeline's examples/s.

  python benchmarks/run_all.py             # every row: 1 warm-up + 2 timed calls of each step
  python benchmarks/run_all.py --only=sa2vp,vpt --steps=3

Why: a prompt-tuning paper's cost is its frozen backbone's forward and backward; this puts every
method's real step side by side at the paper's size, and says whether the input pipeline keeps up.

Each method runs in its own subprocess (`--child=NAME`), so one that fails or runs past
--row_timeout loses its row only, and each row's memory is its own. What a row times:
  * train: the trainer's step, `jaxprompt.train.build(config).train_step` (forward, backward to the
    trainables, optimizer update), on a batch the config's own train pp made from the embedded /
    written data below;
  * eval: the config's first evaluator's jitted predict function (`Evaluator.predict`: 'logits'
    for classification and multi-label, 'detect' for detection, 'embed_video' for video
    retrieval) on a batch of its eval pp; for TPT / RLCF (no training) the TTA adaptation of a
    batch of test samples, `tta.adapt` with the 'tta' evaluator's episode (benchmarks/tta.py's
    call); for RPL also `embed` (the category embeddings, `rpl.Model.category_embeddings` as
    `rpl_pipeline.category_embeddings` runs it) and `retrieve` (`rpl_pipeline`'s exact top-k,
    `retrieval.sharded_top_k`, which compiles at each call: its time includes the compile and
    its FLOPs are the 2 Q N E of the scores, not XLA's); for ClipCap, benchmarks/captioning.py's
    measurements at its 'reduced' size (beam search with and without the KV cache, the mapper's
    train step on a synthetic batch, RLCF captioning TTA one image at a time and batched);
  * pipeline: the config's train pp (TTA: its eval pp, the 64 views) through
    `pipeline.make_train_dataset` (TTA: the evaluator's batches) over the same data, batches of
    the step's size, examples/s over >= 32 examples (TTA: 8) after one warm-up batch, against
    the train step's rate (TTA: the adaptation's), flagged below the 5x the step needs.
Flags are argparse's, not absl's: the scripts it imports (glip.py, dgl.py, tta.py) define absl
flags of the same names when imported.

Timing: one compile, --warmup calls, then the median of --steps calls (TTA and RPL retrieve: one
warm-up, one timed call). FLOPs, XLA memory and MFU as `benchmarks/common.py` says; the matmul
peak is measured in the parent before and after the rows (the larger is used). Peak memory per
row is XLA's (arguments + temporaries + outputs - aliased) of that compiled step; each method's
process max RSS is printed under the table.

Data: the embedded generated sets (`embedded/shapes`, `embedded/named_shapes`, the multi-label
shapes, the detection scenes, RPL's demo crops) and MSR-VTT-layout H.264 videos written with PyAV
(`benchmarks/dgl.py`'s writer) pass through the real pp ops at the paper's sizes; their images are
small (32 px; videos 320 x 240), so the pipeline does no JPEG decode of full-size photos: its rate
is an upper bound for real files on this machine (the videos are decoded as real ones). Backbones
are random-init at the paper's sizes (throughput does not depend on the weights); the CLIP methods
use the project's byte-level vocabulary (context length 77 as CLIP's).

GLIP and SDPT use `benchmarks/glip.py`'s configs: configs/glip_coco.py's GLIP-T recipe on the
scenes renamed to 80 classes with 256-token captions, and SDPT's release trainable set with 700
prototypes per fusion layer (configs/sdpt_coco.py's paper run).

Sizes: the paper's model and input size with batch 8 (the papers train at 32-128; a CPU step of
that size takes minutes), except where a row says 'reduced' and why (the class count of the
embedded data, GLIP's canvas, SDPT's GLIP-T for GLIP-L, DGL's batch, RPL's category and pool
counts). Under the tables, where each method's wall time went: `train.build` (data, model init
and its compile), its steps' compiles, and the rest; the README's performance table is this
script's output.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PREFIX = "RESULT "  # a child's result line
MIN_PIPELINE_RATIO = 5.0
BATCH = 8


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  config: str  # the config file the row follows
  family: str  # the input pipeline's benchmark family
  unit: str  # what an example is


METHODS = {
    "vpt": Method("VPT-deep (10 prompts)", "vpt_vtab.py", "VTAB/FGVC classification", "images"),
    "vpt_swin": Method("VPT-deep, Swin-B", "vpt_swin_vtab.py", "VTAB/FGVC classification",
                       "images"),
    "sa2vp": Method("SA2VP (d = 16, deep maps at 4, 8, dropout live)", "sa2vp_vtab.py",
                    "VTAB/FGVC classification", "images"),
    "sa2vp_swin": Method("SA2VP, Swin-B", "sa2vp_swin_vtab.py", "VTAB/FGVC classification",
                         "images"),
    "coop": Method("CoOp (16 ctx)", "coop.py", "CLIP classification (CoOp)", "images"),
    "lmpt": Method("LMPT", "lmpt_coco_lt.py", "LMPT multi-label", "images"),
    "rpl": Method("RPL", "rpl_lvis.py", "RPL object crops", "images"),
    "glip": Method("GLIP-T (body, FPN, BERT frozen)", "glip_coco.py", "detection / grounding",
                   "images"),
    "sdpt": Method("SDPT (release set, 700 prototypes)", "sdpt_coco.py", "detection / grounding",
                   "images"),
    "dgl": Method("DGL", "dgl_msrvtt.py", "video (DGL)", "videos"),
    "tpt": Method("TPT", "tpt_imagenet.py", "TTA views", "samples"),
    "rlcf": Method("RLCF (reward ViT-L/14)", "rlcf_imagenet.py", "TTA views", "samples"),
    "clipcap": Method("ClipCap (transformer mapper, OPT-125m)", "clipcap_coco.py", "captioning",
                      "images"),
}


# ------------------------------------------------------------------------------------------------
# Configs at the paper's sizes on the embedded data.


def on_embedded_shapes(config):
  """A VTAB task's config (its model, optimizer and 224 px pp) on the embedded shapes."""
  from configs import common as config_common  # pylint: disable=import-outside-toplevel
  config.dataset, config.dataset_kwargs = "embedded/shapes", {}
  config.train_split, config.evals = "train", config_common.evals("test")
  config.batch_size = config.eval_batch_size = BATCH
  return config


def byte_vocab(config):
  from input_pipeline import embedded_clip  # pylint: disable=import-outside-toplevel
  config.model.vocab_path = embedded_clip.byte_vocabulary()
  return config


def config_of(name: str, args) -> tuple[object, str]:
  """(config, size description) of a trainer row; 'reduced: why' where it is not the paper's."""
  # pylint: disable=import-outside-toplevel
  if name in ("vpt", "vpt_swin", "sa2vp", "sa2vp_swin"):
    import importlib
    module = importlib.import_module(f"configs.{METHODS[name].config[:-3]}")
    # SVHN's settings: SA2VP's ViT at d = 16 (the original README's for SVHN; natural tasks: 8).
    config = on_embedded_shapes(module.get_config("task=svhn"))
    backbone = "Swin-B" if name.endswith("swin") else "ViT-B/16"
    return config, f"{backbone}, 224 px, b{BATCH}"
  if name == "coop":
    from configs import coop
    from input_pipeline import embedded_clip
    config = byte_vocab(coop.get_config(f"dataset={embedded_clip.NAME}"))
    config.batch_size = config.eval_batch_size = BATCH
    return config, (f"CLIP ViT-B/16, 224 px, b{BATCH}; reduced: "
                    f"{len(embedded_clip.CLASS_NAMES)} classes (ImageNet: 1000)")
  if name == "lmpt":
    from configs import lmpt_coco_lt, lmpt_voc_lt
    from input_pipeline import embedded_multilabel
    config = lmpt_coco_lt.get_config()  # the embedded multi-label demo, then the paper's sizes
    config.model.variant = "ViT-B/16"
    config.pp.image_size = 224
    config.pp.train, config.pp.eval = lmpt_voc_lt.lmpt_pp(224)
    config.batch_size = config.eval_batch_size = BATCH
    return config, (f"CLIP ViT-B/16, 224 px, b{BATCH}; reduced: "
                    f"{len(embedded_multilabel.CLASS_NAMES)} classes (COCO-LT: 80)")
  if name == "rpl":
    from configs import rpl_lvis
    from input_pipeline import embedded_coco
    config = byte_vocab(rpl_lvis.get_config(f"data={embedded_coco.demo_data().round1}"))
    config.batch_size = config.eval_batch_size = BATCH
    return config, f"CLIP ViT-B/32, 224 px, b{BATCH}"
  if name in ("glip", "sdpt"):
    from benchmarks import glip
    glip.register_scenes(args.glip_classes, args.glip_text_len)
    config = glip.make_config("frozen" if name == "glip" else "sdpt_release", batch_size=1,
                              train_size=(args.glip_size, args.glip_size))
    backbone = "" if name == "glip" else "GLIP-T (sdpt_coco.py: GLIP-L), "
    return config, (f"GLIP-T, {args.glip_classes} classes, {args.glip_text_len} tokens, b1; "
                    f"reduced: {backbone}{args.glip_size} px (COCO: 800 x 1333)")
  raise ValueError(f"No trainer row {name!r}.")


# ------------------------------------------------------------------------------------------------
# A child: one method's rows.


def time_pipeline(iterator, batch_size: int, examples: int = 32) -> float:
  """examples/s of `iterator` over >= `examples` examples, after one warm-up batch."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  next(iterator)
  batches = max(2, -(-examples // batch_size))
  return batches * batch_size / common.best_seconds(
      lambda: [next(iterator) for _ in range(batches)], repeats=1)


def step_row(step: str, timing, examples: int, size: str) -> dict:
  return dict(step=step, size=size, examples=examples, seconds=timing.seconds, flops=timing.flops,
              compile_s=timing.compile_s, xla_bytes=timing.xla_bytes)


def eval_call(exp, variables) -> tuple[Callable, tuple, int]:
  """(jitted predict, its arguments, examples) of the config's first evaluator on one eval batch."""
  evaluator = next(iter(exp.evaluators.values()))
  batch = next(iter(exp.eval_context.batches(evaluator.split)))
  examples = len(batch["_mask"])
  if evaluator.TYPE in ("classification", "multilabel"):
    return evaluator.predict("logits"), (variables, batch), examples
  if evaluator.TYPE == "detection":
    class_token_map = exp.data.source.grounding.class_token_map
    return evaluator.predict("detect"), (variables, batch, class_token_map), examples
  if evaluator.TYPE == "video_retrieval":
    return evaluator.predict("embed_video"), (variables, batch["video"]), examples
  raise ValueError(f"No eval step for evaluator type {evaluator.TYPE!r}.")


def trainer_rows(config, size: str, args) -> dict:
  """The pipeline, the train step and the first evaluator's predict of `config`."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import common
  from input_pipeline import pipeline
  from jaxprompt import sharding, train
  start = time.perf_counter()
  exp = train.build(config)
  build_s = time.perf_counter() - start
  dataset = pipeline.make_train_dataset(exp.data.source, config.train_split, exp.data.train_pp,
                                        global_batch_size=config.batch_size, seed=0)
  iterator = dataset.as_numpy_iterator()
  rate = time_pipeline(iterator, config.batch_size)
  batch = sharding.global_batch(next(iterator), exp.mesh)
  timing, (state, _) = common.time_step(exp.train_step, (exp.state, batch), steps=args.steps,
                                        warmup=args.warmup, carry=lambda a, out: (out[0], a[1]))
  rows = [step_row("train", timing, config.batch_size, size)]
  predict, predict_args, examples = eval_call(exp, exp.evaluated(state))
  timing, _ = common.time_step(predict, predict_args, steps=args.steps, warmup=args.warmup)
  rows.append(step_row("eval", timing, examples, size))
  return dict(rows=rows, pipeline=rate, exp=exp, state=state, build_s=build_s)


def rpl_rows(exp, state, size: str, args) -> list[dict]:
  """RPL's embed (the learned prompts of --rpl_categories categories through the text tower) and
  retrieve (their top 300 of a random --rpl_pool-image index)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from benchmarks import common
  from jaxprompt import rpl_pipeline
  from jaxprompt.evaluators import retrieval
  from jaxprompt.prompts import rpl
  config = exp.config
  entries = [f"category {i}{rpl.SEPARATOR}a thing of kind {i}" for i in range(args.rpl_categories)]
  model = rpl_pipeline.build_rpl_model(config, entries)
  params = {"clip": state["params"]["clip"], "prompt_learner": state["params"]["prompt_learner"]}
  embed = jax.jit(lambda p: model.apply({"params": p}, method=rpl.Model.category_embeddings))
  timing, features = common.time_step(embed, (params,), steps=args.steps, warmup=args.warmup)
  rows = [dict(unit="categories", **step_row("embed", timing, args.rpl_categories,
                   f"CLIP ViT-B/32 text; reduced: {args.rpl_categories} categories (LVIS: 1203)"))]
  rng = np.random.default_rng(0)
  pool = rng.normal(size=(args.rpl_pool, features.shape[1])).astype(np.float32)
  pool /= np.linalg.norm(pool, axis=1, keepdims=True)
  queries = np.asarray(features)
  retrieve = lambda: retrieval.sharded_top_k(pool, queries, 300)
  retrieve()  # warm-up
  seconds = common.best_seconds(retrieve, repeats=1)
  rows.append(dict(step="retrieve (top 300)", unit="queries", examples=len(queries),
                   seconds=seconds,
                   flops=2.0 * pool.size * len(queries), compile_s=None, xla_bytes=None,
                   size=f"{args.rpl_categories} queries, {args.rpl_pool:,} images; reduced: the "
                        "pool (LAION: 400 M); time incl. compile"))
  return rows


def dgl_rows(args) -> dict:
  """DGL on --dgl_videos H.264 videos in MSR-VTT's layout (benchmarks/dgl.py's writer)."""
  from benchmarks import dgl  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, "msrvtt")
    dgl.write_msrvtt(root, num_videos=args.dgl_videos, seconds=args.dgl_seconds, fps=30,
                     width=320, height=240)
    config = dgl.make_config(root, args.dgl_batch, frames=12, latent="transformer",
                             variant="ViT-B/32", words=32)
    config.eval_batch_size = args.dgl_batch
    paper_batch = dgl.make_config(root, 0, frames=12, latent="transformer", variant="ViT-B/32",
                                  words=32).batch_size  # batch 0: the config's own
    size = (f"CLIP ViT-B/32, T = 12, 224 px; reduced: b{args.dgl_batch} (MSR-VTT: "
            f"{paper_batch})")
    out = trainer_rows(config, size, args)
    out["pipeline_data"] = (f"{args.dgl_videos} H.264 320x240 30 fps {args.dgl_seconds:g} s, "
                            "decoded at 3 fps")
  return out


def tta_rows(name: str, args) -> dict:
  """TPT / RLCF: `tta.adapt` of a batch of --tta_batch test samples (64 views of 224 px each)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from benchmarks import common, tta as tta_bench
  from configs import rlcf_imagenet, tpt_imagenet
  from input_pipeline import embedded_clip
  from jaxprompt import train, tta
  settings = dict(dataset=embedded_clip.NAME, coop_ctx="", policy="ViT-B/16",
                  batch=args.tta_batch, batched=True, augmix=False)
  if name == "tpt":
    config = tpt_imagenet.tpt_config(mode="prompt", **settings)
  else:
    config = rlcf_imagenet.rlcf_config(variant="prompt", rewards=rlcf_imagenet.REWARDS[1],
                                       momentum=False, prompt_steps=3, **settings)
  config.eval_random_init = True
  byte_vocab(config)
  start = time.perf_counter()
  exp = train.build(config)
  build_s = time.perf_counter() - start
  evaluator = exp.evaluators["test"]
  batches = iter(exp.eval_context.batches("test"))
  rate = time_pipeline(batches, args.tta_batch, examples=8)  # 8 x 64 views
  views = next(batches)["views"]  # a global batch, as the evaluator adapts it
  episode, tunable0, frozen = evaluator.episode(exp.evaluated(exp.state))
  adapt = jax.jit(functools.partial(tta.adapt, episode))  # batched, as the evaluator runs it
  rng = jax.random.PRNGKey(0)
  timing, _ = common.time_step(adapt, (tunable0, frozen, views, rng), steps=1, warmup=1)
  timing.flops += tta_bench.later_steps_flops(episode, tunable0, frozen, views, rng)
  classes = len(embedded_clip.CLASS_NAMES)
  reward = ", reward ViT-L/14, 3 steps" if name == "rlcf" else ", 1 step"
  size = (f"CLIP ViT-B/16, 64 views of 224 px, b{args.tta_batch}{reward}; reduced: "
          f"{classes} classes (ImageNet: 1000)")
  return dict(rows=[step_row("eval (TTA adapt)", timing, args.tta_batch, size)], pipeline=rate,
              pipeline_data=f"{config.dataset} test, pp {config.pp.eval}", build_s=build_s)


def captioning_rows(args) -> dict:
  """ClipCap: benchmarks/captioning.py's measurements at its 'reduced' size, beside the config's
  train pp over the embedded captioned shapes."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import captioning
  from input_pipeline import pipeline
  settings = dataclasses.replace(captioning.SIZES["reduced"], steps=args.steps,
                                 warmup=args.warmup)
  paper = captioning.SIZES["paper"]
  start = time.perf_counter()
  captioner = captioning.build_captioner(settings)
  build_s = time.perf_counter() - start
  config, data = captioner.exp.config, captioner.exp.data
  dataset = pipeline.make_train_dataset(data.source, config.train_split, data.train_pp,
                                        global_batch_size=config.batch_size, seed=0)
  rate = time_pipeline(dataset.as_numpy_iterator(), config.batch_size)
  rows = [row for measure in captioning.MEASUREMENTS.values()
          for row in measure(captioner, settings)]
  for row in rows:
    if row["step"] == "train":
      reduced = f"b{settings.train_batch_size} (recipe: {paper.train_batch_size})"
    elif row["step"].startswith("RLCF"):
      reduced = captioning.tta_reductions(settings)
    else:
      reduced = f"{settings.max_new_tokens} new tokens (RLCF: {paper.max_new_tokens})"
    row["size"] = f"CLIP ViT-B/16, 224 px, OPT-125m, {row['size']}; reduced: {reduced}"
  return dict(rows=rows, pipeline=rate, pipeline_data=f"{config.dataset}, pp {config.pp.train}",
              build_s=build_s)


def run_child(name: str, args) -> dict:
  if name in ("tpt", "rlcf"):
    out = tta_rows(name, args)
  elif name == "clipcap":
    out = captioning_rows(args)
  elif name == "dgl":
    out = dgl_rows(args)
  else:
    config, size = config_of(name, args)
    out = trainer_rows(config, size, args)
    if name == "rpl":
      out["rows"] += rpl_rows(out["exp"], out["state"], size, args)
    out["pipeline_data"] = f"{out['exp'].config.dataset}, pp {out['exp'].config.pp.train}"
  return dict(rows=out["rows"], pipeline=out["pipeline"], pipeline_data=out["pipeline_data"],
              build_s=out["build_s"],
              max_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


# ------------------------------------------------------------------------------------------------
# The parent: the peak, the children, the tables.


def format_tables(results: dict, peak: float) -> str:
  """The step table and the pipeline table (markdown) of the children's `results`."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  gib = lambda b: "-" if b is None else f"{b / common.GIB:.2f}"
  steps, pipes = [], []
  for name, result in results.items():
    method = METHODS[name]
    if "error" in result:
      steps.append([f"{method.label} ({method.config})", "-", result["error"]] + ["-"] * 6)
      continue
    train_rate = None
    for row in result["rows"]:
      rate = row["examples"] / row["seconds"]
      if row["step"] == "train":
        train_rate = rate
      if row["flops"] is None:  # captioning's RLCF rows: host work between jitted calls
        counts = ["-"] * 3
      else:
        achieved = row["flops"] / row["seconds"]
        counts = [f"{row['flops'] / 1e9:,.0f}", f"{achieved / 1e9:.0f}",
                  f"{100 * achieved / peak:.0f}%"]
      steps.append([f"{method.label} ({method.config})", row["step"], row["size"],
                    f"{rate:.3g} {row.get('unit', method.unit)}/s", *counts,
                    "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}",
                    gib(row["xla_bytes"])])
    step_rate = train_rate or result["rows"][0]["examples"] / result["rows"][0]["seconds"]
    ratio = result["pipeline"] / step_rate
    verdict = "ok" if ratio >= MIN_PIPELINE_RATIO else f"**below {MIN_PIPELINE_RATIO:g}x**"
    pipes.append([method.family, method.label, result["pipeline_data"],
                  f"{result['pipeline']:.1f} {method.unit}/s", f"{ratio:.0f}x", verdict])
  step_table = common.markdown_table(
      ["method (config)", "step", "size", "throughput", "GFLOP/step", "GFLOP/s", "MFU",
       "compile s", "XLA GiB"], steps)
  pipe_table = common.markdown_table(
      ["family", "method", "data, pp", "pipeline", "pipeline / step", ">= 5x"], pipes)
  return step_table + "\n\n" + pipe_table


def format_wall_table(results: dict) -> str:
  """Where each method's wall time went (markdown): `train.build` (data, model init and its
  compile, optimizer state), its steps' compiles, and the rest (interpreter start and imports,
  the pipeline timing, the warm-up and timed calls), with the sums over methods."""
  from benchmarks import common  # pylint: disable=import-outside-toplevel
  rows, sums = [], [0.0, 0.0, 0.0]
  for name, result in results.items():
    if "wall_s" not in result:
      continue
    compiles = sum(row["compile_s"] or 0.0 for row in result["rows"])
    parts = [result["wall_s"], result["build_s"], compiles]
    sums = [a + b for a, b in zip(sums, parts)]
    rows.append([METHODS[name].label, *(f"{x:.0f}" for x in parts),
                 f"{parts[0] - parts[1] - parts[2]:.0f}"])
  rows.append(["all", *(f"{x:.0f}" for x in sums), f"{sums[0] - sums[1] - sums[2]:.0f}"])
  return common.markdown_table(
      ["method", "wall s", "build s (incl. init compile)", "step compiles s", "the rest s"], rows)


def run_parent(args) -> None:
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from benchmarks import common
  names = args.only.split(",") if args.only else list(METHODS)
  unknown = [n for n in names if n not in METHODS]
  if unknown:
    raise ValueError(f"--only: unknown method(s) {unknown}; valid: {list(METHODS)}.")
  start = time.perf_counter()
  peaks = [common.matmul_peak_flops(args.matmul_size, jnp.float32)]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs; "
        f"matmul peak ({args.matmul_size}^2 float32) {peaks[0] / 1e9:.1f} GFLOP/s; "
        f"{common.load_now()}", flush=True)
  results, loads = {}, []
  for name in names:
    row_start = time.perf_counter()
    command = [sys.executable, os.path.abspath(__file__), f"--child={name}"] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "only")]
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=args.row_timeout,
                            cwd=REPO)
      lines = [l for l in done.stdout.splitlines() if l.startswith(PREFIX)]
      if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        results[name] = {"error": f"failed (rc {done.returncode}): {tail[0][:200]}"}
      else:
        results[name] = json.loads(lines[-1][len(PREFIX):])
        results[name]["wall_s"] = time.perf_counter() - row_start
    except subprocess.TimeoutExpired:
      results[name] = {"error": f"over --row_timeout={args.row_timeout} s"}
    loads.append(os.getloadavg()[0])
    print(f"[{name}] {time.perf_counter() - row_start:.0f} s; {common.load_now()}; "
          f"{json.dumps(results[name])[:600]}", flush=True)
  peaks.append(common.matmul_peak_flops(args.matmul_size, jnp.float32))
  peak = max(peaks)
  print(f"\nmatmul peak (float32, {args.matmul_size}^2) before / after the rows: "
        f"{peaks[0] / 1e9:.0f} / {peaks[1] / 1e9:.0f} GFLOP/s (MFU against {peak / 1e9:.0f}); "
        f"1-minute load after each row {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} "
        f"CPUs; {args.steps} timed steps after {args.warmup} warm-up; total "
        f"{time.perf_counter() - start:.0f} s\n")
  print(format_tables(results, peak))
  print("\nprocess max RSS per method: " + ", ".join(
      f"{n} {r['max_rss'] / common.GIB:.1f} GiB" for n, r in results.items() if "max_rss" in r))
  print("\nwall time per method:\n" + format_wall_table(results))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help=f"Comma-separated of {','.join(METHODS)}.")
  parser.add_argument("--steps", type=int, default=2, help="Timed calls per step (median).")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed calls after the compile.")
  parser.add_argument("--row_timeout", type=int, default=600, help="Seconds per method.")
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--glip_size", type=int, default=256, help="GLIP/SDPT's square canvas.")
  parser.add_argument("--glip_classes", type=int, default=80)
  parser.add_argument("--glip_text_len", type=int, default=256)
  parser.add_argument("--dgl_batch", type=int, default=2)
  parser.add_argument("--dgl_videos", type=int, default=8)
  parser.add_argument("--dgl_seconds", type=float, default=4.0)
  parser.add_argument("--tta_batch", type=int, default=1)
  parser.add_argument("--rpl_categories", type=int, default=256)
  parser.add_argument("--rpl_pool", type=int, default=100_000)
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main():
  args = parse_args()
  if args.child:
    from jaxprompt import host_memory  # before the child's first JAX computation
    host_memory.reuse_freed_memory()  # as the trainer runs
    result = run_child(args.child, args)
    print(PREFIX + json.dumps(result), flush=True)
  else:
    run_parent(args)


if __name__ == "__main__":
  main()
