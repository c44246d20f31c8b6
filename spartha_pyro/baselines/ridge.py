"""Ridge regression from histology features to all genes, the penalty chosen by cross-validation."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from anndata import AnnData

from .._errors import InputError
from ..data import standardize_histology
from ._base import PointPredictor, cv_folds, histology


def _fold_sse(
    x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, alphas: np.ndarray
) -> np.ndarray:
    """Validation sum of squared errors of ridge (with intercept) for every alpha, all genes at once.

    With ``x_tr - mean = U S V^T`` the ridge prediction on a validation spot is
    ``A diag(d) U^T Y`` with ``A = (x_va - mean) V`` and ``d = s / (s^2 + alpha)``, so the
    squared error expands into ``k × k`` quantities computed once per fold; each alpha then
    costs ``O(k^2)`` (``k = min(n_train, n_features)``), whatever the number of genes.
    """
    xm, ym = x_tr.mean(0), y_tr.mean(0, dtype=np.float64)
    u, s, vt = np.linalg.svd(x_tr - xm, full_matrices=False)
    uty = u.T @ (y_tr - ym)  # k × genes
    a = (x_va - xm) @ vt.T  # n_va × k
    r = y_va - ym  # residual of the intercept-only model, n_va × genes
    cross = ((a.T @ r) * uty).sum(1)  # k
    quad = (a.T @ a) * (uty @ uty.T)  # k × k
    base = float((r**2).sum())
    d = s[None, :] / (s[None, :] ** 2 + alphas[:, None])  # alphas × k
    return base - 2.0 * d @ cross + np.einsum("ak,kl,al->a", d, quad, d)


class RidgePredictor(PointPredictor):
    """Ridge regression from standardised histology features to log1p-normalised expression.

    One multi-output solve for all genes via the SVD of the feature matrix; a single penalty
    shared by all genes, chosen by the mean squared error over all genes on held-out folds of
    the training spots (whole sections per fold when ``group_key`` is given).

    Parameters
    ----------
    histology_key
        ``obsm`` key of the histology vector ``X_h`` (spots × features).
    alphas
        Candidate penalties (on standardised features). Default ``logspace(-1, 7, 33)``.
    group_key
        ``obs`` column (e.g. the slide) whose groups are kept together in cross-validation
        (``GroupKFold``); ``None`` uses shuffled ``KFold``.
    n_splits
        Number of folds (capped at the number of groups).
    seed
        Seed of the ``KFold`` shuffle.
    section_key
        ``obs`` column of the section: each section's features are first standardised by
        that section's own mean and sd (an AnnData to predict without the column is one
        section), as ``SPARTHA(histology_scaling="section")`` does, so both see the same
        features. ``None``: raw features.
    """

    def __init__(
        self,
        histology_key: str = "histology",
        alphas: Sequence[float] | None = None,
        group_key: str | None = None,
        n_splits: int = 5,
        seed: int = 0,
        section_key: str | None = None,
    ):
        self.histology_key = histology_key
        self.alphas = np.asarray(alphas if alphas is not None else np.logspace(-1, 7, 33), dtype=np.float64)
        if self.alphas.ndim != 1 or self.alphas.size == 0 or (self.alphas <= 0).any():
            raise InputError("alphas must be a non-empty 1-D sequence of positive penalties")
        self.group_key = group_key
        self.n_splits = n_splits
        self.seed = seed
        self.section_key = section_key

    def _features(self, adata: AnnData, width: int | None = None) -> np.ndarray:
        """The histology features, standardised per section when ``section_key`` is set."""
        x = histology(adata, self.histology_key, width)
        if self.section_key is None:
            return x
        if width is None:  # fitting: training statistics for sections too small for their own
            sd = x.std(0)
            self.raw_mean_, self.raw_scale_ = x.mean(0), np.where(sd > 1e-6, sd, 1.0)
        sections = adata.obs[self.section_key].astype(str).to_numpy() if self.section_key in adata.obs else None
        return standardize_histology(x, np.ones(len(x), bool), sections, self.raw_mean_, self.raw_scale_).astype(np.float64)

    def fit(self, adata: AnnData, layer: str | None = None) -> RidgePredictor:
        """Choose the penalty by cross-validation, then fit on all training spots.

        Parameters
        ----------
        adata
            Training spots: raw counts in ``X`` (or ``layers[layer]``) and ``obsm[histology_key]``.
        layer
            Layer holding the counts; ``None`` uses ``X``.

        Returns
        -------
        ``self``, with ``alpha_``, ``cv_mse_`` (mean squared error per candidate alpha),
        ``coef_`` (float32, ``n_features × n_genes``, on standardised features),
        ``intercept_``, ``x_mean_``, ``x_scale_`` and ``var_names_``.
        """
        x = self._features(adata)
        y = self._fit_target(adata, layer).astype(np.float64)
        self.x_mean_ = x.mean(0)
        sd = x.std(0)
        self.x_scale_ = np.where(sd > 0, sd, 1.0)
        x = (x - self.x_mean_) / self.x_scale_

        sse = np.zeros_like(self.alphas)
        for tr, va in cv_folds(adata, self.n_splits, self.group_key, self.seed):
            sse += _fold_sse(x[tr], y[tr], x[va], y[va], self.alphas)
        self.cv_mse_ = sse / y.size
        best = int(np.argmin(self.cv_mse_))
        self.alpha_ = float(self.alphas[best])
        if best in (0, self.alphas.size - 1):
            warnings.warn(f"RidgePredictor: the chosen alpha {self.alpha_:g} is at the edge of the grid", stacklevel=2)

        self.intercept_ = y.mean(0).astype(np.float32)
        u, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        d = s / (s**2 + self.alpha_)
        self.coef_ = (vt.T @ (d[:, None] * (u.T @ (y - y.mean(0))))).astype(np.float32)
        return self

    def predict(self, adata: AnnData) -> np.ndarray:
        """Predicted log1p-normalised expression, float32 ``(adata.n_obs, n_genes)``; needs only
        ``obsm[histology_key]`` of the same width as in training."""
        self._check_fitted()
        x = self._features(adata, width=self.coef_.shape[0])
        x = ((x - self.x_mean_) / self.x_scale_).astype(np.float32)
        return x @ self.coef_ + self.intercept_
