"""VTAB-1k from the SSF/NOAH file lists (the image release SA2VP trains on), not from TFDS.

Follows SA2VP `datasets.py` (class `VTAB` and `build_dataset`): a task folder holds the images
and four lists, `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`, one line per
image, `<image path relative to the task folder> <int label>`, e.g.
`images/train800/000000.jpg 307`. The task folders are named like the `vtab/<task>` sources
(`vtab.VTAB_TASKS`: cifar, caltech101, ..., smallnorb_ele), and so are the class counts.

`get_source('vtab1k_files/cifar', root=<the task folder>)`, or data_dir=<the folder holding the
task folders> (SA2VP's `./data/vtab-1k`). The splits are the four lists, in their line order.
SA2VP's modes: `train_val` trains on train800 and evaluates on val200; `trainval_test` trains on
train800val200 and evaluates on test (the README's protocol: evaluate the final epoch); any
other mode (the shipped scripts' `testall`) evaluates on val200, a subset of the training set.

Unlike `vtab.py`, these splits are whatever the files list; nothing ties them to VPT's TFDS
regions, so results from the two sources need not match exactly.
Deviation: lines are split at the last run of whitespace (SA2VP splits at the first space), so
a path may contain spaces; blank lines are skipped and any other malformed line is an error.
"""
from __future__ import annotations

import os

from input_pipeline import base, file_list
from input_pipeline.vtab import VTAB_SPLITS, VTAB_TASKS


def read_list(path: str, name: str) -> tuple[list[str], list[int]]:
  """(relative image paths, labels) of one `<path> <label>` file, with clear errors."""
  if not os.path.isfile(path):
    raise base.DataNotFoundError(f"Data source {name!r}: split file {path} does not exist; "
                                 f"expected {', '.join(s + '.txt' for s in VTAB_SPLITS)} in the "
                                 "task folder (the SSF/NOAH VTAB-1k release).")
  paths, labels = [], []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.strip().rsplit(maxsplit=1)
      if len(fields) != 2 or not fields[1].isdigit():
        raise ValueError(f"Data source {name!r}: {path} line {line_number} is {line.strip()!r}; "
                         "expected '<relative image path> <int label>'.")
      paths.append(fields[0])
      labels.append(int(fields[1]))
  if not paths:
    raise ValueError(f"Data source {name!r}: split file {path} lists no images.")
  return paths, labels


class VtabFilesSource(file_list.FileListSource):
  """One VTAB-1k task from the SSF/NOAH file lists (see module docstring)."""

  def __init__(self, task_name: str, *, root: str | None = None, data_dir: str | None = None,
               **image_checks):  # skip_bad_images, check_images (file_list.FileListSource)
    if task_name not in VTAB_TASKS:
      raise ValueError(f"Unknown VTAB task {task_name!r}; valid: {', '.join(VTAB_TASKS)}.")
    name = f"vtab1k_files/{task_name}"
    self.root = root = file_list.dataset_folder(
        name, root, data_dir, task_name, holds="the images and the split .txt files")
    listed_in = {split: os.path.join(root, f"{split}.txt") for split in VTAB_SPLITS}
    files = {}
    for split, path in listed_in.items():
      paths, labels = read_list(path, name)
      files[split] = ([os.path.join(root, p) for p in paths], labels)
    super().__init__(name, VTAB_TASKS[task_name].num_classes, files, listed_in, **image_checks)
