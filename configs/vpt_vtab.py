"""VPT (Jia et al., ECCV 2022) on VTAB-1k, or on the embedded demo data when no task is given.

  # Demo (embedded generated data, tiny random ViT; under a minute on 2 CPU cores):
  python -m jaxprompt.main --config configs/vpt_vtab.py
  # A VTAB-1k task with ImageNet-21k ViT-B/16 (the paper's protocol: train on train800val200,
  # report test at the last epoch):
  python -m jaxprompt.main --config configs/vpt_vtab.py:task=dtd,num_prompts=10 \
      --config.data_dir=$TFDS_DATA_DIR --config.model_init=imagenet21k_ViT-B_16.npz \
      --workdir workdirs/vpt_dtd
  # Hyper-parameter search split (train800 -> val200): add `,split=val`; shallow VPT: `,shallow`.

Paper numbers (VPT-deep, ViT-B/16 ImageNet-21k, VTAB-1k mean top-1, Table 1): Natural 78.48,
Specialized 82.43, Structured 54.98. VPT searched lr x wd per task (`tune_vtab.py`) and the number
of prompts per task (appendix); the defaults below are one point of that grid: base lr 1.0 at batch
256-scaling (0.25 at batch 64), wd 1e-4, prompt dropout 0.1, SGD momentum 0.9, 100 epochs with 10
warmup epochs, cosine.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, task="", variant="B/16", num_prompts=10, shallow=False,
                         split="test", runlocal=False)
  config = common.base_config(model_name="prompts.vpt", model=dict(
      variant=arg.variant, num_prompts=arg.num_prompts, deep=not arg.shallow,
      prompt_dropout=0.0 if arg.shallow else 0.1))
  pp = common.vtab_pp(224, "imagenet")
  config.pp = ml_collections.ConfigDict(dict(image_size=224, train=pp, eval=pp))
  config.batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 100
  config.optim = common.optimizer("sgd", lr=0.25, weight_decay=1e-4, momentum=0.9,
                                  no_weight_decay="head/bias", warmup_epochs=10)

  if arg.task:
    config.dataset = f"vtab/{arg.task}"
    config.train_split, splits = (
        ("train800", ("val200",)) if arg.split == "val" else ("train800val200", ("test",)))
    config.evals = common.evals(*splits)
  else:
    common.use_embedded_demo(config, norm="imagenet")
    config.optim.lr = 0.5
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
