"""What the point predictors share: the target space and input checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._errors import InputError
from ..metrics.normalize import normalize_log1p


class PointPredictor:
    """Base of the baselines: ``fit(adata_train)`` then ``predict(adata) -> (n_spots, n_genes)``.

    Predictions are log1p-normalised expression (10,000 counts per spot) on the training
    genes, in the order of :attr:`var_names_`.
    """

    var_names_: pd.Index

    def _fit_target(self, adata: AnnData, layer: str | None) -> np.ndarray:
        """Store the training genes; return their log1p-normalised expression, float32 dense."""
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise InputError(f"training data must have spots and genes, got shape {adata.shape}")
        if layer is not None and layer not in adata.layers:
            raise InputError(f"layer {layer!r} is not in adata.layers")
        counts = adata.X if layer is None else adata.layers[layer]
        if counts is None:
            raise InputError("training data has no counts in adata.X")
        y = normalize_log1p(counts, dtype=np.float32)
        self.var_names_ = adata.var_names.copy()
        return y.toarray() if hasattr(y, "toarray") else y

    def _check_fitted(self) -> None:
        if not hasattr(self, "var_names_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(adata_train) first")


def histology(adata: AnnData, key: str, width: int | None = None) -> np.ndarray:
    """``adata.obsm[key]`` as float64 ``(n_spots, width)``, checked for presence, width and finiteness."""
    if key not in adata.obsm:
        raise InputError(f"histology key {key!r} is not in adata.obsm (have {list(adata.obsm)})")
    x = np.asarray(adata.obsm[key], dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"adata.obsm[{key!r}] must be 2-D (spots × features), got shape {x.shape}")
    if width is not None and x.shape[1] != width:
        raise InputError(f"adata.obsm[{key!r}] has {x.shape[1]} features, the model was fit on {width}")
    if not np.isfinite(x).all():
        raise InputError(f"adata.obsm[{key!r}] holds NaN or infinite values")
    return x
