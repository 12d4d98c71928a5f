"""Packaging: the optional extras the README names exist, and the README documents them."""
import os
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_and_notebook_extras_are_declared_and_documented():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  assert extras["torch"] == ["torch==2.13.0"]  # the CPU build the tests use
  notebook_packages = {spec.split(">")[0].split("=")[0] for spec in extras["notebooks"]}
  assert {"nbclient", "nbformat", "ipykernel"} <= notebook_packages
  readme = open(os.path.join(REPO, "README.md")).read()
  for command in ('pip install -e ".[torch]"', 'pip install -e ".[notebooks]"',
                  "--templates=ensemble", "--config.dataset_kwargs.root=DIR"):
    assert command in readme, command
