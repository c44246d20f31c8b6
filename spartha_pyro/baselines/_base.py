"""What the point predictors share: the target space and input checks."""
from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.model_selection import GroupKFold, KFold

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


def cv_folds(adata: AnnData, n_splits: int, group_key: str | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, validation)`` spot indices of cross-validation folds over ``adata``.

    Shuffled ``KFold`` when ``group_key`` is ``None``; otherwise ``GroupKFold`` keeping each
    group of ``obs[group_key]`` (e.g. a slide) in one fold, ``n_splits`` capped at the
    number of groups.
    """
    n = adata.n_obs
    if group_key is None:
        if n < 2 * n_splits:
            raise InputError(f"too few spots ({n}) for {n_splits}-fold cross-validation")
        return list(KFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(n)))
    if group_key not in adata.obs:
        raise InputError(f"group_key {group_key!r} is not a column of adata.obs")
    groups = adata.obs[group_key].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise InputError(f"group_key {group_key!r} has a single group: cannot hold one out")
    return list(GroupKFold(min(n_splits, n_groups)).split(np.zeros(n), groups=groups))
