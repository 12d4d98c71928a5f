"""SA2VP (Pei et al., AAAI 2024) on FGVC (CUB, NABirds, Flowers, Dogs, Cars) with ViT-B/16.

  python -m jaxprompt.main --config configs/sa2vp_fgvc.py:dataset=cub \
      --config.data_dir=/data/fgvc --config.model_init=imagenet21k_ViT-B_16.npz \
      --workdir workdirs/sa2vp_cub
  # ,mode=best_val is the seed's protocol: train on train.json, evaluate val.json every epoch, keep
  # the best-on-val checkpoint and report test.json with it ('at_best/test/accuracy');
  # ,mode=trainval_test trains on train.json and reports test.json at the last epoch;
  # the default mode=train_val trains on train.json and evaluates val.json (model selection).
  # No argument: the embedded demo (as configs/sa2vp_vtab.py).

`data_dir` holds SA2VP's dataset folders (CUB_200_2011, nabirds, OxfordFlower, dogs, cars), each
with VPT's train/val/test json files (input_pipeline/fgvc.py). The recipe is the seed's (README,
`Train_*.sh`): AdamW lr 1e-3, weight decay 1e-4 (not on biases and LayerNorm params), 10 warmup
epochs, cosine to 1e-7 at 100 epochs, batch 64; FGVC transforms (resize 256, random crop 224 and
flip for training; center crop for evaluation) with mean = std = 0.5. Per dataset (inter-dim,
inter-weight): CUB 16/0.1, NABirds 32/0.1, Flowers 8/0.1, Dogs 32/0.1, Cars 64/1.5. The seed
selects the best epoch on val and reports its test accuracy: mode=best_val (`keep_best`,
`eval_at_best`); the other modes report the last epoch.
The released code keeps two deep prompt maps for every dataset although a comment says Cars used
one; pass --config.model.deep_prompt_layers='(4,)' to try the latter.
"""
from configs import common
from configs import sa2vp_vtab

# dataset -> (inter_dim, inter_weight), the seed's README table.
DATASET_SETTINGS = {"cub": (16, 0.1), "nabirds": (32, 0.1), "flowers": (8, 0.1),
                    "dogs": (32, 0.1), "cars": (64, 1.5)}
MODES = {"train_val": ("train", ("val",)), "trainval_test": ("train", ("test",)),
         "best_val": ("train", ("val", "test"))}


def apply_mode(config, mode: str) -> None:
  """Splits and evaluators of `mode` (see the module docstring)."""
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; valid: {sorted(MODES)}.")
  config.train_split, splits = MODES[mode]
  config.evals = common.evals(*splits)
  if mode == "best_val":
    config.evals.val.every_epochs = 1
    config.keep_best = ("val/accuracy", "max")
    config.eval_at_best = ("test",)


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", mode="train_val", runlocal=False)
  config = sa2vp_vtab.sa2vp_vit_config(augment="fgvc")
  if arg.dataset:
    if arg.dataset not in DATASET_SETTINGS:
      raise ValueError(f"Unknown FGVC dataset {arg.dataset!r}; valid: {sorted(DATASET_SETTINGS)}.")
    config.model.inter_dim, config.model.inter_weight = DATASET_SETTINGS[arg.dataset]
    config.dataset = f"fgvc/{arg.dataset}"
    apply_mode(config, arg.mode)
  else:
    sa2vp_vtab.use_embedded_demo(config)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
