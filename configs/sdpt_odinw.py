"""SDPT (and its baselines) on ODinW: configs/glip_odinw.py's data, few-shot protocol, evaluation
and schedule with SDPT's trainable sets; see jaxprompt/prompts/sdpt.py and configs/sdpt_coco.py.

  # Demo (no downloads): the embedded scenes with ODinW-style caption prompts, the tiny GLIP,
  # 8 prototypes per fusion layer, the release's set:
  python -m jaxprompt.main --config configs/sdpt_odinw.py
  # Aquarium, 3-shot seed 30, from the released GLIP-T; prototypes alone:
  python -m jaxprompt.main \
      --config configs/sdpt_odinw.py:data=/data/DATASET,task=Aquarium,shots=3,seed=30,mask=paper \
      --config.model_init.model=glip_tiny_model_o365_goldg.pth \
      --config.dataset_kwargs.vocab=bert-base-uncased/vocab.txt

Arguments: those of configs/glip_odinw.py (data, task, version, shots, seed, size, mode,
runlocal), plus mask (release, paper, full, linear_probe, bitfit, language_prompt; see
configs/sdpt_coco.py), tokens (700) and lr (1e-4, GLIP's ODinW fine-tuning lr; the SDPT release
publishes no ODinW recipe, so this keeps GLIP's). ODinW-13 / ODinW-35 averages are over one run of
this config per dataset (`input_pipeline.odinw.ODINW_13`, `ODINW_35`), few-shot over the seeds
3/30/300.
"""
from configs import common, glip_odinw, sdpt_coco


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", task="Aquarium", version=0, shots=0, seed=3, size="T",
                         mode="train", mask="release", tokens=700, lr=1e-4, runlocal=False)
  demo = not arg.data
  config = glip_odinw.get_config(
      ",".join(f"{k}={arg[k]}" for k in ("task", "version", "shots", "seed", "size", "mode"))
      + ("" if demo else f",data={arg.data}"))
  config.unlock()
  sdpt_coco.apply_mask(config, arg.mask, lr=1e-3 if demo else arg.lr, weight_decay=0.05,
                       tokens=8 if demo else arg.tokens)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
