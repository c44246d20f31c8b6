"""Keep torch's thread count across calls into scanpy.

scanpy's first parallel numba kernel (e.g. in ``sc.pp.normalize_total``) starts numba's
OpenMP pool, which sets the process's OpenMP thread count to the number of cores; torch
shares that libgomp, so a thread limit set with ``OMP_NUM_THREADS`` was silently raised for
the rest of the process (an explicit ``torch.set_num_threads`` survives it).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keep_torch_threads() -> Iterator[None]:
    """Restore ``torch.get_num_threads()`` on exit if the body changed it."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
