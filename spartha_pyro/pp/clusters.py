"""Biology labels from expression when none are given: clusters of the training spots.

SPARTHA's biological latent ``Z_y`` needs a label set ``L_y``. Without one (a new dataset,
another organism) :func:`expression_clusters` derives it from the training sections'
expression alone: log-normalised counts, highly variable genes, each section centred on
its own mean (so that clusters follow tissue regions, not sections or patients), PCA, and
k-means with the number of clusters chosen by the silhouette score. Prediction needs no
labels: the histology path infers ``Z_y`` from the image.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scanpy as sc
from anndata import AnnData
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score

from .._errors import InputError
from .._threads import keep_torch_threads


def expression_clusters(
    adata: AnnData,
    batch_key: str | None = None,
    n_clusters: int | tuple[int, int] = (3, 12),
    n_top_genes: int = 2000,
    n_pcs: int = 30,
    layer: str | None = None,
    key_added: str = "spartha_cluster",
    seed: int = 0,
) -> dict:
    """Cluster spots by expression and write the labels to ``adata.obs[key_added]``.

    Parameters
    ----------
    adata
        Spots × genes with raw counts in ``X`` (or ``layers[layer]``). Spots without counts
        (all-zero rows) get a missing label.
    batch_key
        ``obs`` column of the section: each section's log-normalised expression is centred on
        its own mean before PCA (a simple batch correction).
    n_clusters
        A number of clusters, or a ``(min, max)`` range searched by silhouette score.
    n_top_genes, n_pcs
        Highly variable genes (Seurat flavour) and principal components clustered.
    key_added
        ``obs`` column written: categorical ``"c0"``, ``"c1"`` … (missing where no counts).
    seed
        Seed of PCA and k-means.

    Returns
    -------
    ``{"key", "n_clusters", "silhouette", "scores", "n_top_genes", "n_pcs"}``: what was chosen
    (``scores``: silhouette per candidate number of clusters).
    """
    counts = adata.X if layer is None else adata.layers[layer]
    totals = np.asarray(counts.sum(1)).ravel()
    has = totals > 0
    if has.sum() < 10:
        raise InputError(f"expression_clusters needs at least 10 spots with counts, got {int(has.sum())}")
    sub = AnnData(X=counts[has].astype(np.float32), obs=pd.DataFrame(index=adata.obs_names[has]))
    sub.var_names = adata.var_names
    n_top = min(n_top_genes, sub.n_vars)
    with keep_torch_threads():
        sc.pp.normalize_total(sub, target_sum=1e4)
        sc.pp.log1p(sub)
        sc.pp.highly_variable_genes(sub, n_top_genes=n_top, flavor="seurat")
    x = sub[:, sub.var["highly_variable"].to_numpy()].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    if batch_key is not None:
        sections = adata.obs[batch_key].astype(str).to_numpy()[has]
        for s in np.unique(sections):
            rows = sections == s
            x[rows] -= x[rows].mean(0)
    x /= np.where(x.std(0) > 0, x.std(0), 1.0)
    n_comp = max(2, min(n_pcs, x.shape[0] - 1, x.shape[1] - 1))
    with keep_torch_threads():
        pcs = sc.pp.pca(x, n_comps=n_comp, random_state=seed)
    lo, hi = (n_clusters, n_clusters) if isinstance(n_clusters, int) else n_clusters
    hi = min(hi, len(pcs) - 1)
    if lo < 2 or hi < lo:
        raise InputError(f"n_clusters must be >= 2 and at most n_spots - 1, got {n_clusters}")
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(pcs), min(len(pcs), 5000), replace=False)
    fits, scores = {}, {}
    for k in range(lo, hi + 1):
        fits[k] = KMeans(k, n_init=10, random_state=seed).fit_predict(pcs)
        scores[k] = float(silhouette_score(pcs[sample], fits[k][sample])) if len(np.unique(fits[k][sample])) > 1 else -1.0
    best = max(scores, key=scores.get)
    labels = pd.Series(pd.NA, index=adata.obs_names, dtype="object")
    labels[has] = [f"c{c}" for c in fits[best]]
    adata.obs[key_added] = pd.Categorical(labels, categories=[f"c{c}" for c in range(best)])
    return {"key": key_added, "n_clusters": best, "silhouette": scores[best], "scores": scores,
            "n_top_genes": n_top, "n_pcs": n_comp}
