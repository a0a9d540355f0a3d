"""Executes every notebook in colabs/ top to bottom, as a user would run it.

A notebook fails the test when any cell raises, including the asserts the notebooks make about
their own results. The kernel is a fresh process on one CPU device (the 8 simulated devices of
conftest.py are for the unit tests, not for what a user sees), reading the Shakespeare data from
a TFDS folder of the test session; nothing is downloaded.
"""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = sorted((pathlib.Path(__file__).resolve().parents[1] / "colabs").glob("*.ipynb"))


def test_there_are_notebooks():
  assert COLABS, "colabs/ holds no notebook"


@pytest.mark.slow
@pytest.mark.parametrize("path", COLABS, ids=[p.stem for p in COLABS])
def test_notebook_runs(path, tmp_path, monkeypatch, child_env):
  for key, value in child_env().items():
    monkeypatch.setenv(key, value)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for out in cell.get("outputs", []))
  assert "Traceback" not in outputs
