"""Shared pieces of the speed benchmarks: a fast sparse simulator and the timed SVI loop.

Imports stay light (torch, numpy, scipy, pandas, anndata, pyro and the SPARTHA core only; no
scanpy), so the benchmarks run on a bare GPU machine.
"""
from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from spartha_pyro.loaders import Batch
from spartha_pyro.model import SPARTHA


def synthetic_adata(
    n_spots: int,
    n_genes: int,
    density: float = 0.1,
    depth: float = 4000.0,
    histology_dim: int = 64,
    n_slides: int = 4,
    n_cell_types: int = 5,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> AnnData:
    """Spots with Visium-like sparse counts, generated directly as CSR in ``O(nnz)``.

    Each spot detects ``Binomial(G, density_s)`` genes, with ``density_s`` log-normal around
    ``density`` (capped at 1); its detected genes are an evenly strided set from a random
    offset (distinct, so no duplicate merging is needed) and their counts are geometric (on
    1, 2, ...) with mean ``depth / nnz_s``. Histology is Gaussian with a cell-type shift;
    labels, slides and QC (10 % fail) are random. The ``O(nnz)`` arrays are drawn with torch
    on ``device`` (default: CUDA when available; multi-threaded on CPU), ~1 s for 100k × 36k
    on a GPU.

    Returns
    -------
    AnnData with float32 CSR ``X`` ``(n_spots, n_genes)``, ``obs`` columns ``cell_type``,
    ``slide``, ``qc_pass`` and ``obsm["histology"]`` ``(n_spots, histology_dim)``.
    """
    rng = np.random.default_rng(seed)
    dens = np.minimum(density * np.exp(rng.normal(0.0, 0.3, n_spots)), 1.0)
    nnz_np = np.maximum(rng.binomial(n_genes, dens), 1).astype(np.int64)
    indptr = np.concatenate([[0], np.cumsum(nnz_np)])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(dev).manual_seed(seed)
    offset = torch.randint(0, n_genes, (n_spots,), generator=gen, device=dev)
    # geometric on {1, 2, ...} with mean depth / nnz, by inversion: 1 + floor(log U / log(1 - p))
    p = 1.0 / np.maximum(depth / nnz_np, 1.0 + 1e-3)
    inv_log_q = torch.from_numpy(1.0 / np.log1p(-p)).float().to(dev)
    nnz = torch.from_numpy(nnz_np).to(dev)
    values = np.empty(int(indptr[-1]), dtype=np.float32)
    cols = np.empty(int(indptr[-1]), dtype=np.int32)
    # spots in chunks of ~2**25 non-zeros: the int64 temporaries stay ~256 MB each instead of
    # several copies of the whole data set (17.8 GB peak at 100k x 36k before)
    bounds = np.searchsorted(indptr, np.arange(0, indptr[-1], 2**25), side="right") - 1
    for a, b in zip(bounds, [*bounds[1:], n_spots]):
        if a == b:
            continue
        lo, hi = int(indptr[a]), int(indptr[b])
        row = torch.repeat_interleave(torch.arange(a, b, device=dev), nnz[a:b])
        k = torch.arange(lo, hi, device=dev) - torch.from_numpy(indptr[a:b]).to(dev)[row - a]
        cols[lo:hi] = ((offset[row] + k * n_genes // nnz[row]) % n_genes).to(torch.int32).cpu().numpy()
        u = torch.rand(hi - lo, generator=gen, device=dev).clamp_(min=1e-30)
        values[lo:hi] = (torch.floor(u.log_() * inv_log_q[row]) + 1.0).cpu().numpy()
    X = sp.csr_matrix((values, cols, indptr), shape=(n_spots, n_genes))
    cell_type = rng.integers(0, n_cell_types, n_spots)
    centres = rng.normal(0.0, 1.0, (n_cell_types, histology_dim)).astype(np.float32)
    hist = centres[cell_type] + rng.normal(0.0, 1.0, (n_spots, histology_dim)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{c}" for c in cell_type]),
            "slide": pd.Categorical([f"slide{s}" for s in np.arange(n_spots) % n_slides]),
            "qc_pass": rng.random(n_spots) > 0.1,
        },
        index=pd.RangeIndex(n_spots).astype(str),
    )
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.obsm["histology"] = hist
    return adata


def build_model(adata: AnnData, **config) -> SPARTHA:
    """The benchmarked SPARTHA: one label set, slides as batches, QC artifact latent; ``config``:
    :class:`~spartha_pyro.config.ModelConfig` fields (defaults there)."""
    return SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", qc_key="qc_pass", **config)


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU) so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    step: Callable[[Batch], torch.Tensor], batches: Iterator[Batch], device: torch.device, warmup: int, max_steps: int
) -> tuple[int, float]:
    """Run ``step`` on minibatches; ``(spots, seconds)`` over the steps after ``warmup``."""
    spots, start, done = 0, None, 0
    for batch in batches:
        if done == warmup:
            sync(device)
            start = time.perf_counter()
        step(batch)
        done += 1
        if done > warmup:
            spots += len(batch.index)
        if done >= warmup + max_steps:
            break
    sync(device)
    if start is None:
        raise ValueError(f"only {done} minibatches, need more than warmup={warmup}")
    return spots, time.perf_counter() - start


def peak_host_mb() -> float:
    """Peak resident set size of this process, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:<GPU name>"`` for the result tables."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
