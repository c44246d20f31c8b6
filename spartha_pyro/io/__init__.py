"""Readers of spatial transcriptomics platforms into AnnData (scanpy/squidpy conventions)."""
from .visium import read_visium

__all__ = ["read_visium"]
