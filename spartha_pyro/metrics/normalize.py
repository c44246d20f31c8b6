"""The expression space every point metric is computed in: log1p of library-size-normalised counts."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import xarray as xr


def normalize_log1p(counts, target_sum: float = 1e4, dtype=np.float64, total=None):
    """Normalise counts to ``target_sum`` per spot, then ``log1p``.

    ``y[s, g] = log1p(target_sum * x[s, g] / sum_g' x[s, g'])``; spots with zero counts stay 0.
    The total is taken over the genes given unless ``total`` is passed, so normalise the full
    gene set first and subset genes afterwards (or pass the full gene set's ``total``) when a
    panel should keep the full-transcriptome library size.

    Parameters
    ----------
    counts
        Non-negative counts with genes on the last axis: dense ``(n_spots, n_genes)``,
        scipy sparse ``(n_spots, n_genes)``, or dense ``(n_samples, n_spots, n_genes)``
        (e.g. posterior predictive draws). An ``xarray.DataArray`` keeps its dims/coords
        (genes must be its last dim).
    target_sum
        Counts per spot after normalisation (default 10,000).
    dtype
        Float dtype of the result (``np.float32`` halves memory for sample arrays).
    total
        Counts per spot to divide by, shaped like ``counts`` without its gene axis
        (default: the sum over the genes given).

    Returns
    -------
    Same kind and shape as ``counts``: a CSR matrix for sparse input, an ndarray for dense
    input, a DataArray for DataArray input; values in log1p(counts per ``target_sum``) units.
    """
    if target_sum <= 0:
        raise ValueError(f"target_sum must be positive, got {target_sum}")
    if isinstance(counts, xr.DataArray):
        return counts.copy(data=normalize_log1p(counts.values, target_sum, dtype, total))
    if sp.issparse(counts):
        X = sp.csr_matrix(counts, dtype=dtype, copy=True)
        total = np.asarray(X.sum(axis=1)).ravel() if total is None else np.asarray(total, dtype=dtype).ravel()
        scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
        X.data *= np.repeat(scale, np.diff(X.indptr)).astype(dtype, copy=False)
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(counts, dtype=dtype)
    total = X.sum(axis=-1, keepdims=True) if total is None else np.asarray(total, dtype=dtype)[..., None]
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    return np.log1p(X * scale)
