"""One entry point for every input the command line accepts: her2st, Visium or ``.h5ad``."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
from anndata import AnnData

from .._errors import InputError
from ..io.visium import read_visium
from .her2st import read_her2st

#: input kinds understood by :func:`load`
KINDS = ("auto", "her2st", "visium", "h5ad")


def detect_kind(path: str | os.PathLike) -> str:
    """Guess the input kind of ``path``: ``"h5ad"``, ``"her2st"`` or ``"visium"``.

    Parameters
    ----------
    path
        A ``.h5ad`` file, a her2st folder (with ``counts/``) or a Space Ranger ``outs/``
        folder (with ``spatial/``).

    Returns
    -------
    The kind.

    Raises
    ------
    InputError
        The path does not exist or matches no known layout.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".h5ad":
        return "h5ad"
    if path.is_dir() and (path / "counts").is_dir():
        return "her2st"
    if path.is_dir() and (path / "spatial").is_dir():
        return "visium"
    raise InputError(
        f"cannot tell what {str(path)!r} is: expected a .h5ad file, a her2st folder (with counts/) "
        "or a Space Ranger outs/ folder (with spatial/)"
    )


def load(
    path: str | os.PathLike,
    kind: str = "auto",
    sections: Sequence[str] | None = None,
    source_image_path: str | os.PathLike | None = None,
) -> AnnData:
    """Read spots from a her2st folder, a Space Ranger folder or an ``.h5ad`` file.

    Parameters
    ----------
    path
        The input (see :func:`detect_kind`).
    kind
        One of :data:`KINDS`; ``"auto"`` detects it.
    sections
        her2st sections to read (default: every section); for an ``.h5ad`` with a ``slide``
        column, the sections to keep. Not used for Visium.
    source_image_path
        Visium only: the full-resolution H&E given to Space Ranger (needed for features).

    Returns
    -------
    The AnnData (raw counts in ``X``), as returned by the matching reader.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    if not Path(path).exists():
        raise InputError(f"input {str(path)!r} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "her2st":
        return read_her2st(path, sections=sections)
    if kind == "visium":
        return read_visium(path, source_image_path=source_image_path)
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError) as err:
        raise InputError(f"{str(path)!r} cannot be read as .h5ad: {err}") from None
    if sections:
        if "slide" not in adata.obs:
            raise InputError(f"sections were given, but {str(path)!r} has no obs['slide'] column")
        unknown = sorted(set(sections) - set(adata.obs["slide"].astype(str)))
        if unknown:
            raise InputError(f"sections {unknown} are not in obs['slide'] of {str(path)!r}")
        adata = adata[adata.obs["slide"].astype(str).isin(list(sections)).to_numpy()].copy()
    return adata
