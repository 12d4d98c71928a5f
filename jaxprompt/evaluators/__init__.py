"""Evaluators chosen by `config.evals` (see `common.py`); importing the package registers them."""
from __future__ import annotations

from jaxprompt.evaluators import (classification, common, detection, multilabel, retrieval,
                                  video_retrieval, zeroshot)
from jaxprompt.evaluators import captioning  # 'captioning': ClipCap / CapDec, COCO metrics
from jaxprompt.evaluators import tta  # 'tta': TPT / RLCF test-time adaptation
from jaxprompt.evaluators import tta_captioning  # 'tta_captioning': RLCF captioning
from jaxprompt.evaluators import tta_retrieval  # 'tta_retrieval': RLCF image-text retrieval
from jaxprompt.evaluators.common import EvalContext, Evaluator, eval_batches, from_config, run_all

__all__ = ["EvalContext", "Evaluator", "captioning", "classification", "common", "detection",
           "eval_batches", "from_config", "multilabel", "retrieval", "run_all", "tta",
           "tta_captioning", "tta_retrieval", "video_retrieval", "zeroshot"]
