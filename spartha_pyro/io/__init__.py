"""Readers of spatial transcriptomics platforms into AnnData (scanpy/squidpy conventions),
and atomic writers."""
from .visium import read_visium
from .write import atomic_path, write_h5ad

__all__ = ["atomic_path", "read_visium", "write_h5ad"]
