"""CoOp / LMPT / RPL prompts are tokenised as the originals' whole prompt string.

KaiyangZhou/CoOp `trainers/coop.py` (`PromptLearner.__init__`; LMPT's `lmpt/coop_model.py` is the
same code) runs `clip.tokenize('X X X X {name}.')` on the whole string, so a class name ending in
')' merges with the final '.' wherever the BPE has that merge. A tiny BPE vocabulary (the byte
symbols plus the one merge ')' + '.</w>' -> ').</w>') shows the difference without OpenAI's file;
with the real vocabulary (CLIP_BPE_PATH, optional) the same holds for ').' (id 1818).
"""
import gzip
import os

import jax
import numpy as np
import pytest

from jaxprompt.prompts import coop, lmpt, rpl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_BPE = os.environ.get("CLIP_BPE_PATH", os.path.join(
    os.path.dirname(REPO), "shared", "data", "clip", "bpe_simple_vocab_16e6.txt.gz"))
NAMES = ("sea_lion_(animal)", "cat", "tv (box)")
N_CTX = 4


@pytest.fixture(scope="module")
def merge_vocab(tmp_path_factory):
  """OpenAI's .txt.gz format: a header line, then one merge ') .</w>'. Ids: the 512 byte symbols,
  ').</w>' = 512, SOT 513, EOT 514."""
  path = str(tmp_path_factory.mktemp("vocab") / "merge.txt.gz")
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: test\n) .</w>\n")
  return path


def whole_string_ids(tokenizer, name, n_ctx=N_CTX):
  """CoOp's reference: clip.tokenize('X X X X {name}.'), 77 ids."""
  return tokenizer([" ".join(["X"] * n_ctx) + f" {name.replace('_', ' ')}."])[0]


def coops_layout(tokenizer, name, position, n_ctx=N_CTX):
  """(token ids, context rows) of CoOp's construction: the whole string's [SOS] and suffix, the
  context inserted after `name_lens` = len(encode(name)) suffix tokens for middle/front."""
  ids = whole_string_ids(tokenizer, name, n_ctx).tolist()
  prefix, suffix = ids[:1], ids[1 + n_ctx:]
  name_len = len(tokenizer.encode(name.replace("_", " ")))
  half = n_ctx // 2
  pieces = {"end": [prefix, range(n_ctx), suffix],
            "middle": [prefix, range(half), suffix[:name_len], range(half, n_ctx),
                       suffix[name_len:]],
            "front": [prefix, suffix[:name_len], range(n_ctx), suffix[name_len:]]}[position]
  token_ids, rows = [], []
  for piece in pieces:
    is_ctx = isinstance(piece, range)
    token_ids += [0] * len(piece) if is_ctx else list(piece)
    rows += list(piece) if is_ctx else [-1] * len(piece)
  return np.array(token_ids), np.array(rows)


def test_the_vocabulary_merges_across_the_segment_boundary(merge_vocab):
  """The premise: encoding the name and '.' apart differs from encoding them together."""
  tokenizer = coop.get_tokenizer(merge_vocab)
  name = "sea lion (animal)"
  apart = tokenizer.encode(name) + tokenizer.encode(".")
  together = tokenizer.encode(f"{name}.")
  assert together == apart[:-2] + [512] and len(together) == len(apart) - 1
  layout, _ = coop.coop_prompts(merge_vocab, 77, NAMES, N_CTX, "", False, "end")
  assert 512 in layout.token_ids[0].tolist()  # ').' is one token, as in the whole string


@pytest.mark.parametrize("position", coop.CLASS_TOKEN_POSITIONS)
@pytest.mark.parametrize("csc", [False, True])
def test_coop_layout_equals_the_whole_string_tokenisation(merge_vocab, position, csc):
  tokenizer = coop.get_tokenizer(merge_vocab)
  layout, _ = coop.coop_prompts(merge_vocab, 77, NAMES, N_CTX, "", csc, position)
  for c, name in enumerate(NAMES):
    token_ids, rows = coops_layout(tokenizer, name, position)
    offset = c * N_CTX if csc else 0
    np.testing.assert_array_equal(layout.token_ids[c], np.pad(token_ids, (0, 77 - len(token_ids))))
    np.testing.assert_array_equal(layout.context_index[c, :len(rows)],
                                  np.where(rows >= 0, rows + offset, -1))
    assert layout.eot_index[c] == whole_string_ids(tokenizer, name).argmax()


def test_build_layout_tokenises_adjacent_text_as_one_string(merge_vocab):
  """Text segments between two contexts are one string: [ctx]'(a)' '.' == [ctx]'(a).'."""
  tokenizer = coop.get_tokenizer(merge_vocab)
  blocks = (coop.ContextBlock("ctx1", 1), coop.ContextBlock("ctx2", 1))
  split = [coop.Context("ctx1", 0, 1), "dog", coop.Context("ctx2", 0, 1), "a (b)", "."]
  layout = coop.build_layout(tokenizer, [split], blocks)
  whole = tokenizer(["X dog X a (b)."])[0]
  whole[[1, 5]] = 0  # the two context positions
  np.testing.assert_array_equal(layout.token_ids[0], whole)
  np.testing.assert_array_equal(layout.context_index[0, :11],
                                [-1, 0, -1, -1, -1, 1, -1, -1, -1, -1, -1])


def test_lmpt_prompt_embeddings_follow_the_whole_string(merge_vocab):
  """LMPT (class-specific CoOp, class at the end): prompt = embedding of the whole string's ids
  with each class's context at positions 1..n_ctx."""
  model = lmpt.Model(num_classes=len(NAMES), class_names=NAMES, vocab_path=merge_vocab,
                     variant="ViT-mu/8", n_ctx=N_CTX)
  variables = model.init(jax.random.PRNGKey(0), method=lmpt.Model.prompt_embeddings)
  params = variables["params"]
  prompts = np.asarray(model.apply(variables, method=lmpt.Model.prompt_embeddings))
  table = np.asarray(params["clip"]["token_embedding"]["embedding"])
  ctx = np.asarray(params["prompt_learner"]["ctx"])  # (C, n_ctx, W)
  tokenizer = coop.get_tokenizer(merge_vocab)
  for c, name in enumerate(NAMES):
    expected = table[whole_string_ids(tokenizer, name)]
    expected[1:1 + N_CTX] = ctx[c]
    np.testing.assert_array_equal(prompts[c], expected[:prompts.shape[1]])


@pytest.mark.skipif(not os.path.isfile(REAL_BPE), reason="OpenAI's CLIP BPE vocabulary not found "
                    "(set CLIP_BPE_PATH); the project does not require it")
@pytest.mark.parametrize("position", coop.CLASS_TOKEN_POSITIONS)
def test_with_clips_bpe_the_layout_keeps_the_merged_token(position):
  tokenizer = coop.get_tokenizer(REAL_BPE)
  assert tokenizer.encode("(animal).")[-1] == 1818 != tokenizer.encode(".")[0]  # ').' vs '.'
  layout, _ = coop.coop_prompts(REAL_BPE, 77, NAMES, N_CTX, "", False, position)
  for c, name in enumerate(NAMES):
    token_ids, _ = coops_layout(tokenizer, name, position)
    np.testing.assert_array_equal(layout.token_ids[c, :len(token_ids)], token_ids)
  entries = ("sea_lion_(animal)_which_is_a_marine_mammal_(pinniped)",)
  rpl_layout, _ = rpl.rpl_prompts(REAL_BPE, 77, entries, 1)
  whole = tokenizer(["X sea lion (animal) X a marine mammal (pinniped)."])[0]
  whole[[1, 2 + len(tokenizer.encode("sea lion (animal)"))]] = 0
  np.testing.assert_array_equal(rpl_layout.token_ids[0], whole)
