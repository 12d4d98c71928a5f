"""Zero-shot CLIP from the command line: the 'zeroshot' evaluator on a CLIP prompt method's config.

  python -m jaxprompt.zeroshot --config configs/coop.py [--templates=ensemble]

evaluates the CLIP of a CLIP prompt method's config (its `clip/` params: `config.model_init`, or
the random init of `config.seed`) on the config's eval splits, with no training. `--templates`:
'default' ("a photo of a {}."), 'ensemble' (`IMAGENET_TEMPLATES_SELECT`), or templates joined
by '|'. The method (templates, ensembles, metrics) lives in `jaxprompt/evaluators/zeroshot.py`,
after KaiyangZhou/CoOp `trainers/zsclip.py`; multi-label sources (batches with 'labels', e.g.
LMPT's) get LMPT's metrics, the others accuracy and loss.
"""
from __future__ import annotations

from typing import Sequence

from jaxprompt import train
from jaxprompt.evaluators import common
from jaxprompt.evaluators.zeroshot import parse_templates


def metrics_kind(source) -> str:
  """'multilabel' for sources whose batches carry multi-hot 'labels', else 'classification'."""
  return "multilabel" if "labels" in getattr(source, "batch_keys", {}) else "classification"


def evaluate(exp, templates: Sequence[str], split: str) -> dict:
  """Zero-shot metrics of the CLIP inside `exp` (a `train.Experiment` of a CLIP prompt method) on
  `split`, as '{split}/accuracy', '/loss', '/examples' (or '{split}/mAP' and the rest of LMPT's
  multi-label metrics)."""
  entry = {"type": "zeroshot", "split": split, "templates": tuple(templates),
           "metrics": metrics_kind(exp.data.source)}
  evaluator = common.build(f"zeroshot_{split}", entry, exp.eval_context)
  return {f"{split}/{k}": v for k, v in evaluator.run(train.variables(exp.state)).items()}


def eval_splits(config) -> tuple[str, ...]:
  """The splits of config.evals (in order, once each)."""
  return tuple(dict.fromkeys(e["split"] for e in (config.get("evals") or {}).values()))


def main(argv):
  del argv
  from absl import flags
  config = flags.FLAGS["config"].value
  templates = parse_templates(flags.FLAGS["templates"].value)
  exp = train.build(config)
  if config.get("model_init"):
    train.log(f"CLIP weights from {config.model_init}")
  else:
    train.log(f"CLIP weights: random init (seed {config.seed}), no config.model_init")
  for split in eval_splits(config):
    metrics = evaluate(exp, templates, split)
    name = "mAP" if f"{split}/mAP" in metrics else "accuracy"
    train.log(f"zero-shot {split}/{name}: {metrics[f'{split}/{name}']:.4f} "
              f"({metrics[f'{split}/examples']} examples, {len(templates)} template(s))")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A CLIP prompt method's config file.",
                                  lock_config=True)
  flags.DEFINE_string("templates", "default", "'default', 'ensemble' or 't1 {}.|t2 {}.'")
  flags.mark_flag_as_required("config")
  app.run(main)
