"""How much each latent space knows about each factor: linear probes and silhouettes.

A disentangled model shows a diagonal pattern: ``Z_y`` predicts cell type but not slide,
``Z_d`` the slide, ``Z_r`` the QC/artifact label.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, silhouette_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .._errors import InputError


def _labels(values) -> np.ndarray:
    """Labels as an object array of strings, ``None`` where missing (NaN/None)."""
    s = pd.Series(np.asarray(values, dtype=object))
    return np.where(s.notna().to_numpy(), s.astype(str).to_numpy(dtype=object), None)


def _positions(idx, known: np.ndarray) -> np.ndarray:
    """Integer positions of ``idx`` (indices or a boolean mask) whose label is known."""
    idx = np.asarray(idx)
    pos = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
    return pos[known[pos]]


def _check(latents: Mapping[str, np.ndarray], factors: Mapping[str, object]) -> tuple[dict, dict, int]:
    if not latents or not factors:
        raise InputError("latents and factors must both be non-empty")
    lat = {k: np.asarray(v, dtype=np.float64) for k, v in latents.items()}
    fac = {k: _labels(v) for k, v in factors.items()}
    n = {len(v) for v in [*lat.values(), *fac.values()]}
    if len(n) != 1:
        raise InputError(f"latents and factors must have the same number of spots, got lengths {sorted(n)}")
    for k, v in lat.items():
        if v.ndim != 2:
            raise InputError(f"latent {k!r} must be 2-D (n_spots, dim), got shape {v.shape}")
    return lat, fac, n.pop()


def probe_matrix(
    latents: Mapping[str, np.ndarray],
    factors: Mapping[str, object],
    train_idx,
    test_idx,
    max_iter: int = 2000,
    seed: int = 0,
) -> xr.DataArray:
    """Balanced accuracy of a linear probe from each latent to each factor.

    A logistic regression on standardised latent coordinates is fit on the training spots
    and scored on the held-out spots.

    Parameters
    ----------
    latents
        Name -> latent means, ``(n_spots, dim)``.
    factors
        Name -> labels per spot, length ``n_spots`` (any hashable values; NaN/None = missing:
        such spots are left out of that factor's fit and score).
    train_idx, test_idx
        Integer indices (or boolean masks) of the spots to fit and to score on.
    max_iter
        Iterations of the lbfgs solver.
    seed
        Random state of the classifier.

    Returns
    -------
    DataArray of balanced accuracy in [0, 1], dims ``("latent", "factor")``, with coordinate
    ``chance`` (``1 / n_classes`` among the test labels) along ``factor``. NaN where the
    training spots hold a single class.
    """
    lat, fac, _ = _check(latents, factors)
    out = np.full((len(lat), len(fac)), np.nan)
    chance = []
    for j, y in enumerate(fac.values()):
        known = np.array([v is not None for v in y])
        tr, te = _positions(train_idx, known), _positions(test_idx, known)
        y_tr, y_te = y[tr].astype(str), y[te].astype(str)
        chance.append(1.0 / max(len(np.unique(y_te)), 1))
        if len(np.unique(y_tr)) < 2 or len(y_te) == 0:
            continue
        for i, z in enumerate(lat.values()):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
            clf.fit(z[tr], y_tr)
            out[i, j] = balanced_accuracy_score(y_te, clf.predict(z[te]))
    return xr.DataArray(
        out,
        dims=("latent", "factor"),
        coords={"latent": list(lat), "factor": list(fac), "chance": ("factor", chance)},
        name="balanced_accuracy",
    )


def silhouette_matrix(
    latents: Mapping[str, np.ndarray],
    factors: Mapping[str, object],
    max_spots: int = 2000,
    seed: int = 0,
) -> xr.DataArray:
    """Silhouette width of each factor's labels in each latent space (Euclidean).

    Parameters
    ----------
    latents
        Name -> latent means, ``(n_spots, dim)``.
    factors
        Name -> labels per spot, length ``n_spots`` (NaN/None = missing, left out).
    max_spots
        At most this many spots, drawn once without replacement (same subsample for every
        cell), keep it fast.
    seed
        Seed of the subsample.

    Returns
    -------
    DataArray in [-1, 1], dims ``("latent", "factor")``; NaN where the subsample holds fewer
    than two labels of a factor.
    """
    lat, fac, n = _check(latents, factors)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=min(n, max_spots), replace=False))
    out = np.full((len(lat), len(fac)), np.nan)
    for j, y in enumerate(fac.values()):
        sub = _positions(idx, np.array([v is not None for v in y]))
        labels = y[sub].astype(str)
        if not 2 <= len(np.unique(labels)) < len(sub):
            continue
        for i, z in enumerate(lat.values()):
            out[i, j] = silhouette_score(z[sub], labels)
    return xr.DataArray(
        out, dims=("latent", "factor"), coords={"latent": list(lat), "factor": list(fac)}, name="silhouette"
    )
