"""Gene panels chosen on training sections only."""
from __future__ import annotations

import numpy as np
import scanpy as sc
from anndata import AnnData

from .._errors import InputError
from .._threads import keep_torch_threads
from .normalize import normalize_log1p


def hvg_panel(
    adata_train: AnnData,
    n_top: int = 2500,
    batch_key: str | None = None,
    layer: str | None = None,
) -> list[str]:
    """Top highly variable genes of the TRAINING spots.

    Uses scanpy's ``highly_variable_genes(flavor="seurat")`` on log1p-normalised counts
    (:func:`normalize_log1p`, 10,000 per spot): the same space the metrics are scored in,
    and no extra dependency (``"seurat_v3"`` on raw counts needs ``scikit-misc``). Pass only
    training sections so that the panel does not peek at the test section.

    Parameters
    ----------
    adata_train
        Raw counts in ``X`` (or ``layers[layer]``), training spots × genes.
    n_top
        Panel size (capped at the number of genes).
    batch_key
        Optional ``obs`` column: genes are then ranked by the number of batches in which
        they are variable, then by normalised dispersion (scanpy's batch-aware ranking).
    layer
        Layer holding the counts; ``None`` uses ``X``.

    Returns
    -------
    Gene names, most variable first, length ``min(n_top, n_genes)``.
    """
    if n_top < 1:
        raise InputError(f"n_top must be at least 1, got {n_top}")
    if batch_key is not None and batch_key not in adata_train.obs:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs")
    counts = adata_train.X if layer is None else adata_train.layers[layer]
    ad = AnnData(X=normalize_log1p(counts, dtype=np.float32), obs=adata_train.obs[[]].copy())
    ad.var_names = adata_train.var_names
    if batch_key is not None:
        ad.obs[batch_key] = adata_train.obs[batch_key].astype(str).to_numpy()
    n_top = min(n_top, ad.n_vars)
    with keep_torch_threads():
        sc.pp.highly_variable_genes(ad, flavor="seurat", n_top_genes=n_top, batch_key=batch_key)
    var = ad.var[ad.var["highly_variable"]]
    keys = ["dispersions_norm"] if batch_key is None else ["highly_variable_nbatches", "dispersions_norm"]
    var = var.sort_values(keys, ascending=False)
    return list(var.index[:n_top])
