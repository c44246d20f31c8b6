"""The teaching notebooks run top to bottom under ``CI=1``, and each ``.ipynb`` matches its ``.py``.

The jupytext percent-format ``.py`` files are the source of truth; each is executed as a
script in a subprocess (no Jupyter kernel needed, so nothing flaky about kernel start-up).
Notebooks 03 and 04 share a cache of the prepared her2st data and print a skip message when
the data are absent.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Prepared-data cache shared by the her2st notebooks (03 writes it, 04 reads it)."""
    return tmp_path_factory.mktemp("notebook_cache")


def test_four_notebooks():
    assert [p.stem[:2] for p in SOURCES] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source: Path, cache: Path, tmp_path: Path):
    env = {**os.environ, "CI": "1", "SPARTHA_CACHE": str(cache), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(source)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_paired_and_stripped(source: Path):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --to ipynb {source.name}"
    paired = nbformat.read(ipynb, as_version=4)
    expected = jupytext.read(source)
    assert [(c.cell_type, c.source) for c in paired.cells] == [(c.cell_type, c.source) for c in expected.cells], (
        f"{ipynb.name} is out of sync with {source.name}: run jupytext --sync {source.name}"
    )
    assert all(not c.get("outputs") for c in paired.cells if c.cell_type == "code"), f"{ipynb.name} has outputs"
