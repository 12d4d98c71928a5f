"""SA2VP (Pei et al., AAAI 2024) on the HTA benchmark (DAM-VP's ten datasets) with ViT-B/16.

  python -m jaxprompt.main --config configs/sa2vp_hta.py:dataset=food101 \
      --config.data_dir=$TFDS_DATA_DIR --config.model_init=imagenet21k_ViT-B_16.npz
  # ,mode=train_val evaluates the val split instead of test. No argument: the embedded demo.

Datasets (input_pipeline/hta.py): cifar10, cifar100, dtd, food101, svhn through TFDS in
`data_dir`; cub, nabirds, dogs, flowers as the FGVC json sources (then data_dir holds SA2VP's
FGVC folders); gtsrb from its official folders (data_dir holds the `GTSRB` folder). The seed's HTA
settings: inter-dim 64, inter-weight 0.1, batch 64, and the FGVC recipe of
configs/sa2vp_fgvc.py (the seed leaves the HTA transform to the user; the FGVC one matches
DAM-VP's pipeline). Note the seed's CIFAR-10 quirk: it reports its held-out 20% of train ('val').
"""
from configs import common
from configs import sa2vp_fgvc
from configs import sa2vp_vtab
from input_pipeline import hta


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", mode="trainval_test", runlocal=False)
  config = sa2vp_vtab.sa2vp_vit_config(augment="fgvc")
  config.model.inter_dim, config.model.inter_weight = 64, 0.1
  if arg.dataset:
    if arg.dataset not in hta.HTA_DATASETS:
      raise ValueError(f"Unknown HTA dataset {arg.dataset!r}; valid: {list(hta.HTA_DATASETS)}.")
    config.dataset = f"hta/{arg.dataset}"
    sa2vp_fgvc.apply_mode(config, arg.mode)
  else:
    sa2vp_vtab.use_embedded_demo(config)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
