"""Statistics that fit a held-out-section design.

The unit of replication in a spatial benchmark is the **section**, not the spot or the seed:
seed-to-seed sd measures optimiser noise, and spots of one section are spatially correlated.
Three tools:

- :func:`paired_sign_flip_test` — a permutation test over sections of per-section paired
  differences (method A minus method B). Exact (all ``2**n`` sign patterns) for small ``n``.
  With ``n`` sections the smallest attainable p-value is ``2 / 2**n`` two-sided and
  ``1 / 2**n`` one-sided: with 5 sections 0.0625 and 0.03125, so a two-sided test over five
  sections can never reach p < 0.05, whatever the margins.
- :func:`block_bootstrap_ci` — within one section, a spatial block-bootstrap confidence
  interval of the difference in mean per-gene PCC between two predictions; square tiles of
  the spot coordinates are resampled with replacement, so spatially correlated spots move
  together.
- :func:`qc_fidelity` — an energy distance between the distributions of per-spot QC metrics
  (log library size, log detected genes, top-20-gene share, mitochondrial share where
  ``MT-``/``mt-`` genes exist) of generated and real spots, each metric standardised by the
  real spots' sd. Lower is better; 0 means the same distribution. Unlike QCPR (the share of
  generated spots inside the real spots' MAD bounds), a bland generator that puts every spot
  near the median does not win it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import scipy.sparse as sp
import xarray as xr

from .._errors import InputError

ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True)
class SignFlipResult:
    """Result of :func:`paired_sign_flip_test`.

    ``statistic``: the mean paired difference; ``p_value``; ``n``: number of (non-NaN)
    differences; ``exact``: whether all ``2**n`` sign patterns were enumerated;
    ``min_p_value``: the smallest p-value the test can give with this ``n``.
    """

    statistic: float
    p_value: float
    n: int
    exact: bool
    min_p_value: float
    alternative: str


def paired_sign_flip_test(
    diffs: Sequence[float],
    alternative: str = "two-sided",
    n_perm: int = 100_000,
    seed: int = 0,
) -> SignFlipResult:
    """Sign-flip permutation test that the mean of paired differences is zero.

    Under the null hypothesis that methods A and B are exchangeable within each section, the
    sign of each section's difference ``A - B`` is equally likely to be + or -; the p-value is
    the share of sign patterns whose mean difference is at least as extreme as the observed.

    Parameters
    ----------
    diffs
        One paired difference per section (e.g. per-gene PCC of A minus that of B, averaged
        over seeds). NaNs are dropped.
    alternative
        ``"two-sided"`` (default), ``"greater"`` (A better: mean > 0) or ``"less"``.
    n_perm
        Exact enumeration when ``2**n <= n_perm``; otherwise ``n_perm`` random sign patterns
        (plus the observed one, so p is never 0).
    seed
        Seed of the random sign patterns (unused when exact).

    Returns
    -------
    :class:`SignFlipResult`. With ``n`` sections the smallest p-value is ``2 / 2**n``
    two-sided and ``1 / 2**n`` one-sided (5 sections: 0.0625 and 0.03125); all-zero
    differences give p = 1.
    """
    if alternative not in ALTERNATIVES:
        raise InputError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    if n_perm < 1:
        raise InputError(f"n_perm must be at least 1, got {n_perm}")
    d = np.asarray(diffs, dtype=np.float64).ravel()
    d = d[~np.isnan(d)]
    n = d.size
    if n == 0:
        raise InputError("paired_sign_flip_test needs at least one non-NaN difference")
    observed = d.mean()
    exact = 2**n <= n_perm
    if exact:
        signs = np.array(list(product((1.0, -1.0), repeat=n)))
    else:
        rng = np.random.default_rng(seed)
        signs = np.vstack([np.ones(n), rng.choice((1.0, -1.0), size=(n_perm, n))])
    null = signs @ d / n
    tol = 1e-12 * max(1.0, np.abs(d).max())
    if alternative == "greater":
        hits = null >= observed - tol
    elif alternative == "less":
        hits = null <= observed + tol
    else:
        hits = np.abs(null) >= abs(observed) - tol
    min_p = (1.0 if alternative != "two-sided" else 2.0) / 2**n
    return SignFlipResult(float(observed), float(hits.mean()), n, exact, float(min(1.0, min_p)), alternative)


@dataclass(frozen=True)
class BootstrapCI:
    """Result of :func:`block_bootstrap_ci`.

    ``estimate``: the difference in mean per-gene PCC (A minus B) on all spots;
    ``ci_low``/``ci_high``: the percentile interval; ``level``; ``n_blocks``: non-empty tiles;
    ``block_size``: tile side in coordinate units; ``n_boot``: replicates; ``n_genes``: genes
    with observed variance on all spots.
    """

    estimate: float
    ci_low: float
    ci_high: float
    level: float
    n_blocks: int
    block_size: float
    n_boot: int
    n_genes: int


def _tiles(coords: np.ndarray, block_size: float) -> np.ndarray:
    """Tile index (0..n_blocks-1) of each spot for square tiles of side ``block_size``."""
    cell = np.floor((coords - coords.min(0)) / block_size).astype(np.int64)
    _, inverse = np.unique(cell, axis=0, return_inverse=True)
    return inverse.ravel()


def _dense(x) -> np.ndarray:
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return x.astype(np.float64, copy=False)


def _pcc_from_sums(n, sp_, so, spp, soo, spo):
    """Per-gene PCC from sums (n, Σp, Σo, Σp², Σo², Σpo); NaN where obs is constant, 0 where
    only the prediction is constant (the convention of :func:`~spartha_pyro.metrics.pcc_gene`)."""
    cov = n * spo - sp_ * so
    vp = n * spp - sp_**2
    vo = n * soo - so**2
    scale_o = np.maximum(1.0, np.abs(so)) ** 2
    scale_p = np.maximum(1.0, np.abs(sp_)) ** 2
    obs_const = vo <= 1e-10 * scale_o
    pred_const = vp <= 1e-10 * scale_p
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(np.maximum(vp, 0.0) * np.maximum(vo, 0.0))
    r = np.where(pred_const, 0.0, np.clip(r, -1.0, 1.0))
    return np.where(obs_const, np.nan, r)


def block_bootstrap_ci(
    pred_a,
    pred_b,
    obs,
    coords,
    block_size: float | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 100,
) -> BootstrapCI:
    """Spatial block-bootstrap CI of ``mean per-gene PCC(A) - mean per-gene PCC(B)`` in one section.

    The spots are cut into square tiles of side ``block_size`` in the units of ``coords``;
    each replicate draws as many tiles as there are, with replacement, and recomputes every
    gene's PCC of both predictions against the observed values on the spots of the drawn
    tiles (a tile drawn twice counts twice). Replicates are computed from per-tile sums, so
    the cost is ``O(n_boot × n_blocks × n_genes)`` in vectorised numpy. The mean is over the
    genes with observed variance in that replicate, the same genes for A and B.

    Parameters
    ----------
    pred_a, pred_b, obs
        ``(n_spots, n_genes)`` predictions of methods A and B and the observed values, in the
        metric's space (e.g. :func:`~spartha_pyro.metrics.normalize_log1p`), dense or sparse.
    coords
        ``(n_spots, 2)`` spot coordinates (e.g. array grid positions).
    block_size
        Tile side in coordinate units; default a fifth of the larger side of the coordinates'
        bounding box (about 25 tiles over a square section).
    n_boot
        Bootstrap replicates.
    level
        Coverage of the percentile interval.
    seed
        Seed of the tile draws.
    chunk
        Replicates computed at a time (bounds memory: ``chunk × n_genes`` floats per array).

    Returns
    -------
    :class:`BootstrapCI`; ``ci_low``/``ci_high`` are NaN when fewer than 2 tiles exist.
    """
    a, b, o = _dense(pred_a), _dense(pred_b), _dense(obs)
    if a.ndim != 2 or a.shape != o.shape or b.shape != o.shape:
        raise InputError(f"pred_a, pred_b and obs must be 2-D of one shape, got {a.shape}, {b.shape}, {o.shape}")
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[0] != o.shape[0] or not np.isfinite(xy).all():
        raise InputError(f"coords must be finite, shaped (n_spots={o.shape[0]}, d), got {xy.shape}")
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}")
    if block_size is None:
        block_size = max(float(np.ptp(xy, axis=0).max()) / 5.0, 1e-12)
    if block_size <= 0:
        raise InputError(f"block_size must be positive, got {block_size}")
    # centre each gene on its section mean: the sums then lose less precision
    a, b, o = a - a.mean(0), b - b.mean(0), o - o.mean(0)
    tile = _tiles(xy, block_size)
    n_blocks = int(tile.max()) + 1
    onehot = sp.csr_matrix((np.ones(len(tile)), (tile, np.arange(len(tile)))), shape=(n_blocks, len(tile)))
    sums = {
        "n": np.asarray(onehot.sum(1)).ravel(),
        "a": onehot @ a, "b": onehot @ b, "o": onehot @ o,
        "aa": onehot @ (a * a), "bb": onehot @ (b * b), "oo": onehot @ (o * o),
        "ao": onehot @ (a * o), "bo": onehot @ (b * o),
    }

    def diff(w: np.ndarray) -> np.ndarray:
        """Mean-PCC difference for tile multiplicities ``w`` (replicates × tiles)."""
        s = {k: w @ v for k, v in sums.items()}
        n = s["n"][:, None]
        ra = _pcc_from_sums(n, s["a"], s["o"], s["aa"], s["oo"], s["ao"])
        rb = _pcc_from_sums(n, s["b"], s["o"], s["bb"], s["oo"], s["bo"])
        d = ra - rb
        valid = ~np.isnan(d)
        with np.errstate(invalid="ignore"):
            return np.where(valid.any(1), np.nansum(d, 1) / np.maximum(valid.sum(1), 1), np.nan)

    full = np.ones((1, n_blocks))
    estimate = float(diff(full)[0])
    n_genes = int((o.std(0) > 1e-12 * np.maximum(1.0, np.abs(_dense(obs).mean(0)))).sum())
    if n_blocks < 2:
        return BootstrapCI(estimate, float("nan"), float("nan"), level, n_blocks, float(block_size), 0, n_genes)
    rng = np.random.default_rng(seed)
    reps = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        draws = rng.integers(0, n_blocks, size=(m, n_blocks))
        w = np.zeros((m, n_blocks))
        np.add.at(w, (np.repeat(np.arange(m), n_blocks), draws.ravel()), 1.0)
        reps.append(diff(w))
    reps = np.concatenate(reps)
    reps = reps[~np.isnan(reps)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha]) if reps.size else (np.nan, np.nan)
    return BootstrapCI(estimate, float(low), float(high), level, n_blocks, float(block_size), int(reps.size), n_genes)


# ---------------------------------------------------------------------------- QC fidelity
def _mean_pairwise_distance(x: np.ndarray, y: np.ndarray, chunk: int = 2048) -> float:
    """Mean Euclidean distance over all pairs of rows of ``x`` and ``y``, in row chunks."""
    total = 0.0
    yy = (y * y).sum(1)
    for start in range(0, len(x), chunk):
        xc = x[start : start + chunk]
        d2 = (xc * xc).sum(1)[:, None] + yy[None, :] - 2.0 * xc @ y.T
        total += np.sqrt(np.maximum(d2, 0.0)).sum()
    return total / (len(x) * len(y))


def energy_distance(x, y) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two samples of points.

    ``x`` ``(n, d)`` and ``y`` ``(m, d)`` (1-D arrays are one-dimensional points). The
    V-statistic (pairs of a point with itself included), so it is 0 for identical samples and
    non-negative; it is 0 in the population only when the distributions are equal.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = (v[:, None] if v.ndim == 1 else v for v in (x, y))
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise InputError(f"x and y must be non-empty (n, d) with the same d, got {x.shape} and {y.shape}")
    return float(
        2.0 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - _mean_pairwise_distance(y, y)
    )


def qc_fidelity(
    generated_counts,
    real_counts,
    var_names: Sequence[str],
    max_points: int = 4000,
    seed: int = 0,
) -> float:
    """Energy distance between the QC-metric distributions of generated and real spots.

    The per-spot metrics of :func:`spartha_pyro.pp.qc.qc_metrics` (``log1p`` total counts,
    ``log1p`` detected genes, % counts in the top 20 genes and, where ``MT-``/``mt-`` genes
    exist, % mitochondrial counts) are computed for both sets, each metric is divided by the
    real spots' sd (1 where that is 0), and :func:`energy_distance` compares the two clouds.
    Lower is better; a generator whose spots are all alike (a constant profile with Poisson
    noise) is far from real spots even when every one of its spots passes QC.

    Parameters
    ----------
    generated_counts
        ``(n_spots, n_genes)`` or ``(n_samples, n_spots, n_genes)`` (all draws pooled), dense,
        or 2-D sparse; a DataArray with dims ``sample``, ``spot``, ``gene`` is transposed.
    real_counts
        Observed counts ``(n_real_spots, n_genes)`` of the same genes, dense or sparse.
    var_names
        Gene names of the columns.
    max_points
        Pooled generated spots beyond this are subsampled (seeded) to bound the cost.
    seed
        Seed of that subsample.
    """
    from ..pp.qc import qc_metrics

    if isinstance(generated_counts, xr.DataArray):
        order = [d for d in ("sample", "spot", "gene") if d in generated_counts.dims]
        if len(order) == generated_counts.ndim:
            generated_counts = generated_counts.transpose(*order)
        generated_counts = generated_counts.values
    gen = generated_counts if sp.issparse(generated_counts) else np.asarray(generated_counts)
    if gen.ndim == 3:
        gen = gen.reshape(-1, gen.shape[-1])
    if gen.ndim != 2 or gen.shape[1] != real_counts.shape[1] or len(var_names) != gen.shape[1]:
        raise InputError(
            f"gene axes differ: generated {gen.shape}, real {real_counts.shape}, var_names {len(var_names)}"
        )
    if gen.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(gen.shape[0], max_points, replace=False))
        gen = gen[keep]
    real = qc_metrics(real_counts, var_names)
    fake = qc_metrics(gen, var_names)[real.columns]
    sd = real.std(ddof=1).to_numpy() if len(real) > 1 else np.ones(real.shape[1])
    sd = np.where(np.isfinite(sd) & (sd > 0), sd, 1.0)
    return energy_distance(fake.to_numpy() / sd, real.to_numpy() / sd)


def constant_profile_counts(train_counts, library, n_samples: int = 1, seed: int = 0) -> np.ndarray:
    """Counts of a bland reference generator: the training-mean profile with Poisson noise.

    Every generated spot ``s`` draws ``Poisson(library[s] * p_g)`` per gene, where ``p`` is the
    mean over training spots of each spot's gene proportions. It knows each spot's library but
    nothing else; it scores near-perfect QCPR (all its spots sit near the median) and should
    lose on :func:`qc_fidelity`.

    Parameters
    ----------
    train_counts
        Training counts ``(n_train_spots, n_genes)``, dense or sparse; spots with no counts
        are ignored.
    library
        Library size of each spot to generate, ``(n_spots,)``, e.g. the real held-out spots'.
    n_samples
        Draws per spot.
    seed
        Seed of the Poisson draws.

    Returns
    -------
    ``float32`` array ``(n_samples, n_spots, n_genes)``.
    """
    X = sp.csr_matrix(train_counts, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    if not (total > 0).any():
        raise InputError("constant_profile_counts: the training counts are all zero")
    X = X[total > 0]
    profile = np.asarray((sp.diags(1.0 / total[total > 0]) @ X).mean(0)).ravel()
    lib = np.asarray(library, dtype=np.float64).ravel()
    if (lib < 0).any() or not np.isfinite(lib).all():
        raise InputError("library sizes must be finite and non-negative")
    rng = np.random.default_rng(seed)
    return rng.poisson(lib[None, :, None] * profile[None, None, :], size=(n_samples, lib.size, profile.size)).astype(
        np.float32
    )
