"""RPL (PromptDet's regional prompt learning): the prompt against the original's construction,
crop geometry and folders, sharded top-k against numpy (8 fake devices), every pipeline stage end
to end on the embedded data over two rounds, and bad input. A tiny random CLIP (ViT-mu/8) and the
project's byte-level vocabulary (every character one token)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from configs import rpl_lvis
from input_pipeline import base, embedded_clip, embedded_coco, object_crops
from input_pipeline.folder import FolderSource
from jaxprompt import optim, rpl_pipeline, train, writers
from jaxprompt.evaluators import retrieval
from jaxprompt.models import clip
from jaxprompt.prompts import coop, rpl
from conftest import run_on_cpu_devices  # pylint: disable=import-error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRIES = ("aerosol_can_which_is_a_dispenser_under_pressure", "big_dog_which_is_a_canine",
           "x_which_is_y")


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return embedded_clip.write_byte_vocabulary(str(tmp_path_factory.mktemp("vocab") / "b.txt.gz"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return embedded_coco.demo_data(str(tmp_path_factory.mktemp("demo")))


def write_lines(path, lines):
  path.write_text("".join(f"{line}\n" for line in lines))
  return str(path)


# ------------------------------------------------------------------------------------------------
# The prompt.


@pytest.mark.parametrize("n_ctx", [1, 2])
def test_prompts_match_rpls_construction(vocab, n_ctx):
  """The original embeds 'X.. {name} X.. {description}.' and overwrites the X rows with ctx1
  (positions 1..n) and ctx2 (after the name's tokens); EOT stays at argmax of the token ids."""
  model = rpl.Model(num_classes=3, class_names=ENTRIES, vocab_path=vocab, variant="ViT-mu/8",
                    n_ctx=n_ctx)
  variables = model.init(jax.random.PRNGKey(0), method=rpl.Model.prompt_embeddings)
  params = variables["params"]
  assert {k: v.shape for k, v in params["prompt_learner"].items()} == {
      "ctx1": (n_ctx, 32), "ctx2": (n_ctx, 32)}
  ctx1, ctx2 = (np.asarray(params["prompt_learner"][k]) for k in ("ctx1", "ctx2"))
  prompts = np.asarray(model.apply(variables, method=rpl.Model.prompt_embeddings))
  table = np.asarray(params["clip"]["token_embedding"]["embedding"])
  tokenizer = coop.get_tokenizer(vocab)
  xs = " ".join(["X"] * n_ctx)
  for c, entry in enumerate(ENTRIES):
    name, description = (part.replace("_", " ") for part in entry.split("_which_is_"))
    ids = tokenizer([f"{xs} {name} {xs} {description}."])[0]
    expected = table[ids].copy()
    name_len = len(tokenizer.encode(name))
    expected[1:1 + n_ctx] = ctx1
    expected[1 + n_ctx + name_len:1 + 2 * n_ctx + name_len] = ctx2
    layout, _ = rpl.rpl_prompts(vocab, 77, ENTRIES, n_ctx)
    assert layout.eot_index[c] == ids.argmax()
    np.testing.assert_array_equal(prompts[c], expected[:layout.length])


REAL_BPE = os.environ.get("CLIP_BPE_PATH", os.path.join(
    os.path.dirname(REPO), "shared", "data", "clip", "bpe_simple_vocab_16e6.txt.gz"))


@pytest.mark.skipif(not os.path.isfile(REAL_BPE), reason="OpenAI's CLIP BPE vocabulary not found "
                    "(set CLIP_BPE_PATH); the project does not require it")
def test_prompt_tokens_equal_the_originals_joined_string_with_clips_bpe():
  """The original tokenises 'X {name} X {description}.' as one string; with the real BPE a
  description ending in ')' must keep its ').' token as there."""
  entries = ("speaker_(stereo_equipment)_which_is_a_device_that_makes_sound_(hi-fi)",
             "alarm_clock_which_is_a_clock_that_wakes_a_sleeper",
             "monitor_(computer_equipment)_computer_monitor_which_is_a_computer_monitor")
  layout, _ = rpl.rpl_prompts(REAL_BPE, 77, entries, 1)
  tokenizer = coop.get_tokenizer(REAL_BPE)
  for c, entry in enumerate(entries):
    name, description = rpl.split_category(entry)
    ids = tokenizer([f"X {name} X {description}."])[0]
    assert ids[1] == ids[2 + len(tokenizer.encode(name))] == tokenizer.encode("X")[0]
    ids[1] = ids[2 + len(tokenizer.encode(name))] = 0  # the context positions
    np.testing.assert_array_equal(layout.token_ids[c], ids)
    assert layout.eot_index[c] == ids.argmax()


def test_only_the_two_contexts_train(vocab):
  model = rpl.Model(num_classes=3, class_names=ENTRIES, vocab_path=vocab, variant="ViT-mu/8")
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  labels = traverse_util.flatten_dict(optim.param_labels(params, rpl.TRAINABLE_PARAMS), sep="/")
  assert {k for k, v in labels.items() if v == optim.TRAIN} == {"prompt_learner/ctx1",
                                                                 "prompt_learner/ctx2"}
  assert rpl_lvis.get_config("data=/d").model.n_ctx == 1
  config = rpl_lvis.get_config("data=/d")
  assert (config.model.variant, config.seed, config.num_epochs, config.optim.lr,
          config.model.descriptions_file) == ("ViT-B/32", 3, 6, 0.002, "/d/classnames.txt")


def test_category_file_and_class_lookup(tmp_path):
  path = write_lines(tmp_path / "c.txt", ["aerosol_can aerosol_can_which_is_a_dispenser",
                                          "", "dog_which_is_a_canine"])
  assert object_crops.read_category_file(path) == {
      "aerosol_can": "aerosol_can_which_is_a_dispenser", "dog": "dog_which_is_a_canine"}
  assert rpl.resolve_categories(("dog", "aerosol_can"), path) == (
      "dog_which_is_a_canine", "aerosol_can_which_is_a_dispenser")
  assert rpl.split_category("aerosol_can_which_is_a_dispenser") == ("aerosol can", "a dispenser")
  with pytest.raises(ValueError, match=r"\['cat'\] \(1 in all\) are not in the category file"):
    rpl.resolve_categories(("dog", "cat"), path)
  with pytest.raises(ValueError, match=r"c2.txt:2: expected 'folder name_which_is_description'"):
    object_crops.read_category_file(write_lines(tmp_path / "c2.txt", ["a a_which_is_b", "cat"]))
  with pytest.raises(ValueError, match="listed twice"):
    object_crops.read_category_file(write_lines(tmp_path / "c3.txt", ["a_which_is_b"] * 2))
  with pytest.raises(ValueError, match="set config.model.descriptions_file"):
    rpl.resolve_categories(("dog",), "")


def test_over_long_prompt_is_an_error(vocab):
  long = "cat_which_is_" + "_".join(["a_very_long_description"] * 4)  # a token a character
  with pytest.raises(ValueError, match=r"1 RPL prompt\(s\) exceed CLIP's context length 77.*"
                                       r"cat_which_is_a_very"):
    rpl.rpl_prompts(vocab, 77, ("dog_which_is_a_canine", long), 1)


# ------------------------------------------------------------------------------------------------
# Crops.


def test_crop_geometry_and_category_folders():
  # [x - w, y - h, x + 2w, y + 2h], int() truncation, clipped to the image.
  assert object_crops.crop_box([10.5, 20.7, 4.2, 3.1], 100, 100) == (6, 17, 18, 26)
  assert object_crops.crop_box([2, 3, 10, 10], 25, 28) == (0, 0, 22, 23)
  assert object_crops.crop_box([2, 3, 10, 10], 25, 28, scaling_factor=0.5) == (0, 0, 17, 18)
  assert object_crops.large_enough([0, 0, 4, 5], 20) and not object_crops.large_enough(
      [0, 0, 4, 4.9], 20)
  assert object_crops.category_folder("speaker_(stero_equipment)") == "speaker_(stereo_equipment)"
  assert object_crops.category_folder("monitor_(computer_equipment) computer_monitor") == (
      "monitor_(computer_equipment)_computer_monitor")
  assert object_crops.category_folder("traffic light") == "traffic_light"


def write_coco(tmp_path, name, boxes, *, missing=()):
  """An LVIS-style file: images 48x40 with a gradient, `boxes` [(image_id, category_id, bbox)]."""
  images = sorted({image_id for image_id, _, _ in boxes})
  folder = tmp_path / "images" / "train2017"
  folder.mkdir(parents=True, exist_ok=True)
  for i in images:
    if i not in missing:
      pixels = (np.arange(48 * 40 * 3) % 251).reshape(40, 48, 3).astype(np.uint8) + i
      Image.fromarray(pixels).save(folder / f"{i:012d}.png")
  data = dict(
      images=[dict(id=i, width=48, height=40, coco_url=f"http://x/train2017/{i:012d}.png")
              for i in images],
      annotations=[dict(id=n + 1, image_id=i, category_id=c, bbox=b, area=b[2] * b[3])
                   for n, (i, c, b) in enumerate(boxes)],
      categories=[dict(id=1, name="speaker_(stero_equipment)"), dict(id=2, name="dog"),
                  dict(id=3, name="cat")])
  path = tmp_path / name
  path.write_text(json.dumps(data))
  return str(path)


def test_crops_stage(tmp_path):
  boxes = [(1, 1, [10.5, 5.2, 6.0, 4.0]), (1, 2, [0, 0, 3, 3]),  # the dog box is 9 px²: skipped
           *[(i, 2, [20, 10, 5, 6]) for i in range(2, 9)]]
  train_file = write_coco(tmp_path, "train.json", boxes)
  val_file = write_coco(tmp_path, "val.json", [(1, 1, [1, 1, 5, 5]), (2, 3, [1, 1, 5, 5])])
  categories = write_lines(tmp_path / "cats.txt", [
      "speaker_(stereo_equipment) speaker_(stereo_equipment)_which_is_a_loudspeaker",
      "dog dog_which_is_a_canine", "cat cat_which_is_a_feline"])
  make = lambda out, seed=0, categories=categories: object_crops.make_crop_dataset(
      str(tmp_path / out), annotations=train_file, image_root=str(tmp_path / "images"),
      val_annotations=val_file, categories=categories, shots=4, val_shots=4, seed=seed)
  assert make("a") == {"train": 5, "val": 1}  # val's cat is not a train category: dropped
  a = tmp_path / "a"
  assert sorted(os.listdir(a / "train")) == ["dog", "speaker_(stereo_equipment)"]
  assert os.listdir(a / "val") == ["speaker_(stereo_equipment)"]
  assert (a / "classnames.txt").read_text() == (
      "dog dog_which_is_a_canine\n"
      "speaker_(stereo_equipment) speaker_(stereo_equipment)_which_is_a_loudspeaker\n")
  # The crop: [10.5 - 6, 5.2 - 4, 10.5 + 12, 5.2 + 8] -> (4, 1, 22, 13) of image 1.
  crop = np.asarray(Image.open(a / "train" / "speaker_(stereo_equipment)" / "1_000000000001.png"))
  source = np.asarray(Image.open(tmp_path / "images" / "train2017" / "000000000001.png"))
  np.testing.assert_array_equal(crop, source[1:13, 4:22])
  dogs = sorted(os.listdir(a / "train" / "dog"))
  assert len(dogs) == 4  # of 7, seeded
  make("b")
  assert sorted(os.listdir(tmp_path / "b" / "train" / "dog")) == dogs
  make("c", seed=1)
  assert sorted(os.listdir(tmp_path / "c" / "train" / "dog")) != dogs
  assert FolderSource(str(a)).class_names == ("dog", "speaker_(stereo_equipment)")

  with pytest.raises(FileExistsError, match="already exists"):
    make("a")
  missing = write_coco(tmp_path / "m", "train.json", boxes, missing=(3, 5))
  with pytest.raises(base.DataNotFoundError, match=r"2 of the 8 images .* are missing .*"
                                                   r"000000000003.png"):
    object_crops.make_crop_dataset(str(tmp_path / "d"), annotations=missing,
                                   image_root=str(tmp_path / "m" / "images"))
  with pytest.raises(ValueError, match=r"\['dog'\] \(1 in all\) are not in the category file"):
    make("e", categories=write_lines(tmp_path / "c2.txt",
                                     ["speaker_(stereo_equipment) s_which_is_x"]))
  assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "e")
  assert not [f for f in os.listdir(tmp_path) if ".partial-" in f]  # staging folders removed


# ------------------------------------------------------------------------------------------------
# Sharded retrieval.

TOP_K_CHECK = """
import jax, numpy as np
from jaxprompt import sharding
from jaxprompt.evaluators import retrieval
assert jax.device_count() == 8, jax.devices()
mesh = sharding.make_mesh()
rng = np.random.default_rng(0)
for n, k in ((1003, 200), (1003, 5), (5, 9)):  # 126 rows a device, 3 devices of padding
  index = rng.normal(size=(n, 16)).astype(np.float32)
  queries = rng.normal(size=(37, 16)).astype(np.float32)
  scores, ids = retrieval.sharded_top_k(index, queries, k, mesh, query_batch=16)
  exact = queries.astype(np.float64) @ index.T.astype(np.float64)
  order = np.argsort(-exact, axis=1)
  m = min(k, n)
  assert ids.shape == scores.shape == (37, m)
  np.testing.assert_allclose(scores, np.take_along_axis(exact, order[:, :m], 1), atol=1e-4)
  # Ranks whose scores lie within float32 rounding of a neighbour's may swap; no other may.
  ranked = np.take_along_axis(exact, order[:, :m + 1], 1)
  tie = np.pad(-np.diff(ranked, axis=1) < 1e-4, ((0, 0), (0, m + 1 - ranked.shape[1])))
  ambiguous = tie[:, :m] | np.pad(tie[:, :m - 1], ((0, 0), (1, 0)))
  same = ids == order[:, :m]
  assert (same | ambiguous).all() and same.mean() > 0.99, same.mean()
print("OK")
"""


def test_sharded_top_k_on_8_devices_matches_numpy_argsort():
  assert "OK" in run_on_cpu_devices(TOP_K_CHECK, 8)


def test_top_k_on_one_device():
  index = np.eye(6, 4, dtype=np.float32)
  scores, ids = retrieval.sharded_top_k(index, np.ones((2, 4), np.float32), 3)
  assert ids.tolist() == [[0, 1, 2], [0, 1, 2]] and scores.tolist() == [[1, 1, 1]] * 2
  with pytest.raises(ValueError, match="empty"):
    retrieval.sharded_top_k(np.zeros((0, 4), np.float32), np.ones((1, 4), np.float32), 3)


# ------------------------------------------------------------------------------------------------
# Every stage, two rounds, on the embedded data.


@pytest.fixture(scope="module")
def one_round(demo, tmp_path_factory):
  """`rpl_pipeline.demo_round` with 6 training steps a round: round 1 (train, embed, index the
  pool, retrieve the top 8 of each base category), the round-2 folder with each category's top 4,
  and round 2's training and embeddings."""
  work = tmp_path_factory.mktemp("rounds")
  out = rpl_pipeline.demo_round(str(work), total_steps=6, demo_folder=os.path.dirname(demo.root))
  return dict(out, work=work, config=out["config1"], features=out["embeddings1"],
              features2=out["embeddings2"])


def test_embed_reproduces_the_trained_models_text_features(one_round, demo):
  config, features = one_round["config"], one_round["features"]
  categories = list(object_crops.read_category_file(demo.categories))
  assert features.shape == (8, 16) and features.dtype == np.float32
  np.testing.assert_array_equal(np.load(one_round["work"] / "round1_run" / "embeddings.npy"),
                                features)
  # The trainer's model (6 base classes, initialised as train.build does) has the CLIP that embed
  # uses, and with the trained contexts gives embed's features, normalised, for those classes.
  source = FolderSource(demo.round1)
  model = train.build_model(config, rpl.METHOD, source.num_classes, source.class_names)
  image = jnp.zeros((1, 32, 32, 3))
  params = jax.jit(lambda rng: model.init(rng, image)["params"])(jax.random.PRNGKey(config.seed))
  assert jax.tree.all(jax.tree.map(np.array_equal, params["clip"],
                                   rpl_pipeline.clip_params(config)))
  contexts = rpl_pipeline.learned_contexts(one_round["run1"])
  assert contexts["ctx1"].shape == (1, 32)
  assert not np.array_equal(contexts["ctx1"], params["prompt_learner"]["ctx1"])  # trained
  text = jax.jit(lambda p: model.apply({"params": p}, method=rpl.Model.encode_prompts))(
      dict(params, prompt_learner=contexts))
  order = [categories.index(c) for c in source.class_names]
  np.testing.assert_allclose(clip.normalize(features[order]), text, rtol=1e-5, atol=1e-6)


def test_index_holds_normalised_clip_image_features(one_round):
  index, config = one_round["index"], one_round["config"]
  assert len(index["paths"]) == 56 and index["embeddings"].shape == (56, 16)
  np.testing.assert_allclose(np.linalg.norm(index["embeddings"], axis=1), 1, rtol=1e-5)
  clip_model = clip.Model(**coop.clip_config("ViT-mu/8", jnp.float32))
  images = next(rpl_pipeline.clip_images(index["paths"][:3], 32, 4).as_numpy_iterator())[:3]
  features = jax.jit(lambda p, x: clip_model.apply({"params": p}, x,
                                                   method=clip.Model.encode_image))(
      rpl_pipeline.clip_params(config), images)
  np.testing.assert_allclose(index["embeddings"][:3], clip.normalize(features), atol=1e-5)


def test_retrieval_is_the_cosine_top_k_of_each_base_category(one_round, demo):
  features, index, retrieved = one_round["features"], one_round["index"], one_round["retrieved"]
  categories = list(object_crops.read_category_file(demo.categories))
  assert sorted(retrieved) == sorted(categories[i] for i in embedded_coco.BASE_INDS)
  queries = features / np.linalg.norm(features, axis=1, keepdims=True)
  for name, ranked in retrieved.items():
    scores = index["embeddings"] @ queries[categories.index(name)]
    assert ranked == [str(index["paths"][j]) for j in np.argsort(-scores, kind="stable")[:8]]
    assert (one_round["work"] / "round1_retrieved" / f"{name}.txt").read_text().split() == ranked


def test_second_round_trains_on_the_crops_plus_the_retrieved_images(one_round, demo):
  round2 = str(one_round["work"] / "round2")
  source1, source2 = FolderSource(demo.round1), FolderSource(round2)
  assert source2.class_names == source1.class_names
  assert source2.num_examples("train") == source1.num_examples("train") + 6 * 4
  assert source2.num_examples("val") == source1.num_examples("val")
  assert one_round["added"] == {name: 4 for name in source1.class_names}
  for name in source1.class_names:
    folder = os.path.join(round2, "train", name)
    linked = [os.path.realpath(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
              if f.startswith(object_crops.RETRIEVED_PREFIX)]
    assert linked == [os.path.realpath(p) for p in one_round["retrieved"][name][:4]]
  paths, _ = source2._files["train"]
  assert sum(os.path.realpath(p).startswith(os.path.realpath(demo.pool)) for p in paths) == 24
  assert one_round["final2"]["step"] == 6 and one_round["features2"].shape == (8, 16)
  assert one_round["config2"].dataset_kwargs.root == round2
  assert not np.allclose(one_round["features2"], one_round["features"])  # retrained


def test_command_line(one_round, demo, tmp_path):
  work = one_round["work"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "jaxprompt.rpl_pipeline", "retrieve",
             f"--embeddings={work / 'round1_run' / 'embeddings.npy'}",
             f"--categories={demo.categories}", f"--index={work / 'pool_index.npz'}",
             "--top_k=3", f"--out={tmp_path / 'r'}"]
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len(os.listdir(tmp_path / "r")) == 8  # which=all: novel categories too
  assert (tmp_path / "r" / "red_disc.txt").read_text().split() == (
      one_round["retrieved"]["red_disc"][:3])


# ------------------------------------------------------------------------------------------------
# Bad input and atomic outputs.


def test_empty_pool_and_mismatched_files_are_errors(one_round, demo, tmp_path):
  (tmp_path / "pool").mkdir()
  (tmp_path / "pool" / "notes.txt").write_text("no images")
  with pytest.raises(FileNotFoundError, match="retrieval pool .* has no"):
    rpl_pipeline.build_index(one_round["config"], str(tmp_path / "pool"), str(tmp_path / "i.npz"))
  assert not os.path.exists(tmp_path / "i.npz")
  np.savez(tmp_path / "empty.npz", paths=np.array([], str), embeddings=np.zeros((0, 16)))
  emb = str(one_round["work"] / "round1_run" / "embeddings.npy")
  with pytest.raises(ValueError, match="retrieval pool of .* is empty"):
    rpl_pipeline.retrieve(emb, demo.categories, str(tmp_path / "empty.npz"), str(tmp_path / "r"))
  short = write_lines(tmp_path / "c.txt", ["a_which_is_b"])
  pool = str(one_round["work"] / "pool_index.npz")
  with pytest.raises(ValueError, match=r"holds \(8, 16\) embeddings; .* has 1 categories"):
    rpl_pipeline.retrieve(emb, short, pool, str(tmp_path / "r"))
  with pytest.raises(ValueError, match="needs base_inds"):
    rpl_pipeline.retrieve(emb, demo.categories, pool, str(tmp_path / "r"), which="novel")
  with pytest.raises(FileNotFoundError, match="No learned prompts"):
    rpl_pipeline.learned_contexts(str(tmp_path))


def test_outputs_are_written_atomically(tmp_path):
  def fail(f):
    f.write(b"partial")
    raise RuntimeError("disk full")
  with pytest.raises(RuntimeError):
    writers.write_atomic(str(tmp_path / "x.npy"), fail)
  assert os.listdir(tmp_path) == []
  writers.write_atomic(str(tmp_path / "x.npy"), lambda f: np.save(f, np.arange(3)))
  assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["x.npy"]
  with pytest.raises(RuntimeError):
    with object_crops.staged_folder(str(tmp_path / "out")) as staging:
      open(os.path.join(staging, "a.png"), "w").close()
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == ["x.npy"]
