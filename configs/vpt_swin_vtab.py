"""VPT (Jia et al., ECCV 2022) on VTAB-1k with Swin-B (ImageNet-22k), or on the embedded demo data.

  # Demo (embedded generated 32 px data, a tiny frozen random Swin with patch 2 and window 2, 6
  # epochs; about 3 minutes on 2 shared CPU cores, test accuracy 0.42 against 0.10 chance):
  python -m jaxprompt.main --config configs/vpt_swin_vtab.py
  # A VTAB-1k task with Swin-B (swin_base_patch4_window7_224_22k.pth, VPT's `swinb_imagenet22k_224`),
  # train on train800val200 and report test at the last epoch:
  python -m jaxprompt.main --config configs/vpt_swin_vtab.py:task=dtd,num_prompts=10 \
      --config.data_dir=$TFDS_DATA_DIR --config.model_init=swin_base_patch4_window7_224_22k.pth \
      --workdir workdirs/vpt_swin_dtd
  # Hyper-parameter search split (train800 -> val200): add `,split=val`; shallow VPT: `,shallow`.

The recipe is `vpt_vtab.py`'s (SGD momentum 0.9, base lr 1.0 scaled by batch/256, wd 1e-4, 10
warmup epochs of 100, cosine, prompt dropout 0.1 for deep and 0 for shallow, 224 px inputs with
ImageNet mean/std, no augmentation), one point of VPT's per-task lr x wd grid (`tune_vtab.py`).
The backbone runs in eval mode, so no stochastic depth.

VPT's Swin-B VTAB-1k results (paper Table 4 / appendix) are not quoted here: they could not be
checked against the paper in this environment.
"""
import ml_collections

from configs import common, vpt_vtab


def get_config(arg=None):
  arg = common.parse_arg(arg, task="", variant="B", num_prompts=10, shallow=False, split="test",
                         runlocal=False)
  config = vpt_vtab.get_config(f"task={arg.task},num_prompts={arg.num_prompts},"
                               f"shallow={arg.shallow},split={arg.split}")
  config.model_name = "prompts.vpt_swin"
  config.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, num_prompts=arg.num_prompts, deep=not arg.shallow,
      prompt_dropout=0.0 if arg.shallow else 0.1))
  if not arg.task:  # vpt_vtab set up the embedded demo; a Swin that tiles 32 px: 16 -> 8 -> 4 -> 2
    config.model.update(variant="mu", patch_size=2, window_size=2)
    config.num_epochs = 6
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
