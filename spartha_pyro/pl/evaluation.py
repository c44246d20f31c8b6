"""Plots of evaluation results: disentanglement probes and per-latent UMAPs."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import scanpy as sc
import xarray as xr
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .._errors import InputError
from .._threads import keep_torch_threads


def probe_heatmap(
    probe: xr.DataArray,
    ax: Axes | None = None,
    cmap: str = "viridis",
    vmin: float = 0.0,
    vmax: float = 1.0,
    fmt: str = ".2f",
) -> Axes:
    """Annotated heatmap of a latent × factor score matrix.

    Parameters
    ----------
    probe
        Output of :func:`spartha_pyro.metrics.probe_matrix` or
        :func:`~spartha_pyro.metrics.silhouette_matrix`: dims ``("latent", "factor")``. A
        ``chance`` coordinate along ``factor`` is shown under each factor name.
    ax
        Axes to draw on; default a new figure.
    cmap, vmin, vmax
        Colour map and its range (use ``vmin=-1`` for silhouettes).
    fmt
        Format of the cell annotations; NaN cells show ``–``.

    Returns
    -------
    The axes.
    """
    if set(probe.dims) != {"latent", "factor"}:
        raise InputError(f"probe must have dims ('latent', 'factor'), got {probe.dims}")
    probe = probe.transpose("latent", "factor")
    values = probe.values
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 1.3 * values.shape[1], 0.8 + 0.7 * values.shape[0]))
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.figure.colorbar(im, ax=ax, label=probe.name or "")
    factors = [str(f) for f in probe["factor"].values]
    if "chance" in probe.coords:
        factors = [f"{f}\n(chance {c:.2f})" for f, c in zip(factors, probe["chance"].values)]
    ax.set_xticks(range(values.shape[1]), factors)
    ax.set_yticks(range(values.shape[0]), [str(v) for v in probe["latent"].values])
    ax.set_xlabel("factor")
    ax.set_ylabel("latent")
    mid = (vmin + vmax) / 2
    for (i, j), v in np.ndenumerate(values):
        text = "–" if np.isnan(v) else format(v, fmt)
        ax.text(j, i, text, ha="center", va="center", color="black" if np.isnan(v) or v > mid else "white")
    ax.figure.tight_layout()
    return ax


def latent_umaps(
    adata: AnnData,
    latent_keys: Sequence[str],
    color_keys: Sequence[str],
    n_neighbors: int = 15,
    seed: int = 0,
    panel_size: float = 3.5,
) -> Figure:
    """A grid of UMAPs: one row per latent space, one column per factor used as colour.

    Parameters
    ----------
    adata
        Spots with latent means in ``obsm[latent_key]`` (spots × dim) and factors in ``obs``.
    latent_keys
        ``obsm`` keys of the latents (e.g. ``["z_y", "z_d", "z_r"]``).
    color_keys
        ``obs`` columns to colour by (e.g. cell type, slide, QC label).
    n_neighbors
        Neighbours of the kNN graph behind each UMAP.
    seed
        Random state of the graph and the layout.
    panel_size
        Width and height of one panel, inches.

    Returns
    -------
    The figure; ``adata`` is left unchanged.
    """
    missing = [k for k in latent_keys if k not in adata.obsm] + [k for k in color_keys if k not in adata.obs]
    if missing or not latent_keys or not color_keys:
        raise InputError(f"latent_keys must be obsm keys and color_keys obs columns; missing {missing}")
    fig, axes = plt.subplots(
        len(latent_keys), len(color_keys), figsize=(panel_size * len(color_keys), panel_size * len(latent_keys)),
        squeeze=False,
    )
    for row, key in zip(axes, latent_keys):
        view = AnnData(obs=adata.obs[list(color_keys)].copy(), obsm={"X_latent": np.asarray(adata.obsm[key])})
        with keep_torch_threads():
            sc.pp.neighbors(view, n_neighbors=n_neighbors, use_rep="X_latent", random_state=seed)
            sc.tl.umap(view, random_state=seed)
        for ax, color in zip(row, color_keys):
            sc.pl.umap(view, color=color, ax=ax, show=False, title=f"{key} · {color}", frameon=False)
    fig.tight_layout()
    return fig
