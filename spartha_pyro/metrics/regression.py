"""Point-prediction metrics between predicted and observed expression (spots × genes).

Both matrices must already be in the metric's space (usually :func:`normalize_log1p`).
Conventions, fixed here once for the whole project:

- **pcc_gene**: Pearson correlation per gene across spots. Genes whose *observed* values are
  constant over the spots are undefined (NaN) and left out of the mean. A gene whose
  *prediction* is constant while the observation varies scores 0 (a constant carries no
  linear information), so the training-mean predictor scores exactly 0, not NaN — the
  convention of the her2st baseline table.
- **pcc_spot**: the same per spot across genes, averaged over spots.
- **r2**: per-gene ``1 - SS_res / SS_tot`` with ``SS_tot`` around the observed mean of that
  gene over the scored spots, averaged over genes with observed variance (sklearn's
  ``uniform_average``). Low-variance genes can make it very negative.
- **r2_pooled**: one R² over all entries, ``SS_tot`` around the grand mean of the panel;
  it credits getting gene means right (the poster-style number, where the mean predictor
  already scores well).
- **mae**, **mse**: mean absolute / squared error over all spots × genes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._errors import InputError

#: metric names returned by :func:`regression_metrics`, in table order
REGRESSION_METRICS = ("pcc_gene", "pcc_spot", "r2", "r2_pooled", "mae", "mse")


def _dense_pair(pred, obs) -> tuple[np.ndarray, np.ndarray]:
    pred = pred.toarray() if sp.issparse(pred) else np.asarray(pred)
    obs = obs.toarray() if sp.issparse(obs) else np.asarray(obs)
    if pred.ndim != 2 or pred.shape != obs.shape:
        raise InputError(f"pred and obs must be 2-D with the same shape, got {pred.shape} and {obs.shape}")
    return pred.astype(np.float64, copy=False), obs.astype(np.float64, copy=False)


def _constant(sd: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Whether a standard deviation is zero up to floating-point noise relative to the mean."""
    return sd <= 1e-12 * np.maximum(1.0, np.abs(mean))


def _pcc_along(pred: np.ndarray, obs: np.ndarray, axis: int) -> np.ndarray:
    """Pearson r along ``axis``; NaN where obs is constant, 0 where only pred is constant."""
    pm, om = pred.mean(axis), obs.mean(axis)
    pc = pred - np.expand_dims(pm, axis)
    oc = obs - np.expand_dims(om, axis)
    psd, osd = np.sqrt((pc**2).sum(axis)), np.sqrt((oc**2).sum(axis))
    n = pred.shape[axis]
    obs_const = _constant(osd / np.sqrt(n), om)
    pred_const = _constant(psd / np.sqrt(n), pm)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * oc).sum(axis) / (psd * osd)
    r = np.where(pred_const, 0.0, r)
    return np.where(obs_const, np.nan, np.clip(r, -1.0, 1.0))


def _nanmean(v: np.ndarray) -> float:
    return float(np.mean(v[~np.isnan(v)])) if np.any(~np.isnan(v)) else float("nan")


def pcc_gene(pred, obs, reduce: bool = True) -> float | np.ndarray:
    """Pearson correlation per gene across spots.

    Parameters
    ----------
    pred, obs
        Predicted and observed expression, ``(n_spots, n_genes)``, dense or sparse.
    reduce
        ``True``: the mean over genes with observed variance; ``False``: the per-gene vector.

    Returns
    -------
    A float, or an array of length ``n_genes`` (NaN for genes constant in ``obs``, 0 for
    genes constant in ``pred`` only).
    """
    r = _pcc_along(*_dense_pair(pred, obs), axis=0)
    return _nanmean(r) if reduce else r


def pcc_spot(pred, obs, reduce: bool = True) -> float | np.ndarray:
    """Pearson correlation per spot across genes.

    Parameters
    ----------
    pred, obs
        ``(n_spots, n_genes)``, dense or sparse.
    reduce
        ``True``: the mean over spots whose observed profile is not constant; ``False``:
        the per-spot vector (length ``n_spots``, NaN for constant observed spots).
    """
    r = _pcc_along(*_dense_pair(pred, obs), axis=1)
    return _nanmean(r) if reduce else r


def r2(pred, obs, reduce: bool = True) -> float | np.ndarray:
    """Coefficient of determination per gene, averaged over genes with observed variance.

    Parameters
    ----------
    pred, obs
        ``(n_spots, n_genes)``, dense or sparse.
    reduce
        ``True``: the uniform mean over genes; ``False``: the per-gene vector (NaN for genes
        constant in ``obs``).
    """
    pred, obs = _dense_pair(pred, obs)
    om = obs.mean(0)
    ss_tot = ((obs - om) ** 2).sum(0)
    ss_res = ((obs - pred) ** 2).sum(0)
    const = _constant(np.sqrt(ss_tot / obs.shape[0]), om)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(const, np.nan, 1.0 - ss_res / ss_tot)
    return _nanmean(v) if reduce else v


def r2_pooled(pred, obs) -> float:
    """One R² over all ``n_spots × n_genes`` entries, around the grand mean of ``obs``."""
    pred, obs = _dense_pair(pred, obs)
    ss_tot = ((obs - obs.mean()) ** 2).sum()
    return float(1.0 - ((obs - pred) ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan")


def mae(pred, obs) -> float:
    """Mean absolute error over all entries of ``(n_spots, n_genes)`` matrices."""
    pred, obs = _dense_pair(pred, obs)
    return float(np.abs(pred - obs).mean())


def mse(pred, obs) -> float:
    """Mean squared error over all entries of ``(n_spots, n_genes)`` matrices."""
    pred, obs = _dense_pair(pred, obs)
    return float(((pred - obs) ** 2).mean())


def _panel_index(panel, n_genes: int, var_names: Sequence[str] | None, name: str) -> np.ndarray | slice:
    if panel is None:
        return slice(None)
    panel = np.asarray(panel)
    if panel.dtype == bool:
        if panel.shape != (n_genes,):
            raise InputError(f"boolean panel {name!r} has length {panel.size}, expected {n_genes}")
        return np.flatnonzero(panel)
    if panel.dtype.kind in "iu":
        if panel.size and (panel.min() < 0 or panel.max() >= n_genes):
            raise InputError(f"panel {name!r} has gene indices outside [0, {n_genes})")
        return panel
    if var_names is None:
        raise InputError(f"panel {name!r} lists gene names: pass var_names")
    pos = pd.Index(var_names).get_indexer(panel.astype(str))
    if (pos < 0).any():
        missing = panel[pos < 0]
        raise InputError(f"panel {name!r}: {missing.size} genes not in var_names, e.g. {list(missing[:5])}")
    return pos


def regression_metrics(
    pred,
    obs,
    panels: Mapping[str, object] | None = None,
    var_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """All point metrics of :data:`REGRESSION_METRICS` on one or more gene panels.

    Parameters
    ----------
    pred, obs
        Predicted and observed expression in the metric's space, ``(n_spots, n_genes)``,
        dense or sparse.
    panels
        Panel name -> genes: ``None`` (all genes), integer column indices, a boolean mask of
        length ``n_genes``, or gene names (then ``var_names`` is required). Default
        ``{"all": None}``. Metrics are computed on the panel's columns as given (no
        renormalisation within the panel).
    var_names
        Gene names of the columns, length ``n_genes``.

    Returns
    -------
    Tidy DataFrame with columns ``panel``, ``metric``, ``value`` (one row per panel × metric).
    """
    pred, obs = _dense_pair(pred, obs)
    if var_names is not None and len(var_names) != obs.shape[1]:
        raise InputError(f"var_names has {len(var_names)} names for {obs.shape[1]} genes")
    rows = []
    for name, panel in (panels or {"all": None}).items():
        idx = _panel_index(panel, obs.shape[1], var_names, name)
        p, o = pred[:, idx], obs[:, idx]
        values = {
            "pcc_gene": pcc_gene(p, o),
            "pcc_spot": pcc_spot(p, o),
            "r2": r2(p, o),
            "r2_pooled": r2_pooled(p, o),
            "mae": mae(p, o),
            "mse": mse(p, o),
        }
        rows += [{"panel": name, "metric": m, "value": values[m]} for m in REGRESSION_METRICS]
    return pd.DataFrame(rows, columns=["panel", "metric", "value"])
