"""Posterior predictive draws -> summaries in AnnData layers, and draws -> NetCDF.

:meth:`spartha_pyro.SPARTHA.predict_expression` returns draws ``(sample, spot, gene)``.
:func:`summarize_samples` reduces them in the metric's space (log1p of counts per 10,000,
:func:`~spartha_pyro.metrics.normalize_log1p`): the mean of log1p is what the point metrics
score (the log of the mean is not the mean of the log). :func:`write_samples` stores every
draw for later uncertainty analysis.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from anndata import AnnData

from ._errors import InputError
from .io.write import atomic_path
from .metrics.normalize import normalize_log1p

def quantile_layer(q: float) -> str:
    """Layer name of quantile ``q`` (``0.05 -> "q05"``, ``0.5 -> "q50"``, ``0.975 -> "q97.5"``)."""
    return f"q{100 * q:02g}"


def summarize_samples(
    samples: xr.DataArray,
    obs: pd.DataFrame | None = None,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    target_sum: float = 1e4,
    chunk_spots: int = 256,
) -> AnnData:
    """Posterior summaries of predicted expression as an AnnData (spots × genes).

    Parameters
    ----------
    samples
        Sampled counts with dims ``("sample", "spot", "gene")`` (from
        :meth:`~spartha_pyro.SPARTHA.predict_expression` with ``value="counts"``).
    obs
        ``obs`` of the predicted spots (index = the ``spot`` coordinate); default an empty
        frame indexed by the spots.
    quantiles
        Quantiles of the per-spot, per-gene draws to store, each in [0, 1].
    target_sum
        Library size of the log1p normalisation.
    chunk_spots
        Spots summarised at a time (bounds memory for large panels).

    Returns
    -------
    AnnData with ``X`` = posterior mean of log1p-normalised expression (float32), layers
    ``"sd"`` (its posterior sd), one layer per quantile (:func:`quantile_layer`, same
    space) and ``"counts_mean"`` (posterior mean of the counts); ``uns["prediction"]``
    records the quantiles, the space and the attributes of ``samples``.
    """
    if tuple(samples.dims) != ("sample", "spot", "gene"):
        raise InputError(f"samples must have dims ('sample', 'spot', 'gene'), got {samples.dims}")
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise InputError(f"quantiles must be in [0, 1], got {tuple(quantiles)}")
    spots = pd.Index(samples["spot"].values.astype(str))
    if obs is None:
        obs = pd.DataFrame(index=spots)
    elif not obs.index.astype(str).equals(spots):
        raise InputError("obs must be indexed by the predicted spots, in order")
    n_spots, n_genes = samples.sizes["spot"], samples.sizes["gene"]
    layers = {name: np.empty((n_spots, n_genes), np.float32) for name in ("mean", "sd", "counts_mean")}
    layers.update({quantile_layer(q): np.empty((n_spots, n_genes), np.float32) for q in quantiles})
    for start in range(0, n_spots, chunk_spots):
        rows = slice(start, start + chunk_spots)
        chunk = samples[:, rows].values  # a file-backed array (predict_expression(out=...)) is read chunk by chunk
        y = normalize_log1p(chunk, target_sum, dtype=np.float32)
        layers["mean"][rows] = y.mean(0)
        layers["sd"][rows] = y.std(0)
        layers["counts_mean"][rows] = chunk.mean(0)
        if len(quantiles):
            for q, v in zip(quantiles, np.quantile(y, list(quantiles), axis=0)):
                layers[quantile_layer(q)][rows] = v
    X = layers.pop("mean")
    out = AnnData(X=X, obs=obs.copy(), var=pd.DataFrame(index=pd.Index(samples["gene"].values.astype(str))), layers=layers)
    out.uns["prediction"] = {
        "space": f"log1p(counts per {target_sum:g})",
        "quantiles": [float(q) for q in quantiles],
        "num_samples": int(samples.sizes["sample"]),
        **{k: str(v) for k, v in samples.attrs.items()},
    }
    return out


def write_samples(samples: xr.DataArray, path: str | os.PathLike) -> Path:
    """Write every posterior draw to a compressed NetCDF-4 file, atomically.

    Parameters
    ----------
    samples
        Draws with dims ``("sample", "spot", "gene")``.
    path
        Destination ``.nc`` file.

    Returns
    -------
    The destination path.
    """
    path = Path(path)
    if path.suffix != ".nc":
        raise InputError(f"samples file must end in .nc (NetCDF), got {str(path)!r}")
    ds = samples.to_dataset(name=samples.name or "expression")
    ds.attrs = {k: str(v) for k, v in samples.attrs.items()}
    encoding = {name: {"zlib": True, "complevel": 4} for name in ds.data_vars}
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    return path


def read_samples(path: str | os.PathLike) -> xr.DataArray:
    """Read draws written by :func:`write_samples` (loaded into memory).

    Parameters
    ----------
    path
        A ``.nc`` file.

    Returns
    -------
    The DataArray with dims ``("sample", "spot", "gene")``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"samples file {str(path)!r} does not exist")
    try:
        with xr.open_dataset(path, engine="netcdf4") as ds:
            return ds[next(iter(ds.data_vars))].load()
    except (OSError, ValueError, StopIteration) as err:
        raise InputError(f"{str(path)!r} is not a NetCDF file of samples: {err}") from None
