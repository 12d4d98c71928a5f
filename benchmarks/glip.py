"""GLIP-T on this machine: train-step and inference throughput, FLOPs, MFU, compile time, memory,
and what the step's time goes to (deformable conv / DyConv, fusion, NMS).

  python benchmarks/glip.py                                  # 256 x 256, batch 1, + 800 x 1344
  python benchmarks/glip.py --image_size=384 --batch_size=2 --big_inference=false
  python benchmarks/glip.py --modes=frozen --micro=false
  python benchmarks/glip.py --modes=frozen,sdpt_paper,sdpt_release --micro=false --big_inference=false
  python benchmarks/glip.py --modes=frozen,sdpt_release --train_size=800,1344 --steps=2 \
      --micro=false --big_inference=false

Why: GLIP-T (231.8 M parameters, 6 fusion layers of width 2048, DCNv2 in every DyConv) is the
heaviest model here, and its COCO recipe runs 800 x 1333 images; this measures what a step costs
before anyone plans a run, and whether the deformable conv and the NMS (both written as gathers
and loops rather than matmuls) dominate it.

What is timed (median of --steps after a compile-and-warm-up call):
  * frozen: the trainer's step (`jaxprompt.train.build(config).train_step`) with the Swin body,
    FPN and BERT frozen (`glip_finetune.freeze_regex(body=True, fpn=True, language=True)`);
  * full: the same with GLIP's full fine-tuning (`glip_finetune.TRAINABLE_PARAMS`);
  * sdpt_paper / sdpt_release (with --modes): SDPT with 700 prototypes per fusion layer, training
    the prototypes alone / the release's set; against 'frozen' this shows what the prototypes
    (the pseudo-inverses, recomputed each step as in the release, and K extra tokens) cost;
  * inference: `predict_fns(model, config)['detect']` (eval-mode model + ATSS post-processing
    with class-aware NMS) on one image at --image_size and, with --big_inference, at 800 x 1344
    (COCO's test canvas, batch 1);
  * micro: small jitted pieces at the shapes of the --image_size step (one DyConv block forward
    and backward, its 13 DCNv2 convs alone, one VLFuse block forward and backward without and
    with its attention dropout, one tower BERT layer, the post-processing with NMS), so their
    share of the step can be read off; the tower runs 6 of each. The "top costs" table ranks
    them by time per step against the measured frozen step.

FLOPs are XLA's cost analysis of the compiled step (dots at 2 x MACs, plus one per elementwise
op), so MFU is that count over the time, against the measured matmul peak.

The config is `configs/glip_coco.py`'s with size 'T', text length 256 and 80 classes (only the
frozen `cls_logits` depends on the class count), trained on GLIP's recipe; the data source is
the embedded detection scenes renamed to 80 class names (only its element spec and class count
are used), and the batch is synthetic with the spec's keys and shapes (image, text_ids,
text_mask, boxes, box_labels, box_mask, positive_map, image_size, orig_size, image_id).

Measurement helpers are `benchmarks/common.py`'s; the flags --batch_size, --image_size, --steps,
--matmul_size are `benchmarks/train_step.py`'s, imported as a module (its --config and --variant
are not used here). `benchmarks/run_all.py` uses `register_scenes` and `make_config`. Peak memory
on CPU is the process's maximum RSS, so it is the peak over everything run before the line that
prints it.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import common  # noqa: E402
from benchmarks import train_step  # noqa: E402  (defines the shared flags)
import input_pipeline  # noqa: E402
from configs import glip_coco  # noqa: E402
from input_pipeline import detection, embedded_detection, pipeline  # noqa: E402
from jaxprompt import host_memory, sharding, train  # noqa: E402
from jaxprompt.models import bert  # noqa: E402
from jaxprompt.models.glip import deform_conv, detector, dyconv, fusion, inference  # noqa: E402
from jaxprompt.prompts import glip_finetune, sdpt  # noqa: E402


FLAGS = train_step.FLAGS  # train_step's flags (--batch_size, --steps, ...) and this file's
FLAGS.set_default("batch_size", 1)
FLAGS.set_default("image_size", 256)
FLAGS.set_default("steps", 3)
flags.DEFINE_list("modes", ["frozen", "full"], "Train steps to time, of: frozen (Swin, FPN and "
                  "BERT frozen), full, sdpt_paper (SDPT's prototypes alone), sdpt_release.")
flags.DEFINE_integer("sdpt_tokens", 700, "SDPT prototypes per fusion layer (the release's).")
flags.DEFINE_bool("big_inference", True, "Also time 'detect' on one 800 x 1344 image.")
flags.DEFINE_list("big_size", ["800", "1344"], "Height, width of the big inference.")
flags.DEFINE_list("train_size", [], "Height, width of the train steps' images (e.g. 800,1344, "
                  "COCO's canvas at batch 1); default --image_size square.")
flags.DEFINE_bool("micro", True, "Time the DyConv / DCNv2 / VLFuse / NMS microbenchmarks.")
flags.DEFINE_integer("text_len", 256, "Text length (GLIP's MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN).")
flags.DEFINE_integer("num_classes", 80, "Classes of the caption and of cls_logits.")
flags.DEFINE_integer("max_boxes", 100, "Padded boxes per image (the COCO config's).")

SOURCE_NAME = "benchmark/glip_scenes"
# mode -> (method, trainable regex)
MODES = {
    "frozen": ("prompts.glip_finetune",
               glip_finetune.freeze_regex(body=True, fpn=True, language=True)),
    "full": ("prompts.glip_finetune", glip_finetune.TRAINABLE_PARAMS),
    "sdpt_paper": ("prompts.sdpt", sdpt.SDPT_PAPER),
    "sdpt_release": ("prompts.sdpt", sdpt.SDPT_RELEASE),
}


class ScenesWithClasses(embedded_detection.DetectionShapesSource):
  """The embedded scenes under `num_classes` class names: labels 1..4 stay valid."""

  def __init__(self, num_classes: int, max_text_len: int):
    names = tuple(f"class {i}" for i in range(num_classes))
    self.lvis_fields = False  # DetectionShapesSource's COCO-style ground truth
    detection.DetectionSource.__init__(
        self, SOURCE_NAME, names, tuple(embedded_detection.SPLIT_SIZES),
        vocab=embedded_detection.vocabulary(), max_text_len=max_text_len)
    self._arrays = {split: embedded_detection.make_detection_shapes(8, seed)
                    for seed, split in enumerate(embedded_detection.SPLIT_SIZES)}

  def num_examples(self, split: str) -> int:
    self.check_split(split)
    return 8


def register_scenes(num_classes: int, text_len: int) -> None:
  """Registers SOURCE_NAME: the embedded scenes under `num_classes` names, captions of
  `text_len` tokens."""
  input_pipeline.register(SOURCE_NAME, lambda data_dir=None, **kw: ScenesWithClasses(
      num_classes, text_len))


def make_config(mode: str, *, batch_size: int, train_size: tuple[int, int],
                sdpt_tokens: int = 700, max_boxes: int = 100):
  """GLIP-T on the benchmark's scenes (`register_scenes` first), trained as `mode` (see `MODES`)
  on (height, width) `train_size` images (evaluated at its longer side, square)."""
  config = glip_coco.get_config()  # the demo's embedded-data layout, then GLIP-T's settings
  config.model.size = "T"
  config.dataset, config.train_split = SOURCE_NAME, "train"
  config.dataset_kwargs = {}
  config.glip = {}  # GLIP's anchors (8 x stride) and post-processing defaults
  config.batch_size = config.eval_batch_size = batch_size
  config.total_steps = 10_000  # the schedule needs warmup (2000) < total; nothing runs that long
  model_name, trainable = MODES[mode]
  config.model_name, config.trainable_params = model_name, trainable
  if model_name == "prompts.sdpt":
    config.model.num_tokens = sdpt_tokens
  glip_coco.glip_recipe(config, lr=1e-5, lang_lr=1e-5, weight_decay=1e-4,
                        bias_group=mode != "sdpt_paper")  # the prototypes have no biases
  height, width = train_size
  longer = max(height, width)
  train_pp, eval_pp = glip_coco.detection_pp(min(height, width), longer, longer,
                                             max_boxes, size_divisible=0)
  # The train canvas as given (800 x 1344), not squared.
  train_pp = train_pp.replace(f"pad_image({longer}, {longer})", f"pad_image({height}, {width})")
  config.pp.train, config.pp.eval = train_pp, eval_pp
  return config


def train_size() -> tuple[int, int]:
  """(height, width) of the train steps' images: --train_size, else --image_size square."""
  if not FLAGS.train_size:
    return FLAGS.image_size, FLAGS.image_size
  height, width = (int(v) for v in FLAGS.train_size)
  return height, width


def synthetic_batch(spec: dict, batch_size: int, text_len: int, rng) -> dict:
  """Arrays of the batch spec's keys and shapes: a random image, a full-length caption, two
  boxes per image with their positive tokens."""
  batch = {}
  for key, value in spec.items():
    shape, dtype = (batch_size, *value.shape[1:]), value.dtype.as_numpy_dtype
    batch[key] = np.zeros(shape, dtype)
  batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
  batch["text_ids"] = rng.integers(5, 28, size=batch["text_ids"].shape).astype(np.int32)
  batch["text_ids"][:, 0] = 2
  batch["text_mask"][:] = 1
  batch["boxes"][:, :2] = [[10, 20, 90, 110], [120, 60, 200, 180]]
  batch["box_labels"][:, :2] = [1, 2]
  batch["box_mask"][:, :2] = True
  batch["positive_map"][:, 0, 1:3] = 0.5
  batch["positive_map"][:, 1, 4:6] = 0.5
  for key in ("image_size", "orig_size"):
    if key in batch:
      batch[key][:] = train_size()
  if "image_id" in batch:
    batch["image_id"][:] = np.arange(1, batch_size + 1)
  assert batch["text_ids"].shape[1] == text_len, batch["text_ids"].shape
  return batch


def report(name: str, seconds: float, images: int, flops: float, peak: float, compile_s: float):
  achieved = flops / seconds
  memory, kind = common.peak_memory_bytes()
  print(f"[{name}] {seconds:.3f} s/step, {images / seconds:.3f} images/s, "
        f"{flops / 1e9:.1f} GFLOP/step (XLA), {achieved / 1e9:.1f} GFLOP/s, "
        f"MFU {100 * achieved / peak:.1f}%, compile {compile_s:.1f} s, "
        f"peak memory ({kind}) {memory / 2**30:.2f} GiB", flush=True)
  return seconds


def time_train(mode: str, peak: float, rng):
  start = time.perf_counter()
  exp = train.build(make_config(mode, batch_size=FLAGS.batch_size, train_size=train_size(),
                                sdpt_tokens=FLAGS.sdpt_tokens, max_boxes=FLAGS.max_boxes))
  print(f"[{mode}] build (init GLIP-T, optimizer): {time.perf_counter() - start:.1f} s",
        flush=True)
  spec = pipeline.batch_spec(exp.data.source, "train", exp.data.train_pp, train=True)
  batch = sharding.global_batch(synthetic_batch(spec, FLAGS.batch_size, FLAGS.text_len, rng),
                                exp.mesh)
  start = time.perf_counter()
  compiled = exp.train_step.lower(exp.state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = common.xla_flops(compiled)
  state, metrics = compiled(exp.state, batch)  # warm-up
  jax.block_until_ready(metrics)
  box = {"state": state}

  def step():
    box["state"], metrics = compiled(box["state"], batch)
    return metrics

  seconds = common.median_seconds(step, FLAGS.steps)
  print(f"[{mode}] loss {float(metrics['loss']):.3f}")
  report(f"train {mode} {'x'.join(map(str, train_size()))} b{FLAGS.batch_size}", seconds,
         FLAGS.batch_size,
         flops, peak, compile_s)
  return exp, box["state"], seconds


def time_detect(exp, state, height: int, width: int, peak: float, rng):
  """'detect' on one image of height x width (a fresh compile per shape)."""
  config = exp.config
  detect = jax.jit(glip_finetune.predict_fns(exp.model, config)["detect"])
  variables = train.variables(state)
  batch = {"image": jnp.asarray(rng.normal(size=(1, height, width, 3)), jnp.float32),
           "text_ids": jnp.asarray(rng.integers(5, 28, size=(1, FLAGS.text_len)), jnp.int32),
           "text_mask": jnp.ones((1, FLAGS.text_len), jnp.int32),
           "image_size": jnp.asarray([[height, width]], jnp.int32)}
  class_token_map = np.zeros((FLAGS.num_classes, FLAGS.text_len), np.float32)
  class_token_map[np.arange(FLAGS.num_classes), 1 + 3 * np.arange(FLAGS.num_classes)] = 1.0
  class_token_map = jnp.asarray(class_token_map)
  start = time.perf_counter()
  compiled = detect.lower(variables, batch, class_token_map).compile()
  compile_s = time.perf_counter() - start
  flops = common.xla_flops(compiled)
  jax.block_until_ready(compiled(variables, batch, class_token_map))
  seconds = common.median_seconds(lambda: compiled(variables, batch, class_token_map),
                           max(1, min(FLAGS.steps, 2 if height * width > 300_000 else FLAGS.steps)))
  report(f"detect {height}x{width} b1", seconds, 1, flops, peak, compile_s)


def time_fn(name: str, fn, *args, peak: float, repeats: int = 3):
  compiled = jax.jit(fn).lower(*args).compile()
  flops = common.xla_flops(compiled)
  jax.block_until_ready(compiled(*args))
  seconds = common.best_seconds(lambda: compiled(*args), repeats)
  print(f"  {name:<44} {1e3 * seconds:9.1f} ms  {flops / 1e9:8.2f} GFLOP  "
        f"{flops / seconds / 1e9:7.1f} GFLOP/s ({100 * flops / seconds / peak:.1f}% of peak)",
        flush=True)
  return seconds


def micro(peak: float, rng):
  """The tower's pieces at the --image_size step's shapes (batch --batch_size): a DyConv block,
  its 13 DCNv2 convs alone (up to three per level: from the level below, itself and the level
  above), a VLFuse block (without and with its attention dropout), a tower BERT layer, and the
  inference post-processing."""
  s = detector.decode_size("T")
  b, c, t = FLAGS.batch_size, s["channels"], FLAGS.text_len
  shapes = detector.level_shapes(FLAGS.image_size, FLAGS.image_size)
  levels = [jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32) for h, w in shapes]
  print(f"microbenchmarks (batch {b}, pyramid {shapes}, {c} channels, text {t}):")
  key = jax.random.PRNGKey(0)

  block = dyconv.DyConv(c, s["gn_groups"])
  params = block.init(key, levels)

  def dyconv_grad(params, levels):
    loss = lambda p, x: sum(jnp.sum(y) for y in block.apply(p, x))
    return jax.grad(loss, argnums=(0, 1))(params, levels)

  out = {"DyConv block fwd": time_fn("DyConv block (5 levels) fwd",
                                     lambda p, x: block.apply(p, x), params, levels, peak=peak),
         "DyConv block fwd+bwd": time_fn("DyConv block (5 levels) fwd+bwd", dyconv_grad, params,
                                         levels, peak=peak)}

  def dcn_as_block(x_levels, kernel):
    """The 13 DCNv2 convs of a DyConv block over 5 levels: per level one from itself, one from
    the level below (stride 2) and one on the level above (at its own size). Random offsets
    (+-2 px) so that the samples spread as a trained model's do; one kernel for all."""
    outs = []
    for level, x in enumerate(x_levels):
      sources = [(x, 1)] + ([(x_levels[level - 1], 2)] if level > 0 else [])
      sources += [(x_levels[level + 1], 1)] if level < len(x_levels) - 1 else []
      for source, stride in sources:
        out_hw = tuple(deform_conv.conv_output_size(n, 3, stride=stride, padding=1, dilation=1)
                       for n in source.shape[1:3])
        grid = (source.shape[0], *out_hw)
        offset = jnp.asarray(rng.uniform(-2, 2, size=grid + (dyconv.OFFSET_CHANNELS,)),
                             jnp.float32)
        mask = jnp.full(grid + (dyconv.MASK_CHANNELS,), 0.5, jnp.float32)
        outs.append(deform_conv.modulated_deform_conv(source, offset, mask, kernel,
                                                      stride=stride))
    return outs

  kernel = jnp.asarray(rng.normal(size=(3, 3, c, c)) * 0.02, jnp.float32)
  dcn_grad = jax.grad(lambda x, k: sum(jnp.sum(y) for y in dcn_as_block(x, k)), argnums=(0, 1))
  out["DCNv2 block fwd"] = time_fn("DCNv2 3x3 x13 (as in a DyConv block) fwd", dcn_as_block,
                                   levels, kernel, peak=peak)
  out["DCNv2 block fwd+bwd"] = time_fn("DCNv2 3x3 x13 (as in a DyConv block) fwd+bwd",
                                       dcn_grad, levels, kernel, peak=peak)

  fuse = fusion.BiAttentionBlock(c, 768, s["fusion_dim"], s["fusion_heads"],
                                 init_values=1.0 / s["layers"])
  lang = jnp.asarray(rng.normal(size=(b, t, 768)), jnp.float32)
  lang_mask = jnp.ones((b, t), jnp.int32)
  fparams = fuse.init(key, levels, lang, lang_mask)

  def fuse_fwd(p, v, l, train=False):
    new_v, new_l = fuse.apply(p, v, l, lang_mask, deterministic=not train,
                              rngs={"dropout": jax.random.PRNGKey(1)})
    return sum(jnp.sum(y) for y in new_v) + jnp.sum(new_l)

  out["VLFuse fwd"] = time_fn("VLFuse (BiAttentionBlock) fwd", fuse_fwd, fparams, levels, lang,
                              peak=peak)
  out["VLFuse fwd+bwd"] = time_fn("VLFuse (BiAttentionBlock) fwd+bwd",
                                  jax.grad(fuse_fwd, argnums=(0, 1, 2)), fparams, levels, lang,
                                  peak=peak)
  # The train step runs the fusion with its attention dropout live.
  fuse_train = lambda p, v, l: fuse_fwd(p, v, l, train=True)
  out["VLFuse fwd+bwd train"] = time_fn("VLFuse fwd+bwd, dropout live (as in training)",
                                        jax.grad(fuse_train, argnums=(0, 1, 2)), fparams, levels,
                                        lang, peak=peak)

  text = bert.decode_variant(s["text"])
  bert_layer = fusion.ClampedBertLayer(text["mlp_dim"], text["num_heads"])
  bparams = bert_layer.init(key, lang, lang_mask)

  def bert_train(p, l):
    return jnp.sum(bert_layer.apply(p, l, lang_mask, deterministic=False,
                                    rngs={"dropout": jax.random.PRNGKey(1)}))

  out["BERT layer fwd+bwd train"] = time_fn("tower BERT layer fwd+bwd, dropout live",
                                            jax.grad(bert_train, argnums=(0, 1)), bparams, lang,
                                            peak=peak)

  n = sum(h * w for h, w in shapes)
  anchors, level_sizes = glip_finetune.anchors_of({"level_shapes": shapes},
                                                  glip_finetune.DEFAULTS["anchor_sizes"])
  outputs = {"token_logits": jnp.asarray(rng.normal(size=(b, n, t)) - 2.0, jnp.float32),
             "box_regression": jnp.asarray(0.1 * rng.normal(size=(b, n, 4)), jnp.float32),
             "centerness": jnp.asarray(rng.normal(size=(b, n)), jnp.float32)}
  ctm = np.zeros((FLAGS.num_classes, t), np.float32)
  ctm[np.arange(FLAGS.num_classes), 1 + np.arange(FLAGS.num_classes)] = 1.0
  size = jnp.full((b, 2), FLAGS.image_size, jnp.int32)
  post = lambda o, a, m, z: inference.postprocess(o, a, level_sizes, m, z)
  out["postprocess+NMS"] = time_fn("ATSS postprocess + class-aware NMS", post, outputs,
                                   jnp.asarray(anchors), jnp.asarray(ctm), size, peak=peak)
  return out


def top_costs(parts: dict, layers: int, step_seconds: Optional[float]):
  """The tower's parts ranked by their time per step (layers x the microbenchmark), with their
  share of the measured frozen train step; the rest is the frozen Swin/FPN and BERT forwards,
  the heads and the ATSS loss."""
  ranked = sorted([("VLFuse fwd+bwd (dropout live)", layers * parts["VLFuse fwd+bwd train"]),
                   ("DyConv fwd+bwd, DCNv2 excluded", layers * (parts["DyConv block fwd+bwd"]
                                                                - parts["DCNv2 block fwd+bwd"])),
                   ("DCNv2 fwd+bwd (13 convs per block)", layers * parts["DCNv2 block fwd+bwd"]),
                   ("tower BERT layer fwd+bwd", layers * parts["BERT layer fwd+bwd train"])],
                  key=lambda item: -item[1])
  rest = step_seconds - sum(seconds for _, seconds in ranked) if step_seconds else None
  if rest is not None and rest > 0:
    ranked.append(("rest (Swin/FPN + BERT fwd, heads, loss, optimizer)", rest))
  print(f"top costs of the train step (x{layers} tower layers"
        + (f", step {step_seconds:.3f} s" if step_seconds else "") + "):")
  for name, seconds in ranked:
    share = f"{100 * seconds / step_seconds:5.1f}% of the step" if step_seconds else ""
    print(f"  {name:<52} {seconds:7.3f} s  {share}", flush=True)
  if rest is not None and rest <= 0:
    print("  (the parts add up to more than the step: the microbenchmarks ran slower than the "
          "step, e.g. under other load; rerun on an idle machine)", flush=True)


def main(_):
  if FLAGS.reuse_host_memory:  # as the trainer runs (jaxprompt/host_memory.py)
    host_memory.reuse_freed_memory()
  register_scenes(FLAGS.num_classes, FLAGS.text_len)
  rng = np.random.default_rng(0)
  peak = common.matmul_peak_flops(FLAGS.matmul_size, jnp.float32)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; GLIP-T "
        f"({detector.count_params('T', FLAGS.num_classes) / 1e6:.1f} M params), "
        f"{FLAGS.num_classes} classes, text {FLAGS.text_len}; matmul peak "
        f"({FLAGS.matmul_size}^2 float32) {peak / 1e9:.1f} GFLOP/s", flush=True)
  exp, state, step_seconds = None, None, {}
  for mode in FLAGS.modes:
    exp, state, step_seconds[mode] = time_train(mode, peak, rng)
  if exp is None:
    exp = train.build(make_config("full", batch_size=FLAGS.batch_size, train_size=train_size(),
                                  sdpt_tokens=FLAGS.sdpt_tokens, max_boxes=FLAGS.max_boxes))
    state = exp.state
  time_detect(exp, state, FLAGS.image_size, FLAGS.image_size, peak, rng)
  if FLAGS.micro:
    parts = micro(peak, rng)
    layers = detector.decode_size("T")["layers"]
    print(f"x{layers} tower layers: DyConv fwd+bwd "
          f"{layers * parts['DyConv block fwd+bwd']:.3f} s (of which DCNv2 "
          f"{layers * parts['DCNv2 block fwd+bwd']:.3f} s), VLFuse fwd+bwd "
          f"{layers * parts['VLFuse fwd+bwd train']:.3f} s with dropout; postprocess+NMS "
          f"(inference only) {parts['postprocess+NMS']:.3f} s", flush=True)
    top_costs(parts, layers, step_seconds.get("frozen"))
  if FLAGS.big_inference:
    height, width = (int(v) for v in FLAGS.big_size)
    time_detect(exp, state, height, width, peak, rng)


if __name__ == "__main__":
  app.run(main)
