"""GLIP on ODinW (Object Detection in the Wild, GLIP §4.3): zero-shot evaluation or full-model
fine-tuning on one of the 35 datasets, with GLIP's category overrides and caption prompts; see
jaxprompt/prompts/glip_finetune.py and input_pipeline/odinw.py.

  # Demo (no downloads): the embedded detection scenes with an ODinW-style caption prompt per class
  # ("there is a" + name + "shape"), a tiny random-init GLIP, box AP on the test split:
  python -m jaxprompt.main --config configs/glip_odinw.py
  # Aquarium, 3-shot seed 30, from the released GLIP-T (GLIP's DATASET folder holds odinw/):
  python -m jaxprompt.main \
      --config configs/glip_odinw.py:data=/data/DATASET,task=Aquarium,shots=3,seed=30 \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt
  # Zero-shot: add mode=eval (the yaml's test split, 'val' or 'minival').

Arguments: data (GLIP's DATASET folder; default: the demo), task (an ODinW dataset name, e.g.
Aquarium, pothole, PascalVOC; `input_pipeline.odinw.ODINW_DATASETS`), version (13 or 35: which
yaml's names and prompts; default 13 when the dataset is in ODinW-13), shots (0 = all data, or
1/3/5/10 with GLIP's prepared few-shot files), seed (3/30/300), suite (13 or 35: one run per
dataset of ODinW-13 / ODinW-35, and per seed few-shot, then their AP table and mean), size (T or
L), mode, runlocal.

Recipe (microsoft/GLIP README "ODinW / Custom Dataset Fine-Tuning", Full Model Fine-Tuning, with
configs/pretrain/glip_Swin_T_O365_GoldG.yaml and the task yaml): AdamW, base lr 1e-4, language lr
1e-5, weight decay 0.05, batch 4, no warmup (the task yamls' WARMUP_ITERS 0), biases at lr x2 and
no decay, gradient clipping 1.0, FREEZE_CONV_BODY_AT 2 (patch embedding and the first Swin stage
frozen), caption prompts and category overrides on, DISABLE_SHUFFLE; epochs and data copies from
--custom_shot_and_epoch_and_general_copy ("1_200_8", "3_200_4", "5_200_2", "10_200_1", "0_200_1":
200 epochs over the few-shot set copied 8/4/2/1/1 times); SOLVER.USE_AUTOSTEP with
STEP_PATIENCE 3: the lr drops x0.1 when the validation AP has not improved for 3 evaluations
(`optim.plateau`), evaluated once per epoch, and AUTO_TERMINATE_PATIENCE 8 ends the run after 8
evaluations without a better AP (`early_stop_patience`; on all data 2 and 4, as the README says);
the best validation checkpoint is evaluated on the test split (--evaluate_only_best_on_test:
`keep_best` + `eval_at_best`).

Expected (GLIP README Model Zoo): zero-shot ODinW-13 average AP 42.7 for the released GLIP-T
(O365, GoldG, CC3M, SBU), 51.2 for GLIP-L; the average over datasets is the mean of the suite=13
runs. Not measured here (no weights or data).

Padding is configs/glip_coco.py's: GLIP's multiple of 32 of each image's own size in evaluation
(each image padded as if alone in its batch; the README's ODinW commands evaluate with
TEST.IMS_PER_BATCH 4, so on fewer than four GPUs the original pads an image to its largest
batch-mate's padded size), the fixed canvas in training (the deviation there).
"""
import ml_collections

from configs import common, glip_coco
from input_pipeline import embedded_detection, odinw
from jaxprompt.prompts import glip_finetune

COPIES = {0: 1, 1: 8, 3: 4, 5: 2, 10: 1}  # --custom_shot_and_epoch_and_general_copy
DEMO_PROMPT = dict(prefix="there is a ", suffix=" shape")  # ODinW's CAPTION_PROMPT form


def suite_variants(suite: str, shots: int) -> tuple[str, ...]:
  """The runs whose mean is an ODinW-13 / ODinW-35 result (jaxprompt/variants.py): one per dataset
  with that suite's names and prompts, and per seed (3/30/300) few-shot, as GLIP reports it."""
  tasks = {"13": odinw.ODINW_13, "35": odinw.ODINW_35}.get(suite)
  if tasks is None:
    raise ValueError(f"suite={suite!r}: expected 13 or 35 (ODinW-13, ODinW-35), or '' for one task.")
  seeds = odinw.SEEDS if shots else (None,)
  return tuple(f"task={task},version={suite}" + (f",seed={seed}" if seed else "")
               for task in tasks for seed in seeds)


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", task="Aquarium", version=0, shots=0, seed=3, suite="",
                         size="T", mode="train", runlocal=False)
  demo = not arg.data
  config = glip_coco.get_config(f"size={arg.size},mode={arg.mode},batch=4,epochs=200"
                                + ("" if demo else f",data={arg.data}"))
  config.unlock()
  glip_coco.glip_recipe(config, lr=1e-4, lang_lr=1e-5, weight_decay=0.05)
  config.trainable_params = glip_finetune.freeze_regex(frozen_stages=2)
  config.model.frozen_stages = 2  # ... and those stages run in eval mode, as in the original
  # GLIP's README: STEP_PATIENCE 3 and AUTO_TERMINATE_PATIENCE 8 few-shot, 2 and 4 on all data.
  step_patience, stop_patience = (2, 4) if arg.shots == 0 and not demo else (3, 8)
  plateau = dict(metric="val/AP", mode="max", factor=0.1, patience=step_patience, min_lr=0.0)
  if demo:
    config.dataset_kwargs.caption_prompts = tuple(
        dict(DEMO_PROMPT, name=name) for name in embedded_detection.CLASS_NAMES)
    config.batch_size, config.total_steps = 8, 300
    glip_coco.glip_recipe(config, lr=1e-3, lang_lr=1e-3, weight_decay=0.05)
    config.optim.warmup_steps, config.optim.warmup_init = 30, 1e-5
    test_split, every = "test", dict(every_steps=50)
  else:
    config.dataset = f"odinw/{arg.task}"
    config.dataset_kwargs = ml_collections.ConfigDict(dict(
        data_dir=arg.data, vocab="", shots=arg.shots, seed=arg.seed,
        **({"version": arg.version} if arg.version else {})))
    config.num_epochs = 200 * COPIES[arg.shots]
    config.optim.warmup_steps, config.optim.warmup_init = 0, 0.0
    test_split, every = odinw.ODINW_DATASETS[arg.task].eval_split, dict(every_epochs=1)
  # AUTOSTEP decides the lr steps: a constant lr ('multistep' without a milestone in the run),
  # lowered by the plateau rule on the validation AP.
  config.optim.decay, config.optim.milestones = "multistep", ()
  config.optim.plateau = ml_collections.ConfigDict(plateau)
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(type="detection", split="val", **every),
      test=dict(type="detection", split=test_split)))
  if arg.mode == "train":
    config.keep_best, config.eval_at_best = ("val/AP", "max"), ("test",)
    config.early_stop_patience = stop_patience
  if arg.suite:
    config.variants = suite_variants(arg.suite, arg.shots)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
