"""Spatial plots on the H&E image, and the per-section QC failure summary."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .._errors import InputError
from ..pp.qc import (
    IMAGE_QC_COLUMNS,
    MAX_BACKGROUND,
    check_patch_metrics,
    image_outliers,
    mad_reference,
    qc_metrics,
    qc_outliers,
)


def qc_summary(
    adata: AnnData,
    batch_key: str = "slide",
    nmads: Sequence[float] = (3, 4, 5),
    layer: str | None = None,
    image: bool | None = None,
    max_background: float | None = None,
) -> pd.DataFrame:
    """Spots failing MAD-based QC per section at several thresholds (nothing is annotated).

    Uses the same metrics and per-batch medians/MADs as :func:`spartha_pyro.pp.annotate_qc`.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layers[layer]``), spots × genes.
    batch_key
        ``obs`` column with the section; statistics are per section.
    nmads
        Thresholds in MADs.
    image
        A spot also fails on its H&E patch, as in ``annotate_qc(image=True)`` (needs the patch
        metrics in ``obs``); ``None`` (default): as ``annotate_qc`` last did (``uns["qc"]``).
    max_background
        With ``image``: the background limit; default the one ``annotate_qc`` recorded in
        ``uns["qc"]``, else :data:`~spartha_pyro.pp.qc.MAX_BACKGROUND`.

    Returns
    -------
    DataFrame indexed by section with ``n_spots``, ``fail_<k>mad`` (counts) and
    ``frac_fail_<k>mad`` (fractions) for each ``k`` in ``nmads``, plus a ``total`` row.
    """
    if batch_key not in adata.obs:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs")
    if image is None:
        image = bool(adata.uns.get("qc", {}).get("image", False))
    if image:
        check_patch_metrics(adata.obs)
    if max_background is None:
        max_background = adata.uns.get("qc", {}).get("max_background", MAX_BACKGROUND)
    X = adata.X if layer is None else adata.layers[layer]
    metrics = qc_metrics(X, adata.var_names)
    batches = adata.obs[batch_key].astype(str).to_numpy()
    order = list(pd.unique(batches))
    rows = {}
    for b in order:
        sel = batches == b
        ref = mad_reference(metrics[sel])
        row = {"n_spots": int(sel.sum())}
        for k in nmads:
            fail = qc_outliers(metrics[sel], ref, k)
            if image:
                fail |= image_outliers(adata.obs.loc[sel, IMAGE_QC_COLUMNS], k, max_background)
            row[f"fail_{k:g}mad"] = int(fail.sum())
        rows[b] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.loc["total"] = out.sum(axis=0)
    for k in nmads:
        out[f"frac_fail_{k:g}mad"] = out[f"fail_{k:g}mad"] / out["n_spots"]
    out.index.name = batch_key
    return out


def qc_failures(
    adata_or_summary: AnnData | pd.DataFrame,
    batch_key: str = "slide",
    nmads: Sequence[float] = (3, 4, 5),
    fraction: bool = True,
    save: str | Path | None = None,
) -> Figure:
    """Grouped bar plot of spots failing QC per section at each MAD threshold.

    Parameters
    ----------
    adata_or_summary
        AnnData of raw counts, or the output of :func:`qc_summary`.
    fraction
        Plot fractions of spots (default) rather than counts.
    save
        Write the figure to this path (format from the suffix).

    Returns
    -------
    The matplotlib figure.
    """
    summary = (
        qc_summary(adata_or_summary, batch_key, nmads)
        if isinstance(adata_or_summary, AnnData)
        else adata_or_summary
    )
    summary = summary.drop(index="total", errors="ignore")
    prefix = "frac_fail" if fraction else "fail"
    cols = [c for c in summary.columns if c.startswith(f"{prefix}_") and c.endswith("mad")]
    if not cols:
        raise InputError(f"summary has no {prefix}_<k>mad columns")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(summary) * len(cols) / 2 + 2), 3.5))
    width = 0.8 / len(cols)
    x = np.arange(len(summary))
    for j, col in enumerate(cols):
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, summary[col].to_numpy(), width, label=col.split("_")[-1].replace("mad", " MAD"))
    ax.set_xticks(x, summary.index.astype(str), rotation=90 if len(summary) > 12 else 0)
    ax.set_ylabel("fraction of spots failing QC" if fraction else "spots failing QC")
    ax.set_xlabel(summary.index.name or "section")
    ax.legend(title="threshold", frameon=False)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150)
    return fig


def _values(adata: AnnData, color: str, layer: str | None) -> pd.Series:
    """An ``obs`` column, or a gene as ``log1p`` counts, indexed by obs_names."""
    if color in adata.obs:
        return adata.obs[color]
    if color in adata.var_names:
        X = adata[:, color].X if layer is None else adata[:, color].layers[layer]
        v = X.toarray().ravel() if sp.issparse(X) else np.asarray(X).ravel()
        return pd.Series(np.log1p(v), index=adata.obs_names, name=f"log1p {color}")
    raise InputError(f"color {color!r} is neither a column of adata.obs nor a gene in adata.var_names")


def spatial(
    adata: AnnData,
    section: str,
    color: str | None = None,
    library_key: str = "slide",
    layer: str | None = None,
    cmap: str = "viridis",
    alpha: float = 0.8,
    ax: plt.Axes | None = None,
    save: str | Path | None = None,
) -> Figure:
    """Spots of one section drawn to scale on its low-resolution H&E image.

    Parameters
    ----------
    adata
        Spots with ``obsm["spatial"]`` (full-resolution pixels) and, for the image,
        ``uns["spatial"][section]`` with ``images["lowres"]`` and ``scalefactors``.
        Sections without an image are drawn on a blank background.
    section
        Value of ``obs[library_key]`` to plot.
    color
        ``obs`` column (categorical, boolean or numeric, e.g. ``"qc_pass"``) or a gene
        (shown as ``log1p`` of ``X``/``layers[layer]``); ``None`` draws outlines only.
    cmap, alpha
        Colour map for numeric values; spot opacity.
    ax
        Axes to draw on; default a new figure.
    save
        Write the figure to this path.

    Returns
    -------
    The matplotlib figure.
    """
    if library_key not in adata.obs:
        raise InputError(f"library_key {library_key!r} is not a column of adata.obs")
    mask = (adata.obs[library_key].astype(str) == str(section)).to_numpy()
    if not mask.any():
        raise InputError(f"section {section!r} has no spots in adata.obs[{library_key!r}]")
    entry = adata.uns.get("spatial", {}).get(str(section), {})
    scalefactors = entry.get("scalefactors", {})
    image = entry.get("images", {}).get("lowres")
    scale = float(scalefactors.get("tissue_lowres_scalef", 1.0)) if image is not None else 1.0
    xy = np.asarray(adata.obsm["spatial"], dtype=float)[mask] * scale
    diameter = scalefactors.get("spot_diameter_fullres")
    if diameter is None:  # fall back to 60% of the nearest-neighbour spacing
        d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)) + np.eye(len(xy)) * 1e12
        radius = 0.3 * np.median(d.min(axis=1)) if len(xy) > 1 else 1.0
    else:
        radius = diameter * scale / 2
    fig = ax.figure if ax is not None else plt.subplots(figsize=(6, 6))[1].figure
    ax = ax or fig.axes[0]
    if image is not None:
        ax.imshow(image)
    circles = [Circle((x, y), radius) for x, y in xy]
    coll = PatchCollection(circles, alpha=alpha, linewidths=0.3, edgecolors="k")
    title = str(section)
    if color is None:
        coll.set_facecolor("none")
    else:
        vals = _values(adata, color, layer)[mask]
        title = f"{section}: {vals.name or color}"
        if isinstance(vals.dtype, pd.CategoricalDtype) or vals.dtype == bool or vals.dtype == object:
            cats = pd.Categorical(vals.astype(str) if vals.dtype == bool else vals)
            palette = plt.get_cmap("tab10" if len(cats.categories) <= 10 else "tab20")
            colors = {c: palette(i % palette.N) for i, c in enumerate(cats.categories)}
            coll.set_facecolor([colors.get(c, (0.7, 0.7, 0.7, 1.0)) for c in cats])
            for c, col in colors.items():
                ax.scatter([], [], color=col, label=str(c))
            ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), title=color)
        else:
            coll.set_array(vals.to_numpy(dtype=float))
            coll.set_cmap(cmap)
            fig.colorbar(coll, ax=ax, fraction=0.04, pad=0.02, label=vals.name or color)
    ax.add_collection(coll)
    pad = 2 * radius
    if image is None:
        ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
        ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(title)
    fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
    return fig
