"""Atomic writers: outputs appear whole, and with the permissions any new file would get."""
import os
import stat

import numpy as np
import pytest
from anndata import AnnData

import spartha_pyro as sp
from spartha_pyro.io import atomic_path


@pytest.fixture
def umask():
    """Set the process umask for one test; restore it after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_atomic_files_respect_the_umask(tmp_path, umask, mask):
    umask(mask)
    with atomic_path(tmp_path / "sub" / "out.txt") as tmp:
        tmp.write_text("hello")
    sp.io.write_h5ad(AnnData(np.ones((2, 2), np.float32)), tmp_path / "a.h5ad")
    for path in (tmp_path / "sub" / "out.txt", tmp_path / "a.h5ad"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    assert (tmp_path / "sub" / "out.txt").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.h5ad", "out.txt", "sub"]  # no temporary left


def test_atomic_path_removes_its_file_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
