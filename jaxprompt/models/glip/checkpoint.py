"""Loading GLIP weights: the official checkpoints whole, or the parts (Swin, BERT) separately.

The released files (microsoft/GLIP README "Model Zoo": `glip_tiny_model_o365_goldg.pth`,
`glip_large_model.pth`, ...) are `torch.save` dicts whose 'model' entry is the state dict of a
DistributedDataParallel-wrapped `GeneralizedVLRCNN`
(`maskrcnn_benchmark/modeling/detector/generalized_vl_rcnn.py`), so every name starts 'module.':

  module.backbone.{body,fpn}.*                 -> backbone/...         (`backbone.convert_backbone`)
  module.language_backbone.body.model.*        -> language_backbone/... (transformers BertModel
                                                  names, `bert.convert_hf_bert`; the unused pooler
                                                  and the position_ids buffer are dropped)
  module.rpn.head.dyhead_tower.{3i}.*          -> head/dyhead_tower_{3i}   (`fusion.convert_fusion`)
  module.rpn.head.dyhead_tower.{3i+1}.*        -> head/dyhead_tower_{3i+1}
                                                  (`fusion.convert_bert_layer`)
  module.rpn.head.dyhead_tower.{3i+2}.*        -> head/dyhead_tower_{3i+2} (`dyconv.convert_dyconv`)
  module.rpn.head.<other>                      -> head/heads/...       (`heads.convert_heads`)
  module.rpn.anchor_generator.cell_anchors.*   dropped (buffers; `boxes.anchors` recomputes them)

Files are read with `torch.load(weights_only=True)` (`common.load_torch_state_dict`), never by
unpickling code. Every part's converter is strict, and the merge into the model's params
(`common.merge_params`) lists every missing, unexpected and mis-shaped name, so a GLIP-L file
loaded into a GLIP-T model names the keys that differ (the extra tower layers, the Swin widths).
"""
from __future__ import annotations

import re

import numpy as np

from jaxprompt.models import bert, common
from jaxprompt.models.glip import backbone, dyconv, fusion, heads

_TOWER = re.compile(r"rpn\.head\.dyhead_tower\.(\d+)\.(.+)")
_DROPPED = re.compile(r"rpn\.anchor_generator\..*|language_backbone\.body\.model\.pooler\..*"
                      r"|language_backbone\.body\.model\.embeddings\.position_ids")


def split_parts(state_dict: dict[str, np.ndarray], *,
                source: str = "<state dict>") -> dict[str, dict[str, np.ndarray]]:
  """Official names -> {'backbone', 'language', 'tower_{k}', 'heads'}: each part's entries with
  its prefix stripped ('module.' too). Names of no part raise one ValueError listing them."""
  parts: dict[str, dict[str, np.ndarray]] = {}
  unknown = []
  for name, value in state_dict.items():
    name = name.removeprefix("module.")
    tower = _TOWER.fullmatch(name)
    if _DROPPED.fullmatch(name):
      continue
    if tower:
      part, key = f"tower_{int(tower.group(1))}", tower.group(2)
    elif name.startswith("backbone."):
      part, key = "backbone", name.removeprefix("backbone.")
    elif name.startswith("language_backbone.body.model."):
      part, key = "language", name.removeprefix("language_backbone.body.model.")
    elif name.startswith("rpn.head."):
      part, key = "heads", name.removeprefix("rpn.head.")
    else:
      unknown.append(name)
      continue
    parts.setdefault(part, {})[key] = value
  if unknown:
    raise ValueError(f"{source}: {len(unknown)} name(s) of no GLIP part (expected backbone.*, "
                     "language_backbone.body.model.*, rpn.head.*): "
                     + ", ".join(sorted(unknown)[:20]))
  return parts


def convert_glip(state_dict: dict[str, np.ndarray], *, text_heads: int,
                 source: str = "<state dict>") -> dict:
  """An official GLIP state dict -> our nested params (module docstring). `text_heads`: the
  BERT head count (12 for bert-base-uncased), which names do not carry."""
  parts = split_parts(state_dict, source=source)
  missing = [p for p in ("backbone", "language", "heads") if p not in parts]
  if missing:
    raise ValueError(f"{source}: no entries for the GLIP part(s) {missing} (is this a GLIP "
                     "checkpoint?).")
  head = {"heads": heads.convert_heads(parts.pop("heads"))}
  tower = sorted(int(p.split("_")[1]) for p in parts if p.startswith("tower_"))
  if tower != list(range(len(tower))) or len(tower) % 3:
    raise ValueError(f"{source}: the dyhead tower holds modules {tower}; expected 0..3L-1 "
                     "(VLFuse, BERT layer, DyConv per fusion layer).")
  for k in tower:
    entries = parts.pop(f"tower_{k}")
    try:
      if k % 3 == 0:
        head[f"dyhead_tower_{k}"] = fusion.convert_fusion(entries)
      elif k % 3 == 1:
        head[f"dyhead_tower_{k}"] = fusion.convert_bert_layer(entries, num_heads=text_heads)
      else:
        head[f"dyhead_tower_{k}"] = dyconv.convert_dyconv(entries, source=source)
    except ValueError as e:
      raise ValueError(f"{source}: rpn.head.dyhead_tower.{k}: {e}") from None
  language = common.unflatten(bert.convert_hf_bert(parts.pop("language"), text_heads,
                                                   source=source))
  return {"backbone": backbone.convert_backbone(parts.pop("backbone"), source=source),
          "language_backbone": language, "head": head}


def _text_heads(params: dict) -> int:
  return int(params["language_backbone"]["encoder"]["layer_0"]["attention"]["query"]["kernel"]
             .shape[1])


def load_glip(variables: dict, path: str) -> dict:
  """`Method.loaders['model']`: an official GLIP `.pth` (or a state dict with its names, e.g.
  `.safetensors`) into the model's variables, strictly."""
  params = variables["params"]
  state = common.load_torch_state_dict(path)
  loaded = convert_glip(state, text_heads=_text_heads(params), source=path)
  return {**variables, "params": common.merge_params(loaded, params, source=path)}


def load_glip_keeping(method_params: str):
  """`load_glip` for a GLIP with a method's own top-level params (SDPT's prototypes, GLIP's
  prompt table): those whose names full-match `method_params` keep their init; the rest of the
  model loads strictly."""
  pattern = re.compile(method_params)

  def load(variables: dict, path: str) -> dict:
    params = variables["params"]
    own = {k: v for k, v in params.items() if pattern.fullmatch(k)}
    loaded = load_glip({**variables, "params": {k: v for k, v in params.items()
                                                if k not in own}}, path)
    return {**loaded, "params": {**loaded["params"], **own}}

  return load


def load_swin(variables: dict, path: str) -> dict:
  """`Method.loaders['image']`: Microsoft's Swin classification checkpoint (GLIP's MODEL.WEIGHT
  for pre-training: swin_tiny_patch4_window7_224.pth / swin_large_patch4_window12_384_22k.pth)
  into the backbone's Swin body; the output norms and the FPN keep their init."""
  params = dict(variables["params"])
  params["backbone"] = backbone.load_swin_trunk(params["backbone"], path)
  return {**variables, "params": params}


def load_bert(variables: dict, path: str) -> dict:
  """`Method.loaders['text']`: Hugging Face bert-base-uncased weights into the language
  backbone (the tower's BERT layers start from GLIP's init, as in pre-training)."""
  params = dict(variables["params"])
  params["language_backbone"] = bert.load(params["language_backbone"], path)
  return {**variables, "params": params}
