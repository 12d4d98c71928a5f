"""SA2VP (Pei et al., AAAI 2024) on VTAB-1k with Swin-B (ImageNet-22k), or on the embedded demo data.

  # Demo (embedded generated 32 px data, a tiny frozen random Swin with patch 2 and window 2, 6
  # epochs; about 3 minutes on 2 shared CPU cores, test accuracy 0.52 against 0.10 chance):
  python -m jaxprompt.main --config configs/sa2vp_swin_vtab.py
  # A VTAB-1k task with Swin-B (swin_base_patch4_window7_224_22k.pth, as the seed uses), the
  # paper's protocol (train800val200 for 100 epochs, report test at the last epoch):
  python -m jaxprompt.main --config configs/sa2vp_swin_vtab.py:task=svhn \
      --config.data_dir=$TFDS_DATA_DIR --config.model_init=swin_base_patch4_window7_224_22k.pth \
      --workdir workdirs/sa2vp_swin_svhn
  # `,split=val` trains on train800 and evaluates val200; `,inter_weight=0.5` overrides alpha.

The recipe is `sa2vp_vtab.py`'s (the seed's README and scripts: AdamW, lr 1e-3, wd 1e-4 except
biases and LayerNorm params, 10 warmup epochs, cosine to 1e-7 at epoch 100, inputs resized to 224
with mean = std = 0.5), with the Swin settings of the seed's README: inter-dim 8 for every group;
inter-weight "0.1/0.5" for Natural, "0.5/1.5" for Specialized, 1.5 for Structured; batch 64 for
Natural (the shipped natural script) and 40 otherwise; drop-path 0.2 (`build_swin_backbone.py`).
The README does not say which tasks take the second inter-weight of a group. We give 0.5 to SVHN
and Resisc45, the two tasks the README special-cases to 0.5 for ViT, and the group's other value
to the rest; this is our reading, not the seed's statement. The ViT-only learning rates (Pets,
Clevr/Count 5e-4) are not applied.

The SA2VP paper's Swin-B VTAB-1k results (its Table 3) are not reproduced here: the paper was not
retrievable in this environment, so no number is quoted.
"""
import ml_collections

from configs import common, sa2vp_vtab

# group -> (inter_dim, inter_weight, batch_size)
GROUP_SETTINGS = {"natural": (8, 0.1, 64), "specialized": (8, 1.5, 40),
                  "structured": (8, 1.5, 40)}
TASK_INTER_WEIGHT = {"svhn": 0.5, "resisc45": 0.5}


def get_config(arg=None):
  arg = common.parse_arg(arg, task="", variant="B", split="test", inter_weight=-1.0,
                         runlocal=False)
  config = sa2vp_vtab.get_config(f"task={arg.task},split={arg.split}")
  config.model_name = "prompts.sa2vp_swin"
  config.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, inter_dim=8, inter_weight=0.5, dropout=0.1, drop_path_rate=0.2,
      cross_stage=2))

  if arg.task:
    group = sa2vp_vtab.task_group(arg.task)
    config.model.inter_dim, inter_weight, config.batch_size = GROUP_SETTINGS[group]
    config.model.inter_weight = TASK_INTER_WEIGHT.get(arg.task, inter_weight)
    config.optim.lr = 1e-3
    config.eval_batch_size = 4 * config.batch_size
  else:  # sa2vp_vtab set up the embedded demo; a Swin that tiles 32 px: 16 -> 8 -> 4 -> 2 maps
    config.model.update(variant="mu", patch_size=2, window_size=2, drop_path_rate=0.0)
    config.num_epochs = 6
  if arg.inter_weight >= 0:
    config.model.inter_weight = arg.inter_weight
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
