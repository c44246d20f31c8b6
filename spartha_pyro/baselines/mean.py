"""The floor: predict the training mean for every spot."""
from __future__ import annotations

import numpy as np
from anndata import AnnData

from ._base import PointPredictor


class MeanPredictor(PointPredictor):
    """Predicts the training mean of log1p-normalised expression for every spot.

    Scores 0 per-gene PCC by construction; its per-spot PCC shows how much of that metric
    is just which genes are highly expressed.
    """

    def fit(self, adata: AnnData, layer: str | None = None) -> MeanPredictor:
        """Fit on training spots.

        Parameters
        ----------
        adata
            Raw counts in ``X`` (or ``layers[layer]``), training spots × genes.
        layer
            Layer holding the counts; ``None`` uses ``X``.

        Returns
        -------
        ``self``, with ``mean_`` (float32, length ``n_genes``) and ``var_names_``.
        """
        self.mean_ = self._fit_target(adata, layer).mean(0)
        return self

    def predict(self, adata: AnnData) -> np.ndarray:
        """Training mean repeated for each spot of ``adata``: float32 ``(adata.n_obs, n_genes)``."""
        self._check_fitted()
        return np.tile(self.mean_, (adata.n_obs, 1))
