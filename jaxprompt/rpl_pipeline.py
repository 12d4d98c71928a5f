"""PromptDet's regional prompt learning (RPL) as commands: crops -> train -> embed -> index ->
retrieve -> sample, then the next round trains, embeds and retrieves again.

Follows fcjian/RPL's README and `tools/promptdet/` (PromptDet, ECCV 2022), with a local image
pool and exact search in place of LAION-400M, its faiss index and img2dataset. One round:

  S=python -m jaxprompt.rpl_pipeline
  # 1. Object crops of the base categories, 200 per category, val aligned with train:
  $S crops --annotations=lvis_v1_train_seen.json --val_annotations=lvis_v1_val_seen.json \\
      --images=data/lvis_v1 --categories=lvis_category_and_description.txt --out=rpl/round1
  # 2. The prompts (= python -m jaxprompt.main with the same flags):
  $S train --config=configs/rpl_lvis.py:data=rpl/round1 --workdir=rpl/round1_run \\
      --config.model_init=ViT-B-32.pt --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz
  # 3. Embeddings of every category of the category file (base and novel), unnormalised:
  $S embed --config=<as in 2> --prompts=rpl/round1_run \\
      --categories=lvis_category_and_description.txt --out=rpl/round1_run/embeddings.npy
  # 4. Image embeddings of the pool (once; the same CLIP as 2):
  $S index --config=<as in 2> --pool=<image folder> --out=rpl/pool_index.npz
  # 5. The top 300 pool images of each base category, per category <name>.txt in rank order:
  $S retrieve --embeddings=rpl/round1_run/embeddings.npy --index=rpl/pool_index.npz \\
      --categories=lvis_category_and_description.txt --base_inds=lvis_base_inds.txt \\
      --which=base --top_k=300 --out=rpl/round1_retrieved
  # 6. The next round's training set: round 1's crops plus each category's top 200:
  $S sample --data=rpl/round1 --retrieved=rpl/round1_retrieved --top_k=200 --out=rpl/round2
  # Round 2: steps 2, 3 (and 5) with data=rpl/round2 and a new workdir (a fresh start, as RPL).

With no flags beyond the stage, `configs/rpl_lvis.py` is the embedded demo (generated scenes and
pool, `input_pipeline/embedded_coco.py`, a tiny random CLIP); `python -m jaxprompt.rpl_pipeline
demo --workdir=DIR` runs one round and the next round's training on it.

What each stage reproduces: crops, sampling and alignment as `object_crops.py` says; embed builds
every category's RPL prompt with the learned ctx1/ctx2 and saves the unnormalised text features
[N, E] in category-file order (`gen_category_embedding.py`; float32 .npy instead of an fp16 torch
file); index encodes every image of a folder with the CLIP image tower after CLIP's own
preprocessing (shorter side to the input size, bicubic; center crop; CLIP mean/std) and
L2-normalises (what the LAION ViT-B/32 index holds); retrieve L2-normalises each category
embedding and takes the inner-product top-k, exact, as faiss `IndexFlatIP` would, with the index
rows sharded over the device mesh (per-shard top-k, then a merge), deduplicates and keeps rank
order, and writes no similarity threshold (`retrieval_laion_image.py`); sample links the top-K in
rank order (`sample_image.py --laion-image`). Every file is written to a temporary name and
renamed; folders likewise.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from absl import app, flags
from absl import logging as absl_logging

from input_pipeline import object_crops, preprocess
from input_pipeline.folder import IMAGE_EXTENSIONS, FolderSource, decode_image_file
from jaxprompt import sharding, train, writers
from jaxprompt.evaluators import retrieval
from jaxprompt.models import clip, common
from jaxprompt.prompts import coop, rpl

STAGES = ("crops", "train", "embed", "index", "retrieve", "sample", "demo")
WHICH = ("all", "base", "novel")


# ------------------------------------------------------------------------------------------------
# Files.


def read_base_inds(path: str, num_categories: int) -> list[int]:
  """RPL's `lvis_base_inds.txt`: 0-based category indices separated by commas and/or spaces."""
  with open(path) as f:
    fields = f.read().replace(",", " ").split()
  try:
    inds = [int(x) for x in fields]
  except ValueError as e:
    raise ValueError(f"{path}: expected comma-separated integers ({e}).") from None
  bad = [i for i in inds if not 0 <= i < num_categories]
  if bad or not inds:
    raise ValueError(f"{path}: base indices must be in [0, {num_categories}); got "
                     f"{bad[:5] or 'none'}.")
  return inds


# ------------------------------------------------------------------------------------------------
# CLIP and the learned prompts, as the trainer has them for a config.


def build_rpl_model(config, entries: Sequence[str]) -> rpl.Model:
  """The config's RPL model over categories 'name_which_is_description'."""
  model = train.build_model(config, rpl.METHOD, len(entries), tuple(entries))
  if not isinstance(model, rpl.Model):
    raise ValueError(f"config.model_name={config.model_name!r}: the RPL pipeline needs "
                     "'prompts.rpl' (configs/rpl_lvis.py).")
  return model


_CLIP_PARAMS = {}  # clip_params' last result, by the settings that determine it


def clip_params(config) -> dict:
  """The frozen `clip/` params the trainer uses for `config`: config.model_init loaded, else the
  random init of config.seed (the same values whatever the classes: each submodule's init draws
  from its own name). Kept for the next call with the same CLIP (one entry)."""
  init_file = config.get("model_init") or ""
  key = (config.model.variant, config.get("compute_dtype", "float32"), config.pp.image_size,
         config.seed, init_file, os.path.getmtime(init_file) if init_file else 0.0)
  if key not in _CLIP_PARAMS:
    model = build_rpl_model(config, [f"x{rpl.SEPARATOR}x"])
    image = jnp.zeros((1, config.pp.image_size, config.pp.image_size, 3), jnp.float32)
    init = lambda rng: model.init(rng, image)["params"]
    if init_file:
      zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                           jax.eval_shape(init, jax.random.PRNGKey(0)))
      params = coop.load_clip({"params": zeros}, init_file)["params"]["clip"]
    else:
      params = jax.jit(init)(jax.random.PRNGKey(config.seed))["clip"]
    _CLIP_PARAMS.clear()
    _CLIP_PARAMS[key] = params
  return _CLIP_PARAMS[key]


def learned_contexts(path: str) -> dict[str, np.ndarray]:
  """{'ctx1', 'ctx2'} from a training workdir (its latest checkpoint) or an .npz holding them
  (e.g. converted from the original's `model.pth.tar-6` state_dict). The .npz is read with
  allow_pickle=False (`common.load_npz`): an object array or a truncated file is a ValueError
  naming it."""
  if os.path.isfile(path):
    arrays = common.load_npz(path)
    found = {k: np.asarray(arrays[k], np.float32) for k in ("ctx1", "ctx2") if k in arrays}
  else:
    import orbax.checkpoint as ocp
    directory = os.path.join(path, "checkpoints")
    step = None
    if os.path.isdir(directory):
      manager = ocp.CheckpointManager(os.path.abspath(directory))
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No learned prompts at {path!r}: expected a training workdir with "
                              "checkpoints/ (python -m jaxprompt.main) or an .npz with ctx1, "
                              "ctx2.")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    learner = restored["params"].get("prompt_learner", {})
    found = {k: np.asarray(v, np.float32) for k, v in learner.items()}
  if set(found) != {"ctx1", "ctx2"}:
    raise ValueError(f"{path!r} holds contexts {sorted(found)}, not RPL's ctx1 and ctx2.")
  return found


def category_embeddings(config, contexts: dict, entries: Sequence[str], *,
                        chunk: int = 256) -> np.ndarray:
  """(N, E) unnormalised text features of the RPL prompts of `entries`, in order."""
  params = {"clip": clip_params(config), "prompt_learner": contexts}
  width = params["clip"]["token_embedding"]["embedding"].shape[-1]
  n_ctx = config.model.n_ctx
  for name, ctx in contexts.items():
    if ctx.shape != (n_ctx, width):
      raise ValueError(f"Learned {name} has shape {ctx.shape}; the config's model expects "
                       f"({n_ctx}, {width}) (config.model.n_ctx, CLIP text width).")
  features = []
  for start in range(0, len(entries), chunk):
    model = build_rpl_model(config, entries[start:start + chunk])
    apply = jax.jit(lambda p, m=model: m.apply({"params": p},
                                               method=rpl.Model.category_embeddings))
    features.append(np.asarray(apply(params)))
  return np.concatenate(features)


def embed(config, prompts: str, categories: str, out: str) -> np.ndarray:
  """Stage 3: writes `out` (.npy, float32 (N, E)) for every category of the category file."""
  entries = list(object_crops.read_category_file(categories).values())
  features = category_embeddings(config, learned_contexts(prompts), entries)
  writers.write_atomic(out, lambda f: np.save(f, features))
  train.log(f"embed: {features.shape} category embeddings -> {out}")
  return features


# ------------------------------------------------------------------------------------------------
# Image index.


def list_images(folder: str) -> list[str]:
  """Every image file under `folder` (recursively, symlinks followed), sorted."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"Image folder {folder!r} does not exist.")
  paths = [os.path.join(d, f) for d, _, files in os.walk(folder, followlinks=True)
           for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  return sorted(os.path.abspath(p) for p in paths)


def clip_images(paths: Sequence[str], size: int, batch_size: int) -> tf.data.Dataset:
  """Batches (batch_size, size, size, 3) float32 of the image files, in order, the last padded
  with zeros, through CLIP's preprocessing (`clip.py` `_transform`) as pp ops, the path every
  config's evaluation takes: shorter side to `size` (bicubic), center crop, [0, 1], CLIP mean/std."""
  pp = preprocess.make_preprocess_fn(f"resize_shorter_side({size}, method='bicubic')|"
                                     f"center_crop({size})|value_range(0, 1)|normalize('clip')")
  images = tf.data.Dataset.from_tensor_slices(list(paths)).map(
      lambda path: pp({"image": decode_image_file(path)})["image"],
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return images.padded_batch(batch_size, drop_remainder=False).map(
      lambda batch: tf.pad(batch, [[0, batch_size - tf.shape(batch)[0]], [0, 0], [0, 0], [0, 0]]))


def encode_images(config, paths: Sequence[str], *, batch_size: int = 256,
                  mesh=None) -> np.ndarray:
  """(N, E) L2-normalised CLIP image features of `paths`, batches split over the mesh."""
  mesh = mesh or sharding.make_mesh()
  data = mesh.shape[sharding.DATA]
  batch_size = -(-batch_size // data) * data
  params = clip_params(config)
  clip_model = clip.Model(**coop.clip_config(config.model.variant,
                                             jnp.dtype(config.get("compute_dtype", "float32"))))
  encode = jax.jit(lambda p, x: clip.normalize(clip_model.apply({"params": p}, x,
                                                                method=clip.Model.encode_image)),
                   in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
  features = [np.asarray(encode(params, images)) for images in
              clip_images(paths, config.pp.image_size, batch_size).as_numpy_iterator()]
  return np.concatenate(features)[:len(paths)]


def build_index(config, pool: str, out: str, *, batch_size: int = 256) -> dict:
  """Stage 4: writes `out` (.npz: 'paths' (N,) absolute image paths, 'embeddings' (N, E) float32,
  L2-normalised) for every image under `pool`."""
  paths = list_images(pool)
  if not paths:
    raise FileNotFoundError(f"The retrieval pool {pool!r} has no {'/'.join(IMAGE_EXTENSIONS)} "
                            "images.")
  embeddings = encode_images(config, paths, batch_size=batch_size)
  writers.write_atomic(out, lambda f: np.savez(f, paths=np.array(paths), embeddings=embeddings))
  train.log(f"index: {len(paths)} images of {pool} -> {out}")
  return {"paths": np.array(paths), "embeddings": embeddings}


# ------------------------------------------------------------------------------------------------
# Retrieval.


def retrieve(embeddings: str, categories: str, index: str, out: str, *, top_k: int = 300,
             base_inds: str = "", which: str = "all", mesh=None) -> dict[str, list[str]]:
  """Stage 5: for each selected category, its `top_k` pool images by cosine similarity to its
  embedding, written as out/<category>.txt (one path a line, rank order). Returns them."""
  folders = list(object_crops.read_category_file(categories))
  features = common.load_npy(embeddings)  # allow_pickle=False; bad files name themselves
  if features.ndim != 2 or len(features) != len(folders):
    raise ValueError(f"{embeddings!r} holds {features.shape} embeddings; the category file "
                     f"{categories!r} has {len(folders)} categories (run embed with it).")
  arrays = common.load_npz(index)  # allow_pickle=False: paths are a unicode array, not objects
  if not {"paths", "embeddings"} <= set(arrays):
    raise ValueError(f"Index {index!r} holds {sorted(arrays)}; expected 'paths' and 'embeddings' "
                     "(written by the index stage).")
  paths, pool = arrays["paths"], arrays["embeddings"]
  if len(paths) == 0:
    raise ValueError(f"The retrieval pool of {index!r} is empty: index a folder with images.")
  if pool.shape[1] != features.shape[1]:
    raise ValueError(f"Index {index!r} has {pool.shape[1]}-d image embeddings, the category "
                     f"embeddings are {features.shape[1]}-d: build both with the same CLIP.")
  if which not in WHICH:
    raise ValueError(f"which={which!r}: expected one of {WHICH}.")
  selected = list(range(len(folders)))
  if which != "all":
    if not base_inds:
      raise ValueError(f"which={which!r} needs base_inds (RPL's lvis_base_inds.txt).")
    base = set(read_base_inds(base_inds, len(folders)))
    selected = [i for i in selected if (i in base) == (which == "base")]
  queries = np.asarray(clip.normalize(jnp.asarray(features[selected])))
  scores, ids = retrieval.sharded_top_k(pool, queries, top_k, mesh)
  results = {}
  for row, i in enumerate(selected):
    ranked = list(dict.fromkeys(str(paths[j]) for j in ids[row]))
    text = "".join(f"{p}\n" for p in ranked).encode("utf-8")
    writers.write_atomic(os.path.join(out, f"{folders[i]}.txt"), lambda f, t=text: f.write(t))
    results[folders[i]] = ranked
  train.log(f"retrieve: top {ids.shape[1]} of {len(paths)} pool images for {len(selected)} "
            f"categories ({which}), similarity {scores.min():.3f} .. {scores.max():.3f} -> {out}")
  return results


# ------------------------------------------------------------------------------------------------
# Command line.


def demo_round(workdir: str, *, total_steps: int = 0, demo_folder: str | None = None) -> dict:
  """On the embedded demo data (`embedded_coco.demo_data(demo_folder)`), in `workdir`: round 1
  (train, embed, index the pool, retrieve the top 8 of each base category), the round-2 folder
  with each category's top 4, and round 2's training and embeddings. `total_steps` overrides the
  config's schedule. Returns what each stage produced."""
  from configs import rpl_lvis
  from input_pipeline import embedded_coco
  if os.path.exists(workdir) and os.listdir(workdir):
    raise FileExistsError(f"demo workdir {workdir!r} is not empty; pick a new one.")
  demo = embedded_coco.demo_data(demo_folder)
  path = lambda *parts: os.path.join(workdir, *parts)
  out = {"demo": demo, "round2": path("round2")}
  for n, data in ((1, demo.round1), (2, out["round2"])):
    config = rpl_lvis.get_config(f"demo,data={data}")
    config.total_steps = total_steps or config.total_steps
    run = path(f"round{n}_run")
    out[f"final{n}"] = train.train_and_evaluate(config, run)
    out[f"embeddings{n}"] = embed(config, run, demo.categories,
                                  os.path.join(run, "embeddings.npy"))
    out[f"config{n}"], out[f"run{n}"] = config, run
    if n == 1:
      out["index"] = build_index(config, demo.pool, path("pool_index.npz"))
      out["retrieved"] = retrieve(os.path.join(run, "embeddings.npy"), demo.categories,
                                  path("pool_index.npz"), path("round1_retrieved"), top_k=8,
                                  base_inds=demo.base_inds, which="base")
      out["added"] = object_crops.add_retrieved_images(
          demo.round1, path("round1_retrieved"), out["round2"], top_k=4)
  return out


def main(argv):
  if len(argv) != 2 or argv[1] not in STAGES:
    raise app.UsageError(f"Usage: python -m jaxprompt.rpl_pipeline <stage> --flags; stages: "
                         f"{', '.join(STAGES)} (got {argv[1:]}).")
  absl_logging.set_verbosity(absl_logging.WARNING)  # progress lines are printed, not logged
  stage, f = argv[1], flags.FLAGS

  def need(*names):
    missing = [n for n in names if f[n].value in (None, "")]
    if missing:
      raise app.UsageError(f"Stage {stage!r} needs --{', --'.join(missing)}.")
    return [f[n].value for n in names]

  if stage == "crops":
    out, annotations, images = need("out", "annotations", "images")
    counts = object_crops.make_crop_dataset(
        out, annotations=annotations, image_root=images, val_annotations=f.val_annotations or "",
        categories=f.categories or "", shots=f.shots, val_shots=f.val_shots, seed=f.seed,
        scaling_factor=f.scaling_factor, min_area=f.min_area)
    train.log(f"crops: {counts} -> {out}")
  elif stage == "train":
    config, workdir = need("config", "workdir")
    train.train_and_evaluate(config, workdir)
  elif stage == "embed":
    embed(*need("config", "prompts", "categories", "out"))
  elif stage == "index":
    config, pool, out = need("config", "pool", "out")
    build_index(config, pool, out, batch_size=f.batch_size)
  elif stage == "retrieve":
    retrieve(*need("embeddings", "categories", "index", "out"), top_k=f.top_k or 300,
             base_inds=f.base_inds or "", which=f.which)
  elif stage == "sample":
    data, retrieved, out = need("data", "retrieved", "out")
    added = object_crops.add_retrieved_images(data, retrieved, out, top_k=f.top_k or 200,
                                              copy=f.copy)
    classes = FolderSource(data).class_names
    train.log(f"sample: {sum(added.values())} retrieved images for {len(added)} of the "
              f"{len(classes)} train categories -> {out}")
  elif stage == "demo":
    demo_round(*need("workdir"))


if __name__ == "__main__":  # flags only for the command line: importing defines none
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "An RPL config (configs/rpl_lvis.py[:args]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "train, demo: output folder (checkpoints, metrics).")
  flags.DEFINE_string("out", None, "The stage's output: crops/retrieve/sample a folder, embed "
                      "an .npy, index an .npz.")
  flags.DEFINE_string("annotations", None, "crops: LVIS/COCO-format train annotation file.")
  flags.DEFINE_string("val_annotations", None, "crops: the val annotation file (optional).")
  flags.DEFINE_string("images", None, "crops: image root (holding train2017/, val2017/).")
  flags.DEFINE_string("categories", None, "Category file, lines 'folder "
                      "name_which_is_description' (crops: writes classnames.txt from it).")
  flags.DEFINE_integer("shots", 200, "crops: crops per category for train.")
  flags.DEFINE_integer("val_shots", 200, "crops: crops per category for val.")
  flags.DEFINE_integer("seed", 0, "crops: sampling seed.")
  flags.DEFINE_float("scaling_factor", 1.0, "crops: box enlargement on each side, x w and h.")
  flags.DEFINE_float("min_area", 20.0, "crops: boxes with w*h below this are skipped.")
  flags.DEFINE_string("prompts", None, "embed: training workdir (or .npz with ctx1, ctx2).")
  flags.DEFINE_string("pool", None, "index: folder of images to index (recursive).")
  flags.DEFINE_integer("batch_size", 256, "index: images per batch.")
  flags.DEFINE_string("embeddings", None, "retrieve: category embeddings .npy from embed.")
  flags.DEFINE_string("index", None, "retrieve: image index .npz from index.")
  flags.DEFINE_integer("top_k", None, "retrieve: images per category (300); sample: retrieved "
                       "images added per category (200).")
  flags.DEFINE_string("base_inds", None, "retrieve: base category indices file.")
  flags.DEFINE_enum("which", "all", WHICH, "retrieve: categories to query.")
  flags.DEFINE_string("data", None, "sample: this round's data folder (train/, val/).")
  flags.DEFINE_string("retrieved", None, "sample: folder of <category>.txt lists from retrieve.")
  flags.DEFINE_bool("copy", False, "sample: copy files instead of symlinking them.")
  app.run(main)
