"""SA2VP (Pei et al., AAAI 2024) on VTAB-1k with ViT-B/16, or on the embedded demo data.

  # Demo (embedded generated data, tiny random ViT; about a minute on 2 CPU cores):
  python -m jaxprompt.main --config configs/sa2vp_vtab.py
  # A VTAB-1k task with ImageNet-21k ViT-B/16, the paper's protocol (train800val200 for 100
  # epochs, report test at the last epoch); inter-dim, inter-weight, lr and batch come from the
  # task's group and the seed's special cases below:
  python -m jaxprompt.main --config configs/sa2vp_vtab.py:task=svhn \
      --config.data_dir=$TFDS_DATA_DIR --config.model_init=imagenet21k_ViT-B_16.npz \
      --workdir workdirs/sa2vp_svhn
  # `,split=val` trains on train800 and evaluates val200 (model selection).
  # `,files` reads the SSF/NOAH VTAB-1k release the seed trains on (<data_dir>/<task>/*.txt
  # lists and images) instead of TFDS: --config.data_dir=/data/vtab-1k.

The recipe is the seed's README and scripts (tommy-xq/SA2VP): AdamW (0.9, 0.999, eps 1e-8), lr 1e-3
(5e-4 for Pets and Clevr/Count), weight decay 1e-4 on every tensor except biases and LayerNorm
params, per-step linear warmup over 10 epochs then cosine to 1e-7 at epoch 100, batch 64 for
Natural and 40 for Specialized/Structured, inputs resized to 224 and normalised with mean = std =
0.5, no augmentation. Per group (inter-dim d, inter-weight alpha): Natural 8/0.1, Specialized
16/1.5, Structured 32/1.5; the README's special cases: SVHN 16/0.5, Resisc45 16/0.5,
dSprites/ori 16/0.1, sNORB/ele 32/0.5.

The SA2VP paper's VTAB-1k results (Table 1, ViT-B/16 IN-21k) are not reproduced here: the paper was
not retrievable in this environment, so no number is quoted.
"""
import ml_collections

from configs import common

NATURAL = ("cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397")
SPECIALIZED = ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy")
STRUCTURED = ("clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
              "smallnorb_azi", "smallnorb_ele")
# group -> (inter_dim, inter_weight, batch_size)
GROUP_SETTINGS = {"natural": (8, 0.1, 64), "specialized": (16, 1.5, 40),
                  "structured": (32, 1.5, 40)}
# task -> (inter_dim, inter_weight): the README's "need to specially handle" list.
TASK_SETTINGS = {"svhn": (16, 0.5), "resisc45": (16, 0.5), "dsprites_ori": (16, 0.1),
                 "smallnorb_ele": (32, 0.5)}
TASK_LR = {"oxford_iiit_pet": 5e-4, "clevr_count": 5e-4}


def task_group(task: str) -> str:
  for group, tasks in (("natural", NATURAL), ("specialized", SPECIALIZED),
                       ("structured", STRUCTURED)):
    if task in tasks:
      return group
  raise ValueError(f"Unknown VTAB-1k task {task!r}; valid: {', '.join(NATURAL + SPECIALIZED + STRUCTURED)}.")


def sa2vp_vit_config(*, augment: str = "none") -> ml_collections.ConfigDict:
  """SA2VP ViT-B/16 with the seed's optimizer, schedule and normalisation (mean = std = 0.5).

  augment: 'none' (VTAB: resize to 224) or 'fgvc' (resize 256, random crop + flip / center crop).
  """
  config = common.base_config(model_name="prompts.sa2vp", model=dict(
      variant="B/16", inter_dim=16, inter_weight=0.1, dropout=0.1, deep_prompt_layers=(4, 8)))
  if augment not in ("none", "fgvc"):
    raise ValueError(f"augment={augment!r}: expected 'none' or 'fgvc'.")
  train_pp, eval_pp = (common.fgvc_pp(224, "inception") if augment == "fgvc"
                       else (common.vtab_pp(224, "inception"),) * 2)
  config.pp = ml_collections.ConfigDict(dict(image_size=224, train=train_pp, eval=eval_pp))
  config.batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 100
  config.optim = common.optimizer("adamw", lr=1e-3, weight_decay=1e-4,
                                  no_weight_decay=r".*/bias|.*/scale", warmup_epochs=10,
                                  min_lr=1e-7)
  return config


def use_embedded_demo(config) -> None:
  """The embedded demo for every SA2VP config: generated 32 px shapes, a two-block ViT (its block
  1 takes the deep prompt map that layers 4 and 8 take in ViT-B), 12 epochs."""
  common.use_embedded_demo(config, norm="inception", epochs=12)
  config.model.deep_prompt_layers = (1,)
  config.optim.lr = 1e-2


def get_config(arg=None):
  arg = common.parse_arg(arg, task="", variant="B/16", split="test", files=False,
                         runlocal=False)
  config = sa2vp_vit_config()
  config.model.variant = arg.variant
  if arg.task:
    group = task_group(arg.task)
    inter_dim, inter_weight, config.batch_size = GROUP_SETTINGS[group]
    config.model.inter_dim, config.model.inter_weight = TASK_SETTINGS.get(
        arg.task, (inter_dim, inter_weight))
    config.optim.lr = TASK_LR.get(arg.task, 1e-3)
    config.eval_batch_size = 4 * config.batch_size
    config.dataset = f"{'vtab1k_files' if arg.files else 'vtab'}/{arg.task}"
    config.train_split, splits = (
        ("train800", ("val200",)) if arg.split == "val" else ("train800val200", ("test",)))
    config.evals = common.evals(*splits)
  else:
    use_embedded_demo(config)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
