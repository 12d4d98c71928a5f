"""Datasets by name: `get_source('vtab/cifar')`, `('folder', root=...)`, `('embedded/shapes')`.

One module per dataset family (`vtab.py`, `folder.py`, `embedded.py`), all implementing
`base.DataSource`; `preprocess.py` holds the per-example transforms and `pipeline.py` the batched
train/eval streams. The pipeline knows nothing about models.
"""
from __future__ import annotations

from input_pipeline.base import DataNotFoundError, DataSource
from input_pipeline.embedded import ShapesSource
from input_pipeline.folder import FolderSource
from input_pipeline.vtab import VTAB_TASKS, VtabSource

SOURCE_NAMES = (*(f"vtab/{task}" for task in VTAB_TASKS), "folder", "embedded/shapes")


def get_source(name: str, *, data_dir: str | None = None, **kwargs) -> DataSource:
  """The data source called `name` (one of `SOURCE_NAMES`).

  vtab/<task>: TFDS data prepared in `data_dir` (kwargs: tfds_version to override the version).
  folder: kwargs root=... holding root/<split>/<class_name>/*.{jpg,jpeg,png}.
  embedded/shapes: generated in memory, no kwargs.
  """
  if name.startswith("vtab/") and name in SOURCE_NAMES:
    return VtabSource(name.removeprefix("vtab/"), data_dir=data_dir, **kwargs)
  if name == "folder":
    if "root" not in kwargs:
      raise ValueError("Data source 'folder' needs root=... (root/<split>/<class_name>/*.jpg); "
                       f"got kwargs {sorted(kwargs)} and data_dir={data_dir!r}.")
    return FolderSource(**kwargs)
  if name == "embedded/shapes":
    return ShapesSource(**kwargs)
  raise ValueError(f"Unknown data source {name!r}; valid names: {', '.join(SOURCE_NAMES)}.")


__all__ = ["DataNotFoundError", "DataSource", "get_source", "SOURCE_NAMES"]
