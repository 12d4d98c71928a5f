"""Every notebook in colabs/ runs top to bottom (its code cells, in order, in a fresh process)."""
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
# Over 25 s each on two CPU cores (they train a detector, a captioner, SA2VP or DGL, or pre-fit two
# CLIPs); every step they run is covered by the default suite's own tests (test_glip_*, test_sdpt,
# test_tta_*, test_clipcap, test_rlcf_captioning, test_sa2vp, test_dgl*), so they run with
# `-m slow`, keeping the default suite under its 30-minute budget.
SLOW_NOTEBOOKS = ("captioning.ipynb", "dgl_retrieval.ipynb", "glip_detection.ipynb",
                  "sa2vp_walkthrough.ipynb", "sdpt.ipynb", "tta_rlcf.ipynb")


def notebook_code(path: str) -> str:
  """The notebook's code cells joined; shell/magic lines (`!`, `%`) are Colab-only setup."""
  cells = json.load(open(path))["cells"]
  lines = [line for cell in cells if cell["cell_type"] == "code"
           for line in "".join(cell["source"]).splitlines()
           if not line.lstrip().startswith(("!", "%"))]
  return "\n".join(lines)


def test_there_are_notebooks():
  assert NOTEBOOKS, "colabs/ has no notebooks"


@pytest.mark.parametrize("path", [
    pytest.param(path, marks=pytest.mark.slow) if os.path.basename(path) in SLOW_NOTEBOOKS
    else path for path in NOTEBOOKS], ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text(notebook_code(path))
  proc = subprocess.run([sys.executable, str(script)], cwd=os.path.join(REPO, "colabs"),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
