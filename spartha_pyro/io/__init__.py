"""Readers of spatial transcriptomics platforms into AnnData (scanpy/squidpy conventions),
and atomic writers.

The readers are imported on first use (PEP 562): the core modules import the atomic writers
from here, and must not pull in the image stack (Pillow) with them.
"""
from .write import atomic_path, write_h5ad


def __getattr__(name: str):
    if name == "read_visium":
        from .visium import read_visium

        return read_visium
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["atomic_path", "read_visium", "write_h5ad"]
