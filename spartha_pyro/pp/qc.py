"""Standard MAD-based spot QC: spots are *annotated* pass/fail, never dropped.

The recipe (as in the single-cell best-practices book): per batch, a spot is an outlier when
any metric lies more than ``nmads`` median absolute deviations (unscaled MAD) from the batch
median:

- ``log1p_total_counts``      both sides
- ``log1p_n_genes_by_counts`` both sides
- ``pct_counts_in_top_20_genes`` both sides
- ``pct_counts_mt``           upper side only, when genes starting with ``MT-`` exist

With ``image=True`` the spot's H&E patch is checked too (:data:`IMAGE_QC_METRICS`, the
patch metrics of :func:`spartha_pyro.pp.patches.patch_qc_metrics`, in the spirit of HistoQC):
a patch fails when more than ``max_background`` of it is background (bubbles, tears, detached
tissue), when its sharpness lies more than ``nmads`` MADs below the batch median (out of
focus), or its mean optical density more than ``nmads`` MADs from it (over-staining, folds,
washed-out stain). The background share is an absolute limit because the tissue fraction
piles up at 1, where a MAD says nothing.

The same thresholds are reused by :func:`spartha_pyro.metrics.qcpr` to score generated spots
against the real spots of their section.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._errors import InputError
from ..data import read_count_mask

#: metric name -> which side(s) of the median count as outliers
QC_METRICS: dict[str, str] = {
    "log1p_total_counts": "both",
    "log1p_n_genes_by_counts": "both",
    "pct_counts_in_top_20_genes": "both",
    "pct_counts_mt": "upper",
}

#: ``obs`` column of a patch metric -> which side(s) of the batch median count as outliers
IMAGE_QC_METRICS: dict[str, str] = {"patch_log_sharpness": "lower", "patch_od_mean": "both"}
#: a patch with a larger background share (1 - ``obs["patch_tissue_fraction"]``) fails image QC
MAX_BACKGROUND = 0.25
#: every ``obs`` column image QC reads
IMAGE_QC_COLUMNS: list[str] = ["patch_tissue_fraction", *IMAGE_QC_METRICS]


def missing_patch_metrics(obs: pd.DataFrame) -> list[str]:
    """The :data:`IMAGE_QC_COLUMNS` that ``obs`` lacks (e.g. data prepared before image QC)."""
    return [c for c in IMAGE_QC_COLUMNS if c not in obs]


def check_patch_metrics(obs: pd.DataFrame) -> None:
    """Raise :class:`InputError` unless ``obs`` holds every column image QC reads."""
    if missing_patch_metrics(obs):
        raise InputError(
            f"image QC needs the patch metrics {IMAGE_QC_COLUMNS} in adata.obs: run sp.pp.histology_features or "
            "sp.pp.annotate_patches first (a file prepared before image QC existed lacks some of them)"
        )


def mito_mask(var_names: Sequence[str]) -> np.ndarray:
    """Boolean mask of mitochondrial genes: names starting with ``MT-`` or ``mt-`` (any case)."""
    return np.array([str(g).upper().startswith("MT-") for g in var_names], dtype=bool)


def qc_metrics(X, var_names: Sequence[str]) -> pd.DataFrame:
    """Per-spot QC metrics of a counts matrix.

    Parameters
    ----------
    X
        Counts, shape ``(n_spots, n_genes)``, dense or sparse (CSR preferred).
    var_names
        Gene names, length ``n_genes``; ``MT-``/``mt-`` prefixes mark mitochondrial genes.

    Returns
    -------
    DataFrame with one row per spot and the columns of :data:`QC_METRICS` (``pct_counts_mt``
    only when mitochondrial genes exist). Percentages are in [0, 100]; zero-count spots get 0.
    """
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    n_spots, n_genes = X.shape
    total = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    n_genes_by_counts = np.asarray((X > 0).sum(axis=1)).ravel()
    top = np.zeros(n_spots)
    k = min(20, n_genes)
    for i in range(n_spots):  # rows are short in sparse ST data: a partial sort per row is cheap
        row = X.data[X.indptr[i] : X.indptr[i + 1]]
        if row.size:
            top[i] = np.sort(row)[-k:].sum() if row.size > k else row.sum()
    safe_total = np.where(total > 0, total, 1.0)
    out = {
        "log1p_total_counts": np.log1p(total),
        "log1p_n_genes_by_counts": np.log1p(n_genes_by_counts.astype(np.float64)),
        "pct_counts_in_top_20_genes": 100.0 * top / safe_total,
    }
    mt = mito_mask(var_names)
    if mt.any():
        out["pct_counts_mt"] = 100.0 * np.asarray(X[:, mt].sum(axis=1)).ravel() / safe_total
    return pd.DataFrame(out)


def mad_reference(metrics: pd.DataFrame) -> pd.DataFrame:
    """Median and unscaled MAD of each metric column; index = metric, columns = median, mad."""
    med = metrics.median(axis=0)
    mad = (metrics - med).abs().median(axis=0)
    return pd.DataFrame({"median": med, "mad": mad})


def qc_outliers(metrics: pd.DataFrame, reference: pd.DataFrame, nmads: float,
                sides: dict[str, str] = QC_METRICS) -> np.ndarray:
    """Boolean mask of spots failing QC against ``reference`` (from :func:`mad_reference`).

    ``sides`` maps each metric column to the side(s) of the median that count as outliers
    (``"upper"``, ``"lower"`` or ``"both"``; default :data:`QC_METRICS`). A metric with MAD 0
    flags any value different from the median on its outlier side(s); NaN never fails.
    """
    fail = np.zeros(len(metrics), dtype=bool)
    for name, side in sides.items():
        if name not in metrics or name not in reference.index:
            continue
        dev = metrics[name].to_numpy() - reference.loc[name, "median"]
        lim = nmads * reference.loc[name, "mad"]
        if side not in ("upper", "lower", "both"):
            raise InputError(f"the outlier side of {name!r} must be 'upper', 'lower' or 'both', got {side!r}")
        fail |= {"upper": dev > lim, "lower": -dev > lim, "both": np.abs(dev) > lim}[side]
    return fail


def image_outliers(obs: pd.DataFrame, nmads: float, max_background: float = MAX_BACKGROUND) -> np.ndarray:
    """Boolean mask of spots of ONE batch whose patch fails image QC (see the module docstring).

    ``obs`` needs the :data:`IMAGE_QC_COLUMNS`; rows
    without an image (NaN) never fail and take no part in the medians and MADs.
    """
    metrics = obs[list(IMAGE_QC_METRICS)].astype(float)
    imaged = metrics.notna().all(axis=1).to_numpy()
    fail = (1.0 - obs["patch_tissue_fraction"].astype(float).to_numpy()) > max_background
    if imaged.any():
        fail[imaged] |= qc_outliers(metrics[imaged], mad_reference(metrics[imaged]), nmads, IMAGE_QC_METRICS)
    return fail & imaged


def annotate_qc(
    adata: AnnData,
    batch_key: str | None = None,
    nmads: float = 5.0,
    layer: str | None = None,
    key_added: str = "qc_pass",
    counts_key: str | None = None,
    image: bool = False,
    max_background: float = MAX_BACKGROUND,
) -> AnnData:
    """Annotate spots as QC ``"pass"``/``"fail"`` per batch; never drops spots.

    Parameters
    ----------
    adata
        Raw counts in ``adata.X`` (or ``adata.layers[layer]``), spots × genes.
    batch_key
        ``obs`` column with the batch/slide; medians and MADs are taken within each batch.
        ``None`` treats all spots as one batch.
    nmads
        Number of MADs beyond which a metric is an outlier (default 5).
    key_added
        ``obs`` column receiving the categorical label (categories ``["fail", "pass"]``).
    counts_key
        Boolean ``obs`` column marking spots whose counts were measured (as in
        :func:`~spartha_pyro.pp.combine_sections`); the others get no QC call (NaN label and
        metrics) and take no part in the medians and MADs.
    image
        Also fail spots whose H&E patch fails image QC (see the module docstring); needs the
        patch metrics that :func:`~spartha_pyro.pp.histology_features` or
        :func:`~spartha_pyro.pp.annotate_patches` record in ``obs``. Spots without an image
        are judged on their counts alone.
    max_background
        With ``image``: the largest background share of a passing patch, in [0, 1).

    Returns
    -------
    ``adata`` itself, with ``obs[key_added]`` and the QC metrics (``obs["qc_<metric>"]``)
    added, with ``image`` also ``obs[f"{key_added}_image"]`` (bool: the patch alone fails),
    and ``uns["qc"] = {"nmads": ..., "batch_key": ..., "metrics": [...], "image": ...,
    "max_background": ...}``.
    """
    if nmads <= 0:
        raise InputError(f"nmads must be positive, got {nmads}")
    if not 0 <= max_background < 1:
        raise InputError(f"max_background must lie in [0, 1), got {max_background}")
    if image:
        check_patch_metrics(adata.obs)
    X = adata.X if layer is None else adata.layers[layer]
    if X is None or adata.n_vars == 0:
        raise InputError("annotate_qc needs counts: adata has no genes")
    if batch_key is not None and batch_key not in adata.obs:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs")
    measured = read_count_mask(adata, counts_key) if counts_key is not None else np.ones(adata.n_obs, dtype=bool)
    metrics = qc_metrics(X, adata.var_names)
    metrics.index = adata.obs_names
    metrics[~measured] = np.nan
    batches = adata.obs[batch_key].astype(str).to_numpy() if batch_key else np.zeros(adata.n_obs, dtype=str)
    fail = np.zeros(adata.n_obs, dtype=bool)
    image_fail = np.zeros(adata.n_obs, dtype=bool)
    for b in pd.unique(batches[measured]):
        sel = (batches == b) & measured
        fail[sel] = qc_outliers(metrics[sel], mad_reference(metrics[sel]), nmads)
        if image:
            image_fail[sel] = image_outliers(adata.obs.loc[sel, IMAGE_QC_COLUMNS], nmads, max_background)
    for col in metrics:
        adata.obs[f"qc_{col}"] = metrics[col].to_numpy()
    if image:
        adata.obs[f"{key_added}_image"] = np.where(measured, image_fail, False)
    elif f"{key_added}_image" in adata.obs:  # left by an earlier image=True call, it would contradict the label
        del adata.obs[f"{key_added}_image"]
    label = np.where(measured, np.where(fail | image_fail, "fail", "pass"), None)
    adata.obs[key_added] = pd.Categorical(label, categories=["fail", "pass"])
    adata.uns["qc"] = {"nmads": float(nmads), "batch_key": batch_key, "metrics": list(metrics.columns),
                       "image": bool(image), "max_background": float(max_background)}
    return adata
