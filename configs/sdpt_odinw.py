"""SDPT (and its baselines) on ODinW: configs/glip_odinw.py's data, few-shot protocol, evaluation
and schedule with SDPT's trainable sets; see jaxprompt/prompts/sdpt.py and configs/sdpt_coco.py.

  # Demo (no downloads): the embedded scenes with ODinW-style caption prompts, the tiny GLIP;
  # SDPT (8 prototypes per fusion layer, the release's set), full fine-tuning and GLIP's language
  # prompt tuning side by side (configs/sdpt_coco.py's DEMO_VARIANTS):
  python -m jaxprompt.main --config configs/sdpt_odinw.py
  # ODinW-13, 3-shot, all 13 datasets x seeds 3/30/300, then the table and the averaged AP:
  python -m jaxprompt.main --config configs/sdpt_odinw.py:data=/data/DATASET,suite=13,shots=3 \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt
  # Aquarium, 3-shot seed 30, from the released GLIP-T; prototypes alone:
  python -m jaxprompt.main \
      --config configs/sdpt_odinw.py:data=/data/DATASET,task=Aquarium,shots=3,seed=30,mask=paper \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt

Arguments: those of configs/glip_odinw.py (data, task, version, shots, seed, suite, size, mode,
runlocal), plus mask (release, paper, full, linear_probe, bitfit, language_prompt; see
configs/sdpt_coco.py; default release), tokens (0: the method's default, SDPT's 700
prototypes per fusion layer, VPT's 100 prompts) and lr (1e-4, GLIP's ODinW fine-tuning lr;
the SDPT release publishes no ODinW recipe, so this keeps GLIP's). ODinW-13 / ODinW-35 averages are
the mean of suite=13 / suite=35's runs, one per dataset (`input_pipeline.odinw.ODINW_13`,
`ODINW_35`), few-shot also one per seed 3/30/300.
"""
from configs import common, glip_odinw, sdpt_coco


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", task="Aquarium", version=0, shots=0, seed=3, suite="",
                         size="T", mode="train", mask="", tokens=0, lr=1e-4, runlocal=False)
  demo = not arg.data
  config = glip_odinw.get_config(
      ",".join(f"{k}={arg[k]}" for k in ("task", "version", "shots", "seed", "suite", "size",
                                         "mode")) + ("" if demo else f",data={arg.data}"))
  config.unlock()
  sdpt_coco.apply_mask(config, arg.mask or "release", lr=1e-3 if demo else arg.lr,
                       weight_decay=0.05, tokens=8 if demo else arg.tokens)
  if demo and not arg.mask:  # SDPT and two baselines side by side (jaxprompt/variants.py)
    config.variants = sdpt_coco.DEMO_VARIANTS
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
