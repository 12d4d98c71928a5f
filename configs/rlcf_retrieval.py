"""RLCF test-time adaptation for zero-shot image-text retrieval (Zhao et al., ICLR 2024, §4.2);
see jaxprompt/prompts/rlcf_retrieval.py and jaxprompt/evaluators/tta_retrieval.py.

  # Demo (no downloads): a tiny policy CLIP (ViT-mu/8) and a different tiny reward CLIP (RN-mu),
  # both pre-fit on the generated captioned shapes' class prompts, then RLCF retrieval on 100 test
  # images (2-3 captions each) in both directions; prints zero-shot vs RLCF R@1/5/10:
  python -m jaxprompt.main --config configs/rlcf_retrieval.py --workdir /tmp/rlcf_ret
  # COCO 5k / Flickr30K 1k Karpathy test, CLIP ViT-B/16 policy, ViT-L/14 reward (OpenAI weights,
  # LAVIS's annotation jsons, e.g. coco2014/coco_karpathy_test.json next to val2014/):
  python -m jaxprompt.main --config configs/rlcf_retrieval.py:dataset=coco,direction=i2t \
      --config.dataset_kwargs.root=/data/coco2014 \
      --config.model_init.model=ViT-B-16.pt --config.model_init.reward_0=ViT-L-14.pt \
      --config.model.vocab_path=bpe_simple_vocab_16e6.txt.gz --workdir /tmp/rlcf_coco_i2t

Arguments: dataset (coco | flickr; default: the demo), direction (i2t | t2i; the demo runs both),
vocab (the CLIP vocabulary for the real runs' tokenisation, default bpe_simple_vocab_16e6.txt.gz),
runlocal.

The settings are mzhaoshuai/RLCF `retrieval/scripts/tta_{coco,flickr}_ret.sh` (case 01): 8 steps,
AdamW lr 1e-6 (eps 1e-6), weight decay 5e-4, top-K 20 (COCO i2t), 16 (Flickr30K i2t), 12 (t2i);
images resized (shorter side, bicubic) to 224 and centre-cropped (LAVIS `clip_image_eval`), CLIP
mean/std; captions as LAVIS `blip_caption` cleans them (input_pipeline/karpathy.py). The real
runs are `mode='eval'`: nothing trains except inside each query's episode. One query batch
adapts eval_batch_size (8) copies of the tuned tower at once.

Expected results (RLCF project page, policy CLIP-ViT-B/16, R@1; the paper's retrieval table):

  |                | COCO t2i | COCO i2t | Flickr t2i | Flickr i2t |
  | CLIP-ViT-B/16  |   33.0   |   52.5   |    62.2    |    81.2    |
  | CLIP-ViT-L/14  |   36.1   |   56.2   |    64.6    |    85.3    |
  | RLCF           |   37.3   |   59.1   |    67.1    |    87.3    |
  | RLCF-S         |   38.3   |   60.8   |    68.5    |    88.3    |
  | RLCF-S-M       |   38.4   |   60.8   |    68.5    |    88.1    |

  RLCF R@5 / R@10: COCO t2i 62.7 / 71.5, i2t 80.1 / 86.9; Flickr t2i 89.1 / 93.2, i2t 97.2 / 98.8.
  These need OpenAI's weights and the datasets, which cannot be fetched here: not checked.
  RLCF-S: --config.model.reward_variants="('ViT-L/14@336px','RN50x64','ViT-L/14')" with the
  model_init parts reward_0..2 (weights 0.56 / 0.17 / 0.28). RLCF-S-M's momentum buffer is not
  implemented for retrieval.

The demo pre-fits two random-init tiny CLIPs on the 10 class prompts (496 steps, train accuracy
0.997) and adapts at lr 1e-4 (1e-6 leaves a tiny CLIP's scores unchanged); it shows the pipeline
end to end, not the paper's gains: its reward CLIP is no better than its policy. Measured (seed 42,
100 test images, 250 captions, about 3 minutes on 2 busy CPU cores), R@1 / R@5 / R@10:

  i2t  zero-shot 8.0 / 21.0 / 29.0   RLCF 8.0 / 14.0 / 23.0
  t2i  zero-shot 1.2 /  9.6 / 20.0   RLCF 2.8 / 12.0 / 21.2
"""
import ml_collections

from configs import common
from input_pipeline import embedded_captions, embedded_clip
from jaxprompt.prompts import rlcf_retrieval

DATASETS = {"coco": "coco_karpathy", "flickr": "flickr30k_karpathy"}
MAX_CAPTIONS = {"coco": 7, "flickr": 5}  # most captions of a Karpathy test image
TAIL = "value_range(0, 1)|normalize('clip')"


def retrieval_eval(direction: str, top_k: int, **settings) -> dict:
  return dict(type="tta_retrieval", split="test", direction=direction, top_k=top_k, **settings)


def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="", direction="", vocab="bpe_simple_vocab_16e6.txt.gz",
                         runlocal=False)
  if arg.dataset and arg.dataset not in DATASETS:
    raise ValueError(f"dataset={arg.dataset!r}: expected one of {sorted(DATASETS)} (or none: the "
                     "demo).")
  if arg.direction and arg.direction not in rlcf_retrieval.DIRECTIONS:
    raise ValueError(f"direction={arg.direction!r}: expected one of "
                     f"{rlcf_retrieval.DIRECTIONS}.")
  if arg.dataset and not arg.direction:
    raise ValueError("The real runs adapt one direction each (as the original): add "
                     "direction=i2t or direction=t2i.")
  if arg.dataset:
    config = common.tta_base(
        model_name="prompts.rlcf", model_init_parts=("model", "reward_0", "reward_1", "reward_2"),
        model=dict(variant="ViT-B/16", vocab_path=arg.vocab, ctx_init="a photo of a",
                   reward_variants=("ViT-L/14",)), batch_size=8)
    config.dataset = DATASETS[arg.dataset]
    config.dataset_kwargs = ml_collections.ConfigDict(dict(splits=("test",)))
    config.pp.eval = (f"resize_shorter_side(224, method='bicubic')|center_crop(224)|{TAIL}|"
                      f"clip_tokenize('{arg.vocab}', key='captions', "
                      f"max_captions={MAX_CAPTIONS[arg.dataset]})")
    config.evals = ml_collections.ConfigDict({arg.direction: retrieval_eval(
        arg.direction, rlcf_retrieval.TOP_K[arg.dataset, arg.direction])})
  else:  # the demo: pre-fit both tiny CLIPs on the class prompts, then adapt
    config = common.base_config(
        model_name="prompts.rlcf", model_init_parts=("model", "reward_0"),
        model=dict(variant="ViT-B/16", vocab_path="", ctx_init="a photo of a",
                   reward_variants=("ViT-L/14",)))
    config.train_split = "train"
    config.optim = common.optimizer("adamw", lr=1e-3, weight_decay=0.0)
    config.batch_size = 32
    config.log_every_steps = 100
    vocab = embedded_clip.byte_vocabulary()
    config.dataset = embedded_captions.NAME
    config.dataset_kwargs = ml_collections.ConfigDict(dict(limit=100))
    config.model.update(variant="ViT-mu/8", vocab_path=vocab, reward_variants=("RN-mu",))
    config.num_epochs = 8
    config.eval_batch_size = 50
    config.pp = ml_collections.ConfigDict(dict(
        image_size=32, train=common.vtab_pp(32, "clip"),
        eval=f"{common.vtab_pp(32, 'clip')}|clip_tokenize('{vocab}', key='captions', "
             f"max_captions={embedded_captions.MAX_CAPTIONS})"))
    directions = (arg.direction,) if arg.direction else rlcf_retrieval.DIRECTIONS
    config.evals = ml_collections.ConfigDict({
        d: retrieval_eval(d, rlcf_retrieval.TOP_K["coco", d], lr=1e-4) for d in directions})
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
