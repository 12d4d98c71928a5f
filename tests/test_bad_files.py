"""Bad and hostile input files: every reader refuses code-running pickles without running them, and
every weight/array file that cannot be read is one clear error naming the file and its format."""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from input_pipeline import multilabel_lt, safe_pickle
from jaxprompt import rpl_pipeline
from jaxprompt.models import clip, common, swin, vit


class TouchFile:
  """Unpickling this runs `touch <marker>` through os.system (posix.system)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class EvalPayload:
  """Unpickling this evaluates code that creates <marker> (builtins.eval)."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return eval, (f"open({self.marker!r}, 'w').close()",)


def random_bytes(path, size=4096, seed=0):
  path.write_bytes(np.random.default_rng(seed).bytes(size))
  return path


def truncate(path, fraction=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * fraction)])
  return path


# ------------------------------------------------------------------------------------------------
# class_freq.pkl (LMPT): a restricted unpickler.


@pytest.mark.parametrize("payload", [TouchFile, EvalPayload])
def test_class_freq_pickle_that_runs_code_is_refused_and_real_files_still_load(tmp_path, payload):
  marker = tmp_path / "pwned"
  # The payload is real: plain pickle.load runs it.
  pickle.loads(pickle.dumps(payload(marker)))
  assert marker.exists()
  marker.unlink()

  labels = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  evil = tmp_path / "class_freq.pkl"
  evil.write_bytes(pickle.dumps({"class_freq": np.array([1, 0, 2]), "x": payload(marker)}))
  refused = "posix.system" if payload is TouchFile else "builtins.eval"
  with pytest.raises(ValueError, match=re.escape(str(evil)) + ".*" + re.escape(refused)):
    multilabel_lt.read_class_freq(str(evil), labels, "multilabel/voc_lt")
  assert not marker.exists()

  # What DistributionBalancedLoss writes: a dict of int64 and float arrays, any protocol.
  real = {"gt_labels": [row.astype(np.int64) for row in labels],
          "class_freq": labels.sum(0).astype(np.int64),
          "neg_class_freq": (2 - labels.sum(0)).astype(np.int64),
          "condition_prob": np.eye(3, dtype=np.float64), "size": np.int64(2)}
  for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
    good = tmp_path / f"class_freq_{protocol}.pkl"
    good.write_bytes(pickle.dumps(real, protocol=protocol))
    np.testing.assert_array_equal(
        multilabel_lt.read_class_freq(str(good), labels, "multilabel/voc_lt"), [1, 0, 2])
    loaded = safe_pickle.load(good)
    np.testing.assert_array_equal(loaded["condition_prob"], np.eye(3))
    assert loaded["gt_labels"][1].dtype == np.int64 and loaded["size"] == 2


def test_safe_pickle_names_the_file_of_a_truncated_pickle(tmp_path):
  path = tmp_path / "class_freq.pkl"
  path.write_bytes(pickle.dumps({"class_freq": np.arange(5)})[:40])
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a readable pickle"):
    multilabel_lt.read_class_freq(str(path), np.ones((2, 5), np.float32), "multilabel/voc_lt")


# ------------------------------------------------------------------------------------------------
# RPL's .npz / .npy files: allow_pickle=False, object arrays refused by name.


def test_learned_contexts_refuses_an_object_array_npz(tmp_path):
  path = tmp_path / "contexts.npz"
  np.savez(path, ctx1=np.array([{"a": 1}], dtype=object), ctx2=np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*object array"):
    rpl_pipeline.learned_contexts(str(path))


def test_retrieve_refuses_object_array_embeddings_and_index(tmp_path):
  categories = tmp_path / "categories.txt"
  categories.write_text("cat cat_which_is_a_cat\ndog dog_which_is_a_dog\n")
  objects = tmp_path / "embeddings.npy"
  np.save(objects, np.array([None, None], dtype=object), allow_pickle=True)
  with pytest.raises(ValueError, match=re.escape(repr(str(objects))) + ".*object array"):
    rpl_pipeline.retrieve(str(objects), str(categories), "unused.npz", str(tmp_path / "out"))

  embeddings = tmp_path / "good.npy"
  np.save(embeddings, np.ones((2, 4), np.float32))
  index = tmp_path / "index.npz"
  np.savez(index, paths=np.array(["a.jpg", None], dtype=object), embeddings=np.ones((2, 4)))
  with pytest.raises(ValueError, match=re.escape(repr(str(index))) + ".*object array"):
    rpl_pipeline.retrieve(str(embeddings), str(categories), str(index), str(tmp_path / "out"))
  garbage = random_bytes(tmp_path / "garbage.npy")
  with pytest.raises(ValueError, match=re.escape(repr(str(garbage))) + ".*NumPy .npy"):
    rpl_pipeline.retrieve(str(garbage), str(categories), str(index), str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------------
# Weight files: truncated or random bytes -> one ValueError naming the path and the format.


def npz_file(path):
  np.savez(path, **{"embedding/kernel": np.ones((4, 4, 3, 8), np.float32),
                    "cls": np.zeros((1, 1, 8), np.float32)})
  return path


def test_bad_npz_names_the_path_and_format(tmp_path):
  init = {"cls": np.zeros((1, 1, 8), np.float32)}
  for bad in (truncate(npz_file(tmp_path / "truncated.npz")),
              random_bytes(tmp_path / "random.npz")):
    for read in (vit.load_google_vit_npz, lambda p: vit.load(init, p)):
      with pytest.raises(ValueError, match=re.escape(repr(str(bad))) + " as a NumPy .npz") as e:
        read(bad)
      assert "allow_pickle" not in str(e.value)  # numpy's misleading hint for non-npy bytes
  objects = tmp_path / "objects.npz"
  np.savez(objects, cls=np.array([object()], dtype=object))
  with pytest.raises(ValueError, match=re.escape(repr(str(objects))) + ".*'cls' is an object"):
    vit.load_google_vit_npz(objects)


def test_random_safetensors_names_the_path_and_format(tmp_path):
  bad = random_bytes(tmp_path / "model.safetensors")
  pattern = re.escape(repr(str(bad))) + " as a .safetensors file"
  with pytest.raises(ValueError, match=pattern):
    common.load_torch_state_dict(bad)
  with pytest.raises(ValueError, match=pattern):
    swin.load({"x": np.zeros(1)}, bad)
  with pytest.raises(ValueError, match=pattern):
    clip.read_state_dict(bad)
  truncated = tmp_path / "truncated.safetensors"
  save_file({"w": np.ones((64, 64), np.float32)}, str(truncated))
  with pytest.raises(ValueError, match=re.escape(repr(str(truncate(truncated)))) + " as a .safe"):
    swin.load({"x": np.zeros(1)}, truncated)


@pytest.mark.parametrize("extension", [".pth", ".pt", ".bin"])
def test_bad_torch_files_name_the_path_and_format(tmp_path, extension):
  truncated = tmp_path / f"truncated{extension}"
  torch.save({"w": torch.ones(64, 64)}, str(truncated))
  truncate(truncated)
  for bad in (truncated, random_bytes(tmp_path / f"random{extension}")):
    pattern = re.escape(repr(str(bad))) + " as a PyTorch checkpoint"
    for read in (common.load_torch_state_dict, clip.read_state_dict,
                 lambda p: swin.load({"x": np.zeros(1)}, p)):
      with pytest.raises(ValueError, match=pattern):
        read(bad)


def test_torch_file_naming_a_code_global_is_refused_by_name(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(2), "x": TouchFile(marker)}, str(path))
  with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*global posix.system"):
    common.load_torch_state_dict(path)
  assert not marker.exists()


def test_missing_torch_is_a_clear_import_error(tmp_path, monkeypatch):
  path = tmp_path / "weights.pth"
  torch.save({"w": torch.ones(2)}, str(path))
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  message = (f"Reading {path} (a PyTorch checkpoint) needs PyTorch: pip install -e '.[torch]' "
             "(or convert it to .safetensors)")
  with pytest.raises(ImportError, match=re.escape(message)):
    common.load_torch_state_dict(path)
  with pytest.raises(ImportError, match=re.escape(message)):
    clip.read_state_dict(path)


# ------------------------------------------------------------------------------------------------
# TorchScript archives (OpenAI CLIP .pt): read without torch.jit.load.


class Scripted(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(3, 4)
    self.fp16 = torch.nn.Linear(4, 2, bias=False).half()
    self.bf16 = torch.nn.Parameter(torch.randn(5).bfloat16())
    self.transposed = torch.nn.Parameter(torch.randn(3, 6).t())  # a non-contiguous stride
    self.blocks = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3))
    self.register_buffer("input_resolution", torch.tensor(7))

  def forward(self, x):
    return self.proj(x)


@pytest.fixture(scope="module")
def torchscript_archive(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("torchscript") / "tiny.pt"
  with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, OpenAI's format
    warnings.filterwarnings("ignore", r"`torch\.jit\..*` is deprecated", DeprecationWarning)
    torch.jit.save(torch.jit.trace(Scripted().eval(), torch.ones(1, 3)), str(path))
    expected = {name: (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                for name, t in torch.jit.load(str(path)).state_dict().items()}
  return path, expected


def test_torchscript_archive_reads_without_torch(torchscript_archive, monkeypatch):
  path, expected = torchscript_archive
  monkeypatch.setitem(sys.modules, "torch", None)  # neither torch nor its jit is used
  state = clip.read_state_dict(path)
  assert list(state) == list(expected)
  for name, array in expected.items():
    assert state[name].dtype == array.dtype, name
    np.testing.assert_array_equal(state[name], array, err_msg=name)


def write_archive(path, data_pkl: bytes, storages: dict[str, bytes]):
  """A minimal TorchScript archive: data.pkl, data/<key> and the constants.pkl marker."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("x/data.pkl", data_pkl)
    archive.writestr("x/constants.pkl", pickle.dumps((), protocol=2))
    archive.writestr("x/code/__torch__.py", 'class M(Module):\n  __parameters__ = ["w", ]\n'
                     "  __buffers__ = []\n")
    for key, data in storages.items():
      archive.writestr(f"x/data/{key}", data)
  return path


class FakeStorage:
  pass


class FakeTensor:
  """Pickles as TorchScript pickles a tensor: _rebuild_tensor_v2 of a persistent storage id."""

  def __init__(self, size, stride):
    self.size, self.stride = size, stride

  def __reduce__(self):
    return torch._utils._rebuild_tensor_v2, (FakeStorage(), 0, self.size, self.stride, False,
                                             collections.OrderedDict())


def module_pickle(monkeypatch, attributes) -> bytes:
  """data.pkl of a `__torch__.M` module holding `attributes` (float32 storage '0', 4 elements)."""
  module = types.ModuleType("__torch__")
  M = type("M", (), {"__module__": "__torch__"})
  module.M = M
  monkeypatch.setitem(sys.modules, "__torch__", module)
  root = M()
  root.__dict__.update(attributes)

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, FakeStorage):
        return ("storage", torch.FloatStorage, "0", "cpu", 4)
      return None

  data = io.BytesIO()
  Pickler(data, protocol=2).dump(root)
  return data.getvalue()


def test_torchscript_archive_naming_a_code_global_is_refused(tmp_path, monkeypatch):
  marker = tmp_path / "pwned"
  evil = write_archive(tmp_path / "evil.pt", pickle.dumps(TouchFile(marker), protocol=2), {})
  with pytest.raises(ValueError, match=re.escape(repr(str(evil))) + ".*TorchScript.*posix.system"):
    clip.read_state_dict(evil)
  assert not marker.exists()

  storage = {"0": np.arange(4, dtype=np.float32).tobytes()}
  good = write_archive(tmp_path / "good.pt",
                       module_pickle(monkeypatch, {"w": FakeTensor((2, 2), (1, 2))}), storage)
  np.testing.assert_array_equal(clip.read_state_dict(good)["w"], [[0, 2], [1, 3]])
  # A tensor whose size/stride reaches past its storage is refused, not read out of bounds.
  overrun = write_archive(tmp_path / "overrun.pt",
                          module_pickle(monkeypatch, {"w": FakeTensor((1000,), (1,))}), storage)
  with pytest.raises(ValueError, match=re.escape(repr(str(overrun))) + ".*overruns"):
    clip.read_state_dict(overrun)
