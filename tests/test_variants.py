"""`config.variants`: one config file run once per variant, with the command line's overrides,
and the runs' metrics in one table (jaxprompt/variants.py)."""
import json
import textwrap

import pytest

from jaxprompt import config_checks, main, variants
from conftest import tiny_config  # pylint: disable=import-error

CONFIG_FILE = textwrap.dedent('''
    from configs import common, vpt_vtab

    def get_config(arg=None):
      arg = common.parse_arg(arg, lr=0.1, compare=False)
      config = vpt_vtab.get_config("runlocal")
      config.optim.lr = arg.lr
      if arg.compare:
        config.variants = ("lr=0.05", "lr=0.5")
      return config
    ''')


def test_each_variant_runs_with_the_command_line_overrides(tmp_path, capsys):
  path = tmp_path / "two_lrs.py"
  path.write_text(CONFIG_FILE)
  argument = f"{path}:compare"
  config = main.file_config(argument)
  config.total_steps = 3  # as --config.total_steps=3 would
  config.optim.weight_decay = 0.0  # as --config.optim.weight_decay=0
  assert variants.overrides(config, main.file_config(argument)) == {
      "total_steps": 3, "optim.weight_decay": 0.0}
  finals = variants.run(argument, config, str(tmp_path / "work"), main.file_config)
  assert list(finals) == ["lr=0.05", "lr=0.5"]
  for variant, lr in (("lr=0.05", 0.05), ("lr=0.5", 0.5)):
    record = json.loads((tmp_path / "work" / variant / "config.json").read_text())
    assert record["optim.lr"] == lr and record["total_steps"] == 3
    assert record["optim.weight_decay"] == 0.0
    assert record["variants"] == [] and finals[variant]["step"] == 3
  assert finals["lr=0.05"]["test/accuracy"] != finals["lr=0.5"]["test/accuracy"] or \
      finals["lr=0.05"]["test/loss"] != finals["lr=0.5"]["test/loss"]
  saved = json.loads((tmp_path / "work" / "variants.json").read_text())
  assert saved["lr=0.5"]["test/accuracy"] == finals["lr=0.5"]["test/accuracy"]
  lines = variants.table(finals).splitlines()
  assert lines[0].split(" | ")[1:] == ["test/accuracy"]
  mean = (finals["lr=0.05"]["test/accuracy"] + finals["lr=0.5"]["test/accuracy"]) / 2
  assert lines[-1].split(" | ") == ["mean   ", f"{mean:.4f}".rjust(len("test/accuracy"))]
  assert "lr=0.05 | " in capsys.readouterr().err + "\n".join(lines)


def test_variant_arguments_follow_the_command_lines_and_bad_variants_are_refused():
  assert variants.variant_argument("configs/x.py", "mask=full") == "configs/x.py:mask=full"
  assert variants.variant_argument("configs/x.py:data=/d", "mask=full") == \
      "configs/x.py:data=/d,mask=full"
  with pytest.raises(config_checks.ConfigError, match="config.variants"):
    config_checks.check_spine(tiny_config(variants=("mask full",)))


def test_the_configs_variants_resolve():
  """The SDPT demos (COCO, ODinW, LVIS) compare SDPT with two baselines; ODinW suites run each
  dataset (and seed)."""
  expected_methods = {"mask=release": "prompts.sdpt", "mask=full": "prompts.glip_finetune",
                      "mask=language_prompt": "prompts.glip_prompt_tuning"}
  for argument in ("configs/sdpt_coco.py", "configs/sdpt_odinw.py", "configs/sdpt_lvis.py"):
    config = main.file_config(argument)
    assert tuple(config.variants) == tuple(expected_methods)
    for variant, model_name in expected_methods.items():
      variant_config = main.file_config(variants.variant_argument(argument, variant))
      config_checks.check_spine(variant_config)
      assert variant_config.model_name == model_name
  assert not main.file_config("configs/sdpt_coco.py:mask=paper").variants
  suite = main.file_config("configs/glip_odinw.py:data=/d,suite=13,shots=3").variants
  assert len(suite) == 13 * 3
  variant_config = main.file_config(variants.variant_argument(
      "configs/sdpt_odinw.py:data=/d,suite=13,shots=3", suite[-1]))
  config_checks.check_spine(variant_config)
  assert variant_config.dataset == f"odinw/{suite[-1].split(',')[0].split('=')[1]}"
  assert variant_config.dataset_kwargs.seed == 300 and variant_config.dataset_kwargs.version == 13
  assert len(main.file_config("configs/sdpt_odinw.py:data=/d,suite=35").variants) == 35
  with pytest.raises(ValueError, match="suite='14'"):
    main.file_config("configs/glip_odinw.py:data=/d,suite=14")
