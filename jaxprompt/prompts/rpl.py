"""RPL, the regional prompt learning of PromptDet (Feng et al., ECCV 2022, "PromptDet: Towards
Open-vocabulary Detection using Uncurated Images", arXiv 2203.16513): two learned context sets
around each category's name and its description, on a frozen CLIP, trained on object crops.

Follows fcjian/RPL `trainers/rpl.py` (`PromptLearner`, `CustomCLIP`) and
`tools/promptdet/gen_category_embedding.py`:

  * a category is 'name_which_is_description' (the second field of a line of RPL's
    `classnames.txt` / `lvis_category_and_description.txt`), split on the literal '_which_is_',
    '_' -> ' ' in both parts;
  * its prompt is the embedding of "X.. {name} X.. {description}." with the X positions replaced
    by the shared contexts: [SOS][ctx1][name][ctx2][description][.][EOT][pad]; `ctx1` and `ctx2`
    are `prompt_learner/ctx1`, `prompt_learner/ctx2`, each (n_ctx, W), N(0, 0.02²), shared by all
    categories (no class-specific contexts, no word init); n_ctx = 1 in PromptDet's run;
  * prompts longer than CLIP's 77 tokens are an error (the original's `clip.tokenize` raises);
  * logits and loss as CoOp (`coop.PromptCLIP`): exp(logit_scale) · cos, cross-entropy; only the
    two contexts train;
  * `category_embeddings()`: the *unnormalised* text features of every category, what
    `gen_category_embedding.py` saves for the detector and for retrieval.

The model's `class_names` are the data source's classes: the crop folders (an LVIS name such as
'aerosol_can'), looked up in `descriptions_file` (lines 'folder name_which_is_description'), or
full 'name_which_is_description' strings, used as they are.

Deliberate deviations: fp32 (the original runs CLIP and the contexts in fp16), and the text tower
runs up to the last EOT position only (identical features under the causal mask), as in coop.py.
"""
from __future__ import annotations

import functools

from input_pipeline import object_crops
from jaxprompt import method
from jaxprompt.models import common
from jaxprompt.prompts import coop

TRAINABLE_PARAMS = coop.TRAINABLE_PARAMS  # prompt_learner/ctx1 and prompt_learner/ctx2
SEPARATOR = object_crops.DESCRIPTION_SEPARATOR


def split_category(entry: str) -> tuple[str, str]:
  """'aerosol_can_which_is_a_dispenser' -> ('aerosol can', 'a dispenser') (as the original, the
  second piece when split on the separator)."""
  parts = entry.split(SEPARATOR)
  if len(parts) < 2 or not parts[0] or not parts[1]:
    raise ValueError(f"Category {entry!r} is not 'name{SEPARATOR}description'.")
  name, description = parts[:2]
  return name.replace("_", " "), description.replace("_", " ")


def rpl_segments(name: str, description: str, n_ctx: int) -> list[coop.Segment]:
  """RPL's prompt of one category: [ctx1] name [ctx2] description. ("description." is one text
  piece, tokenised as in the original's joined string)."""
  return [coop.Context("ctx1", 0, n_ctx), name, coop.Context("ctx2", 0, n_ctx),
          f"{description}."]


@functools.lru_cache(maxsize=16)
def rpl_prompts(vocab_path: str, context_length: int, entries: tuple[str, ...],
                n_ctx: int) -> tuple[coop.PromptLayout, tuple[coop.ContextBlock, ...]]:
  """(layout, blocks) of RPL's prompts for categories 'name_which_is_description'."""
  if n_ctx < 1:
    raise ValueError(f"n_ctx must be >= 1; got {n_ctx}.")
  tokenizer = coop.get_tokenizer(vocab_path, context_length)
  blocks = (coop.ContextBlock("ctx1", n_ctx), coop.ContextBlock("ctx2", n_ctx))
  prompts = [rpl_segments(*split_category(entry), n_ctx) for entry in entries]
  lengths = [2 + 2 * n_ctx + len(tokenizer.encode(name)) + len(tokenizer.encode(text))
             for _, name, _, text in prompts]  # SOT, ctx1, name, ctx2, "description.", EOT
  too_long = [(entry, n) for entry, n in zip(entries, lengths) if n > context_length]
  if too_long:
    raise ValueError(f"{len(too_long)} RPL prompt(s) exceed CLIP's context length "
                     f"{context_length} (tokens with SOT, contexts and EOT): {too_long[:3]}; "
                     "shorten those descriptions.")
  return coop.build_layout(tokenizer, prompts, blocks), blocks


def resolve_categories(class_names, descriptions_file: str) -> tuple[str, ...]:
  """Each class as 'name_which_is_description': kept when it already is one, else looked up by
  folder name in `descriptions_file`; a class the file lacks raises, naming it."""
  if all(SEPARATOR in name for name in class_names):
    return tuple(class_names)
  if not descriptions_file:
    raise ValueError(
        f"RPL needs each class's description: set config.model.descriptions_file to a category "
        f"file ('folder name{SEPARATOR}description' lines); classes: {list(class_names)[:5]}.")
  known = object_crops.read_category_file(descriptions_file)
  unknown = [name for name in class_names if SEPARATOR not in name and name not in known]
  if unknown:
    raise ValueError(f"Classes {unknown[:5]} ({len(unknown)} in all) are not in the category "
                     f"file {descriptions_file!r} ({len(known)} categories, e.g. "
                     f"{list(known)[:3]}).")
  return tuple(name if SEPARATOR in name else known[name] for name in class_names)


class Model(coop.PromptCLIP):
  """RPL on CLIP: `coop.PromptCLIP` with contexts `prompt_learner/ctx1`, `ctx2`."""
  variant: str = "ViT-B/32"
  n_ctx: int = 1
  descriptions_file: str = ""
  METHOD = "RPL"

  def __post_init__(self):
    common.require(self, n_ctx=(self.n_ctx >= 1, "an integer >= 1"))
    super().__post_init__()

  def build_prompts(self):
    entries = resolve_categories(self.class_names, self.descriptions_file)
    return rpl_prompts(self.vocab_path, self.clip.context_length, entries, self.n_ctx)

  def category_embeddings(self):
    """Unnormalised text features of every category's prompt, (num_classes, E), float32."""
    return self.clip.encode_text_embeddings(self.prompt_embeddings(), self.layout.eot_index)


# CLIP weights into clip/... (`coop.load`); the random contexts keep their init.
METHOD = method.Method(model=Model, trainable=TRAINABLE_PARAMS, loaders={"model": coop.load},
                       predict_fns=coop.clip_predict_fns)
