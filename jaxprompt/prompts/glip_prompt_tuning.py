"""GLIP's own prompt tuning (`language_prompt_v2`, GLIP §4.4 "prompt tuning"): a learned table
added to the text features of a frozen GLIP; the single-modal baseline of SDPT.

Follows microsoft/GLIP `tools/finetune.py` (`tuning_highlevel_override`, 'language_prompt_v2':
BACKBONE, FPN, RPN and LANGUAGE_BACKBONE frozen, DYHEAD.FUSE_CONFIG.ADD_LINEAR_LAYER on) and
`maskrcnn_benchmark/modeling/rpn/vldyhead.py` (`VLDyHeadModule`: `tunable_linear`, an
nn.Linear(768, 1000, bias=False) whose zero-initialised weight (1000 x 768) is used as a table: its
first T rows are added to the language backbone's `hidden` and `embedded` features before the
head). Only that table trains (`TRAINABLE_PARAMS`); README recipe: lr 0.05, weight decay 0.25.

GLIP puts every frozen module in eval mode here (the rpn head too), so nothing stochastic runs in
training; the config turns dropout, stochastic depth and DropBlock off to match
(`configs/sdpt_coco.py:mask=language_prompt`). `embedded` is not used by GLIP's dot-product head
(USE_FUSED_FEATURES_DOT_PRODUCT), so adding the table to `hidden` is the whole effect.
"""
from __future__ import annotations

import flax.linen as nn

from jaxprompt.models.glip import detector
from jaxprompt.prompts import glip_finetune

TRAINABLE_PARAMS = r"tunable_linear"
TABLE_ROWS = 1000  # the rows of GLIP's tunable_linear


class Model(detector.Model):
  """GLIP plus `tunable_linear` (1000 x D, zeros) added to the text features before the head."""

  @nn.compact
  def __call__(self, image, text_ids, text_mask, *, train: bool = False):
    width = detector.text_width(self.size)
    if text_ids.shape[1] > TABLE_ROWS:
      raise ValueError(f"GLIP prompt tuning: the table has {TABLE_ROWS} rows; the text has "
                       f"{text_ids.shape[1]} tokens.")
    table = self.param("tunable_linear", nn.initializers.zeros, (TABLE_ROWS, width))
    return detector.Model.__call__(self, image, text_ids, text_mask, train=train,
                                   text_delta=table)


METHOD = glip_finetune.glip_prompt_method(Model, TRAINABLE_PARAMS, TRAINABLE_PARAMS)
