"""Sources whose splits are lists of (image file, label) read from annotation files.

Shared by FGVC (VPT's json files), the VTAB-1k txt lists and GTSRB (folders + a csv): each split
is a fixed list of paths and int labels, served with `folder.FolderSource`'s two stages (the path
is the raw image, read and decoded in `decode`), so hosts slice it like every other source.

Checked once when the source is built, so that a bad list fails before training starts: every
listed image exists (`base.DataNotFoundError` naming the first few and the file that lists them),
every label is in [0, num_classes) (`ValueError` naming the file, the image and the label), and,
for sources that decode with `folder.FolderSource.decode` (FGVC, VTAB-1k lists; not GTSRB's PPM
decoder), every image passes `folder.find_bad_images` (`ValueError` naming the bad files, or
dropped with `skip_bad_images=True`; see `folder.py`).
"""
from __future__ import annotations

import os

import numpy as np

from input_pipeline import base, folder


class FileListSource(folder.FolderSource):
  """Splits given as {split: (paths, labels)}; `listed_in[split]` names the file listing it."""

  def __init__(self, name: str, num_classes: int, files: dict[str, tuple[list[str], list[int]]],
               listed_in: dict[str, str], *, skip_bad_images: bool = False,
               check_images: bool = True):
    # Not FolderSource.__init__ (that one scans a folder tree): the lists are given here.
    self.name, self.num_classes, self.splits = name, num_classes, tuple(files)
    self._files = {}
    for split, (paths, labels) in files.items():
      labels = np.asarray(labels, np.int64)
      bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
      if bad.size:
        raise ValueError(f"Data source {name!r}: {listed_in[split]} gives {paths[bad[0]]} the "
                         f"label {labels[bad[0]]}; expected 0 <= label < {num_classes} "
                         f"({bad.size} bad labels in this file).")
      self._files[split] = (np.array(paths, dtype=object), labels.astype(np.int32))
    check_files_exist(name, files, listed_in)
    self.dropped_images: tuple[str, ...] = ()
    if skip_bad_images and not check_images:
      raise ValueError(f"Data source {name!r}: skip_bad_images=True needs check_images=True.")
    if check_images and type(self).decode is folder.FolderSource.decode:
      paths = [path for split in self.splits for path in self._files[split][0]]
      bad = folder.find_bad_images(paths)
      folder.report_bad_images(name, bad, len(set(paths)), skip=skip_bad_images,
                               where=" listed in " + ", ".join(sorted(set(listed_in.values()))))
      for split, (split_paths, labels) in self._files.items():
        keep = np.array([path not in bad for path in split_paths], bool)
        if bad and not keep.any():
          raise base.DataNotFoundError(f"Data source {name!r}: every image of split {split!r} "
                                       f"({listed_in[split]}) is bad.")
        self._files[split] = (split_paths[keep], labels[keep])
      self.dropped_images = tuple(bad)


def dataset_folder(name: str, root: str | None, data_dir: str | None, folder_name: str, *,
                   holds: str) -> str:
  """`root`, or else data_dir/folder_name; the folder must exist (it `holds` the data)."""
  if root is None:
    if data_dir is None:
      raise ValueError(f"Data source {name!r} needs root=<its folder> or data_dir=<the folder "
                       f"holding {folder_name}/>.")
    root = os.path.join(data_dir, folder_name)
  if not os.path.isdir(root):
    raise base.DataNotFoundError(f"Data source {name!r}: folder {root} does not exist; expected "
                                 f"{holds} there.")
  return root


def check_files_exist(name: str, files: dict[str, tuple[list[str], list[int]]],
                      listed_in: dict[str, str]) -> None:
  """DataNotFoundError naming the first missing images, if any listed image is not a file."""
  seen, missing = set(), []
  for split, (paths, _) in files.items():
    for path in paths:
      if path not in seen:
        seen.add(path)
        if not os.path.isfile(path):
          missing.append(f"{path} (listed in {listed_in[split]})")
  if missing:
    raise base.DataNotFoundError(
        f"Data source {name!r}: {len(missing)} listed image(s) do not exist, e.g. "
        + "; ".join(missing[:3]) + ".")
