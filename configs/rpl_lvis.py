"""RPL (PromptDet's regional prompt learning) on LVIS object crops: two learned contexts around each
category's name and description, frozen CLIP; see jaxprompt/prompts/rpl.py and, for the whole
round (crops, train, embed, index, retrieve, sample), jaxprompt/rpl_pipeline.py.

  # Demo (no downloads): crops cut from generated LVIS-format scenes (6 base categories, 16 crops
  # each; input_pipeline/embedded_coco.py), a tiny random-init CLIP (ViT-mu/8) and the project's
  # byte-level vocabulary; 600 steps, about 20 s on 2 CPU cores:
  python -m jaxprompt.main --config configs/rpl_lvis.py
  # The demo's whole round and the next round's training:
  python -m jaxprompt.rpl_pipeline demo --workdir=/tmp/rpl_demo
  # PromptDet's run on crops written by `python -m jaxprompt.rpl_pipeline crops ... --out=DIR`
  # (DIR/train/<category>/, DIR/val/<category>/, DIR/classnames.txt), OpenAI's CLIP ViT-B/32:
  python -m jaxprompt.main --config configs/rpl_lvis.py:data=DIR --workdir=rpl/round1_run \
      --config.model_init=ViT-B-32.pt --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz

Arguments: data (a crop folder; default: the demo's first round), descriptions (the category file
that names and describes the class folders; default DIR/classnames.txt), variant (CLIP, ViT only),
n_ctx (1), seed (3, the original's only seed), demo (the demo's tiny CLIP and sizes on `data`,
e.g. a later demo round), runlocal.

The recipe is RPL's `vit_b32_ep6` (`configs/trainers/RPL/vit_b32_ep6.yaml`, `scripts/main.sh
imagenet vit_b32_ep6 lvis_and_laion_data 1 600`): CLIP ViT-B/32 at 224 px with CLIP's mean/std;
n_ctx 1; SGD lr 0.002, momentum 0.9, weight decay 5e-4 (Dassl's defaults) on ctx1 and ctx2 only;
cosine over 6 epochs with 1 warmup epoch starting at 1e-5; batch 32 (eval 100); every image of
every class (600 shots >= the largest class); seed 3; val is the evaluation split.

Schedule and augmentation as RPL's Dassl runs them (`configs/common.coop_recipe`): the constant
warmup epoch at 1e-5, then a cosine stepped once per epoch; RandomResizedCrop(224, scale (0.4, 1),
bicubic) + flip for training, resize 224 (bicubic) + center crop for evaluation. The embedded demo
keeps the per-step schedule with a linear warmup and plain 32 px resizes.

Expected results: RPL's product is the category embeddings; PromptDet reports detector mask
AP_novel on LVIS (manual prompt 7.4 -> RPL 11.5 -> RPL + self-training 19.5, 1x schedule), which
this project does not train, so no number is promised for the prompts themselves. The demo's CLIP
is random, so it shows the mechanics, not quality: measured (seed 3, 95 train / 38 val crops of 6
categories, chance 0.167), round 1 val accuracy 0.289 after 600 steps (train accuracy 0.42);
`rpl_pipeline demo`'s round 2 (the crops plus each category's top 4 retrieved pool images, 119
images, 900 steps) 0.395.
"""
import os

import ml_collections

from configs import common
from input_pipeline import object_crops


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", descriptions="", variant="ViT-B/32", n_ctx=1, seed=3,
                         demo=False, runlocal=False)
  demo = arg.demo or not arg.data
  data = arg.data
  if not data:
    from input_pipeline import embedded_coco  # writes the demo data on first use
    data = embedded_coco.demo_data().round1
  config = common.base_config(model_name="prompts.rpl", model=dict(
      variant=arg.variant, vocab_path="", n_ctx=arg.n_ctx,
      descriptions_file=arg.descriptions or os.path.join(data, object_crops.CLASSNAMES_FILE)))
  config.seed = arg.seed
  config.dataset = "folder"
  config.dataset_kwargs = ml_collections.ConfigDict(dict(root=data))
  config.train_split, config.evals = "train", common.evals("val")
  common.coop_recipe(config, crop_scale=(0.4, 1.0))  # RPL's INPUT.CROP_SCALE
  config.num_epochs = 6
  config.log_every_steps = 50

  if demo:
    common.use_tiny_clip(config, variant=arg.variant, paper_variant="ViT-B/32")
    config.eval_batch_size = 100
    config.pp.train = config.pp.eval = common.vtab_pp(32, "clip")
    config.num_epochs = 300  # 600 steps: the random CLIP needs many to show learning
    config.log_every_steps = 100
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
