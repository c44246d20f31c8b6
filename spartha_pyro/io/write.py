"""Atomic writers: a reader never sees a half-written output file."""
from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anndata import AnnData


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    Parameters
    ----------
    target
        Final file path; its folder is created when missing.

    Yields
    ------
    A path in the same folder (same suffix) to write to. It is flushed to disk and renamed
    onto ``target`` when the block succeeds, and removed if the block raises. The file gets
    the permissions of any new file (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(tempfile.TMP_MAX):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}{target.suffix}"
        try:  # O_EXCL: a fresh name of our own; mode 0o666 & ~umask, applied by the kernel
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name next to {target}")
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_h5ad(adata: AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    adata
        The AnnData to write.
    path
        Destination ``.h5ad`` file.

    Returns
    -------
    The destination path.
    """
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)
