"""Every SA2VP config resolves: for each VTAB-1k task, FGVC dataset and HTA dataset the config
builds, its data source opens (TFDS mock data or generated folders) and its preprocessing gives
224 px batches, and its model settings are accepted by the model."""
import importlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import sa2vp_fgvc, sa2vp_hta, sa2vp_swin_vtab, sa2vp_vtab, vpt_swin_vtab, vpt_vtab
from input_pipeline import hta, pipeline
from jaxprompt import train
# Fixtures and writers of the pipeline tests (tiny TFDS metadata, generated FGVC/GTSRB folders).
from test_fgvc_hta import _write_fgvc, _write_gtsrb, _write_vtab_task, hta_metadata_dir  # noqa: F401  pylint: disable=import-error
from test_input_pipeline import DERIVED, _objects_as_dataset, metadata_dir  # noqa: F401  pylint: disable=import-error

FGVC_IMAGE_ROOTS = {"cub": ("CUB_200_2011", "images"), "nabirds": ("nabirds", "images"),
                    "flowers": ("OxfordFlower", ""), "dogs": ("dogs", "Images"),
                    "cars": ("cars", "")}


def first_batch(config, eval_only: bool):
  data = train.build_data(config)
  eval_splits = [entry.split for entry in config.evals.values()]
  for split in (config.train_split, *eval_splits):
    assert data.source.num_examples(split) > 0
  if eval_only:  # mock data for splits selected by example id cannot be iterated
    dataset = pipeline.make_eval_dataset(data.source, eval_splits[0], data.eval_pp,
                                         global_batch_size=2)
  else:
    dataset = pipeline.make_train_dataset(data.source, config.train_split, data.train_pp,
                                          global_batch_size=2, seed=0)
  return data.source, next(dataset.as_numpy_iterator())


def check(config, eval_only: bool = False):
  source, batch = first_batch(config, eval_only)
  assert batch["image"].shape == (2, 224, 224, 3) and batch["image"].dtype == np.float32
  if config.pp.train.endswith("normalize('inception')"):  # SA2VP's: pixels in [-1, 1]
    assert -1.0 - 1e-6 <= batch["image"].min() and batch["image"].max() <= 1.0 + 1e-6
  assert ((0 <= batch["label"]) & (batch["label"] < source.num_classes)).all()
  module = importlib.import_module(f"jaxprompt.{config.model_name}")
  module.Model(num_classes=source.num_classes, **config.model)  # settings the model accepts


@pytest.mark.parametrize("task", sa2vp_vtab.NATURAL + sa2vp_vtab.SPECIALIZED
                         + sa2vp_vtab.STRUCTURED)
@pytest.mark.parametrize("config_module", [sa2vp_vtab, sa2vp_swin_vtab, vpt_vtab, vpt_swin_vtab],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_vtab_config_resolves(config_module, task, metadata_dir):  # noqa: F811
  config = config_module.get_config(f"task={task}")
  config.data_dir = metadata_dir
  kwargs = {"as_dataset_fn": _objects_as_dataset(DERIVED[task][0])} if task in DERIVED else {}
  with tfds.testing.mock_data(num_examples=2, data_dir=metadata_dir, **kwargs):
    check(config)


def test_sa2vp_vtab_config_on_the_ssf_file_lists(tmp_path):
  _write_vtab_task(tmp_path / "dtd", {"train800": 4, "val200": 2, "train800val200": 6, "test": 3},
                   num_classes=47)
  config = sa2vp_vtab.get_config("task=dtd,files")
  config.data_dir = str(tmp_path)
  assert config.dataset == "vtab1k_files/dtd"
  check(config)


@pytest.mark.parametrize("dataset", sorted(sa2vp_fgvc.DATASET_SETTINGS))
@pytest.mark.parametrize("mode", sorted(sa2vp_fgvc.MODES))
def test_sa2vp_fgvc_config_resolves(dataset, mode, tmp_path):
  folder, image_root = FGVC_IMAGE_ROOTS[dataset]
  _write_fgvc(tmp_path / folder, image_root=image_root)
  config = sa2vp_fgvc.get_config(f"dataset={dataset},mode={mode}")
  config.data_dir = str(tmp_path)
  config.dataset_kwargs.check_num_classes = False
  check(config)


@pytest.mark.parametrize("dataset", hta.HTA_DATASETS)
def test_sa2vp_hta_config_resolves(dataset, tmp_path, hta_metadata_dir):  # noqa: F811
  config = sa2vp_hta.get_config(f"dataset={dataset}")
  assert (config.model.inter_dim, config.model.inter_weight) == (64, 0.1)
  if dataset in hta.HTA_FGVC:
    folder, image_root = FGVC_IMAGE_ROOTS[dataset]
    _write_fgvc(tmp_path / folder, image_root=image_root)
    config.data_dir = str(tmp_path)
    config.dataset_kwargs.check_num_classes = False
    check(config)
  elif dataset == "gtsrb":
    _write_gtsrb(tmp_path / "gtsrb")
    config.data_dir = str(tmp_path)
    config.dataset_kwargs.check_num_classes = False
    check(config)
  else:
    config.data_dir = hta_metadata_dir
    with tfds.testing.mock_data(num_examples=2, data_dir=hta_metadata_dir):
      check(config, eval_only=True)


@pytest.mark.parametrize("module", [sa2vp_vtab, sa2vp_fgvc, sa2vp_hta])
def test_unknown_dataset_names_are_errors(module):
  key = "task" if module is sa2vp_vtab else "dataset"
  with pytest.raises(ValueError, match="no_such"):
    module.get_config(f"{key}=no_such")
