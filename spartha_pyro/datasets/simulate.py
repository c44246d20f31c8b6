"""A spatial transcriptomics + histology simulator with known factors.

Generative process, per slide ``s`` (a batch) on a square spot grid:

1. Cell type ``c`` of each spot: nearest of ``n_cell_types``-coloured random centres
   (spatially coherent regions, as in tissue).
2. Artifact indicator ``a``: spots inside a few random discs (tissue folds, detachment)
   plus a sprinkling of isolated spots, about ``artifact_rate`` of all spots.
3. Expression: ``log rho = base + type_effect[c] + slide_effect[s] + a * degradation``
   normalised by softmax over genes; library size
   ``log l ~ N(log depth[s] + a * log(capture_loss), 0.3)``; counts ``x ~ NB(l * rho, theta)``.
   The degradation signature raises mitochondrial genes and flattens the profile, so the
   standard MAD QC flags most artifact spots.
4. Histology: ``x_h = tanh(A_c) + B_s + a * C + noise`` with random vectors per cell type,
   slide and artifact — a nonlinear, noisy view of the same factors.

The truth is stored in ``obs`` (``cell_type``, ``slide``, ``true_artifact``), so tests can
check that the latents recover it, and ``layers["clean"]`` holds each spot's artifact-free
expected expression (counts per 10,000 of ``softmax(base + type_effect + slide_effect)``):
the truth that artifact-free generation (``artifact="pass"``) is scored against.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def simulate(
    n_spots: int = 2000,
    n_genes: int = 1000,
    n_slides: int = 3,
    n_cell_types: int = 4,
    histology_dim: int = 64,
    artifact_rate: float = 0.15,
    n_mt_genes: int = 13,
    depth: float = 3000.0,
    dispersion: float = 5.0,
    seed: int = 0,
) -> AnnData:
    """Simulate spots with cell types, slides and artifacts.

    Parameters
    ----------
    n_spots
        Total number of spots, split evenly over slides.
    n_genes
        Number of genes; the first ``n_mt_genes`` are named ``MT-...``.
    n_slides
        Number of slides (batches); each gets its own depth and expression/histology shift.
    n_cell_types
        Number of cell types (spatial regions).
    histology_dim
        Width of the histology vector in ``obsm["histology"]``.
    artifact_rate
        Approximate share of artifact spots (low capture, degraded profile, shifted image).
    depth
        Median UMI per spot on an average slide.
    dispersion
        NB inverse dispersion ``theta`` (larger = closer to Poisson).
    seed
        Seed of the numpy generator; same seed, same data.

    Returns
    -------
    AnnData with integer CSR counts in ``X`` (spots × genes), ``obs`` columns ``slide``,
    ``cell_type``, ``true_artifact`` (bool), ``obsm["spatial"]`` (grid coordinates),
    ``obsm["histology"]`` (float32, ``n_spots × histology_dim``) and ``layers["clean"]``
    (float32, artifact-free expected counts per 10,000; dense).
    """
    if n_spots < n_slides or n_genes < n_mt_genes + 2:
        raise ValueError("need at least one spot per slide and more genes than MT genes")
    rng = np.random.default_rng(seed)
    per_slide = np.full(n_slides, n_spots // n_slides)
    per_slide[: n_spots % n_slides] += 1

    base = rng.normal(0.0, 1.0, n_genes)
    base[:n_mt_genes] += 1.0
    type_effect = rng.normal(0.0, 1.0, (n_cell_types, n_genes)) * (rng.random((n_cell_types, n_genes)) < 0.2)
    slide_effect = rng.normal(0.0, 0.3, (n_slides, n_genes))
    degradation = np.zeros(n_genes)
    degradation[:n_mt_genes] = 2.0  # leaked mitochondrial transcripts
    slide_depth = depth * np.exp(rng.normal(0.0, 0.4, n_slides))
    capture_loss = 0.15

    type_centres_h = rng.normal(0.0, 1.5, (n_cell_types, histology_dim))
    slide_shift_h = rng.normal(0.0, 0.7, (n_slides, histology_dim))
    artifact_shift_h = rng.normal(0.0, 1.5, histology_dim)

    obs, coords, counts, hist, clean = [], [], [], [], []
    for s, n in enumerate(per_slide):
        side = int(np.ceil(np.sqrt(n)))
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n].astype(float)
        centres = rng.uniform(0, side, (3 * n_cell_types, 2))
        centre_type = np.concatenate([np.arange(n_cell_types), rng.integers(0, n_cell_types, 2 * n_cell_types)])
        nearest = ((grid[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        cell_type = centre_type[nearest]

        artifact = rng.random(n) < artifact_rate / 3
        for _ in range(2):
            c, r = rng.uniform(0, side, 2), np.sqrt(artifact_rate / 3 * n / np.pi)
            artifact |= ((grid - c) ** 2).sum(1) < r**2

        clean_logits = base + type_effect[cell_type] + slide_effect[s]
        clean_rho = np.exp(clean_logits - clean_logits.max(1, keepdims=True))
        clean.append((1e4 * clean_rho / clean_rho.sum(1, keepdims=True)).astype(np.float32))
        logits = clean_logits + artifact[:, None] * degradation
        logits = logits + artifact[:, None] * rng.normal(0.0, 0.5, (n, n_genes))  # degraded = noisier
        rho = np.exp(logits - logits.max(1, keepdims=True))
        rho /= rho.sum(1, keepdims=True)
        lib = np.exp(np.log(slide_depth[s]) + artifact * np.log(capture_loss) + rng.normal(0.0, 0.3, n))
        mu = lib[:, None] * rho
        x = rng.poisson(rng.gamma(dispersion, mu / dispersion))
        counts.append(sp.csr_matrix(x.astype(np.int32)))

        h = np.tanh(type_centres_h[cell_type]) * 2.0 + slide_shift_h[s] + artifact[:, None] * artifact_shift_h
        hist.append((h + rng.normal(0.0, 0.5, h.shape)).astype(np.float32))
        coords.append(grid)
        obs.append(
            pd.DataFrame(
                {
                    "slide": f"slide{s}",
                    "cell_type": [f"type{c}" for c in cell_type],
                    "true_artifact": artifact,
                },
                index=[f"s{s}_spot{i}" for i in range(n)],
            )
        )

    obs_df = pd.concat(obs)
    for col in ("slide", "cell_type"):
        obs_df[col] = obs_df[col].astype("category")
    var = pd.DataFrame(index=[f"MT-{i}" for i in range(n_mt_genes)] + [f"gene{i}" for i in range(n_genes - n_mt_genes)])
    adata = AnnData(X=sp.vstack(counts).tocsr(), obs=obs_df, var=var)
    adata.layers["clean"] = np.concatenate(clean)
    adata.obsm["spatial"] = np.concatenate(coords)
    adata.obsm["histology"] = np.concatenate(hist)
    adata.uns["simulation"] = {"seed": seed, "artifact_rate": artifact_rate, "depth": depth}
    return adata
