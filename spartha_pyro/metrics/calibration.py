"""Scores of a predictive distribution against held-out counts: calibration and proper scores.

Every function takes draws from the predictive distribution, ``samples`` of shape
``(n_samples, n_spots, n_genes)``, and the held-out observation, ``observed`` of shape
``(n_spots, n_genes)`` (dense, scipy sparse or ``xarray.DataArray``; genes on the last axis).

- **PIT** (:func:`pit`): where the observation falls in its predictive distribution. Counts
  are discrete, so many draws tie with the observation; the *randomised* PIT spreads a tie
  uniformly, ``u = (#{x_s < y} + V (#{x_s = y} + 1)) / (S + 1)`` with ``V ~ U(0, 1)``. This
  is the randomised rank of ``y`` among the ``S`` draws: when ``y`` and the draws come from
  the same distribution, ``u`` is exactly ``Uniform(0, 1)`` for any ``S`` and any amount of
  ties. The *mid-point* PIT uses ``V = 1/2`` (deterministic, but not uniform under ties: it
  piles up near 1/2 for genes with mostly-zero counts, so coverage reads too high there).
- **Coverage** (:func:`interval_coverage`): the share of observations inside the central
  ``level`` predictive interval, i.e. with ``(1 - level)/2 <= u <= (1 + level)/2``. With
  the randomised PIT this is the coverage of the randomised central interval of the
  (discrete) predictive distribution: nominal exactly when the predictive is right.
- **NLL** (:func:`nll`): ``-log p(y)`` under the model's predictive, the mixture over
  posterior draws of ``NB(y | mu_s, theta)``, from the per-draw NB means ``mu_s``.
- **CRPS** (:func:`crps`): ``E|X - y| - E|X - X'| / 2`` of the empirical distribution of the
  draws, usually on log1p-normalised values (:func:`~spartha_pyro.metrics.normalize_log1p`).

Lower NLL and CRPS are better; both are proper scores. Coverage near nominal and a flat PIT
histogram mean the intervals can be trusted; a U-shaped PIT (under-coverage) means too
narrow, a hump (over-coverage) too wide.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from scipy.special import gammaln, logsumexp, xlogy

from .._errors import InputError
from .normalize import normalize_log1p
from .regression import _panel_index

#: central-interval levels scored by :func:`calibration_records`
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
#: floor of NB means (counts): a mean of exactly 0 would give ``-inf`` for any positive count
MU_FLOOR = 1e-8
TIES = ("randomized", "midpoint")


def _dense(x, ndim: int, name: str) -> np.ndarray:
    x = x.values if isinstance(x, xr.DataArray) else x
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    if x.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {x.shape}")
    return x.astype(np.float64, copy=False)


def _pair(samples, observed) -> tuple[np.ndarray, np.ndarray]:
    """``(S, N, G)`` draws and ``(N, G)`` observations as float64, shapes checked."""
    s, o = _dense(samples, 3, "samples"), _dense(observed, 2, "observed")
    if s.shape[1:] != o.shape:
        raise InputError(f"samples {s.shape} do not match observed {o.shape} (expected (S, N, G) and (N, G))")
    if s.shape[0] < 1:
        raise InputError("samples has no draws")
    return s, o


def _reduce(values: np.ndarray, reduce: str | None) -> float | np.ndarray:
    if reduce == "all":
        return float(values.mean())
    if reduce == "gene":
        return values.mean(0)
    if reduce is None:
        return values
    raise InputError(f"reduce must be 'all', 'gene' or None, got {reduce!r}")


def pit(samples, observed, ties: str = "randomized", seed: int = 0) -> np.ndarray:
    """Probability integral transform of each observation under its predictive draws.

    Parameters
    ----------
    samples
        Predictive draws ``(S, N, G)`` (counts, or any values).
    observed
        Observations ``(N, G)``, same units.
    ties
        ``"randomized"`` (exactly uniform under a correct predictive; see the module
        docstring) or ``"midpoint"`` (deterministic).
    seed
        Seed of the uniform ``V`` of the randomised PIT.

    Returns
    -------
    ``(N, G)`` float64 PIT values in ``(0, 1)``.
    """
    if ties not in TIES:
        raise InputError(f"ties must be one of {TIES}, got {ties!r}")
    s, o = _pair(samples, observed)
    below = (s < o).sum(0)
    equal = (s == o).sum(0)
    v = np.random.default_rng(seed).random(o.shape) if ties == "randomized" else 0.5
    return (below + v * (equal + 1)) / (s.shape[0] + 1)


def _covered(u: np.ndarray, level: float) -> np.ndarray:
    return (u >= (1.0 - level) / 2) & (u <= (1.0 + level) / 2)


def interval_coverage(
    samples,
    observed,
    levels: Sequence[float] = COVERAGE_LEVELS,
    ties: str = "randomized",
    seed: int = 0,
) -> xr.Dataset:
    """Coverage of central predictive intervals, overall and per gene.

    An observation is inside the central ``level`` interval when its PIT ``u`` (see
    :func:`pit`; randomised by default, which handles ties of discrete counts exactly)
    lies in ``[(1 - level)/2, (1 + level)/2]``.

    Parameters
    ----------
    samples
        Predictive draws ``(S, N, G)``, e.g. ``SPARTHA.predict_expression(...)`` counts.
    observed
        Held-out observations ``(N, G)`` in the same units (raw counts for count draws).
    levels
        Nominal levels in ``(0, 1)``.
    ties, seed
        As in :func:`pit`.

    Returns
    -------
    ``xarray.Dataset`` with ``coverage`` (dim ``level``: share of all ``N × G`` entries
    covered) and ``coverage_gene`` (dims ``level, gene``: share of spots covered per gene);
    gene coordinates from ``observed`` (or ``samples``) when it is a DataArray.
    """
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0 or (levels <= 0).any() or (levels >= 1).any():
        raise InputError(f"levels must be a non-empty sequence in (0, 1), got {levels}")
    u = pit(samples, observed, ties, seed)
    per_gene = np.stack([_covered(u, a).mean(0) for a in levels])
    coords = {"level": levels}
    for x in (observed, samples):
        if isinstance(x, xr.DataArray) and "gene" in x.coords:
            coords["gene"] = x["gene"].values
            break
    return xr.Dataset(
        {
            "coverage": ("level", np.array([_covered(u, a).mean() for a in levels])),
            "coverage_gene": (("level", "gene"), per_gene),
        },
        coords=coords,
        attrs={"ties": ties, "n_samples": np.shape(samples)[0]},
    )


def reliability(
    samples,
    observed,
    levels: Sequence[float] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)),
    ties: str = "randomized",
    seed: int = 0,
) -> pd.DataFrame:
    """Reliability curve as data: nominal vs empirical coverage of central intervals.

    Parameters
    ----------
    samples, observed, ties, seed
        As in :func:`interval_coverage`.
    levels
        Nominal levels (default 0.05, 0.10, …, 0.95).

    Returns
    -------
    DataFrame with columns ``nominal`` and ``empirical`` (share of all entries covered);
    a calibrated predictive lies on the diagonal.
    """
    cov = interval_coverage(samples, observed, levels, ties, seed)
    return pd.DataFrame({"nominal": cov["level"].values, "empirical": cov["coverage"].values})


def pit_histogram(samples, observed, bins: int = 10, ties: str = "randomized", seed: int = 0) -> pd.DataFrame:
    """Histogram of PIT values as data (flat at density 1 when calibrated).

    Parameters
    ----------
    samples, observed, ties, seed
        As in :func:`pit`.
    bins
        Number of equal-width bins on ``[0, 1]``.

    Returns
    -------
    DataFrame with one row per bin: ``left``, ``right`` (bin edges) and ``density``
    (share of entries in the bin divided by the bin width).
    """
    if bins < 1:
        raise InputError(f"bins must be positive, got {bins}")
    u = pit(samples, observed, ties, seed)
    density, edges = np.histogram(u, bins=bins, range=(0.0, 1.0), density=True)
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "density": density})


def nb_log_prob(x, mu, theta) -> np.ndarray:
    """Negative binomial log pmf with mean ``mu`` and inverse dispersion ``theta``.

    ``log NB(x | mu, theta) = log G(x + theta) - log G(theta) - log x! + theta log(theta / (theta + mu))
    + x log(mu / (theta + mu))`` (variance ``mu + mu^2 / theta``), the parameterisation of
    :func:`spartha_pyro.models.likelihoods.count_likelihood` without its ``1e-6`` stabiliser.

    Parameters
    ----------
    x
        Counts, any shape broadcastable with ``mu``.
    mu
        Means (counts), floored at :data:`MU_FLOOR`.
    theta
        Positive inverse dispersions, broadcastable (per gene: shape ``(G,)``).

    Returns
    -------
    float64 array of the broadcast shape.
    """
    x = np.asarray(x, dtype=np.float64)
    mu = np.maximum(np.asarray(mu, dtype=np.float64), MU_FLOOR)
    theta = np.asarray(theta, dtype=np.float64)
    log_total = np.log(theta + mu)
    return (
        gammaln(x + theta) - gammaln(theta) - gammaln(x + 1.0)
        + theta * (np.log(theta) - log_total) + xlogy(x, mu) - x * log_total
    )


def nll(mean_samples, theta, observed, reduce: str | None = "all") -> float | np.ndarray:
    """Held-out negative log predictive density of counts under the NB mixture over draws.

    ``nll[n, g] = -log( (1/S) sum_s NB(y[n, g] | mu[s, n, g], theta[g]) )``, computed with
    ``logsumexp``. The NB means ``mu_s`` carry the posterior uncertainty (latents, library),
    ``theta`` the count noise. NB only: a zero-inflated model also needs its gate per draw,
    which :meth:`~spartha_pyro.SPARTHA.predict_expression` does not return (hence
    :attr:`SPARTHA.dispersion <spartha_pyro.SPARTHA.dispersion>` refuses ZINB models).

    Parameters
    ----------
    mean_samples
        NB means per posterior draw ``(S, N, G)``, counts (``predict_expression(...,
        value="mean")``; a point predictor with an NB gives ``S = 1``).
    theta
        Inverse dispersion per gene ``(G,)`` (``SPARTHA.dispersion``).
    observed
        Held-out counts ``(N, G)``.
    reduce
        ``"all"``: mean over all entries (nats per spot per gene); ``"gene"``: mean over spots,
        ``(G,)``; ``None``: the ``(N, G)`` array.

    Returns
    -------
    Nats per spot per gene: a float, ``(G,)`` or ``(N, G)`` array.
    """
    mu, y = _pair(mean_samples, observed)
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (y.shape[1],) or not (theta > 0).all():
        raise InputError(f"theta must be positive with shape ({y.shape[1]},), got shape {theta.shape}")
    log_p = logsumexp(nb_log_prob(y, mu, theta), axis=0) - np.log(mu.shape[0])
    return _reduce(-log_p, reduce)


def crps(samples, observed, reduce: str | None = "all") -> float | np.ndarray:
    """Continuous ranked probability score of the empirical predictive distribution.

    Energy form ``CRPS = E|X - y| - E|X - X'| / 2`` with ``X, X'`` drawn from the ``S``
    draws (with replacement, i.e. the CRPS of the empirical CDF). The spread term uses the
    sorted draws ``x_(1) <= ... <= x_(S)``: ``E|X - X'| / 2 = sum_i (2i - S - 1) x_(i) / S^2``,
    ``O(S log S)`` per entry. A point mass at ``c`` scores ``|c - y|``.

    Parameters
    ----------
    samples
        Predictive draws ``(S, N, G)``, usually log1p-normalised (``normalize_log1p`` of the
        sampled counts, normalised over the full gene set).
    observed
        Observations ``(N, G)`` in the same space.
    reduce
        ``"all"``, ``"gene"`` or ``None`` as in :func:`nll`.

    Returns
    -------
    CRPS in the units of the inputs: a float, ``(G,)`` or ``(N, G)`` array.
    """
    s, y = _pair(samples, observed)
    n_draws = s.shape[0]
    error = np.abs(s - y).mean(0)
    weights = (2.0 * np.arange(1, n_draws + 1) - n_draws - 1) / n_draws**2
    spread = np.tensordot(weights, np.sort(s, axis=0), axes=(0, 0))
    return _reduce(error - spread, reduce)


def calibration_records(
    samples_counts,
    mean_samples,
    theta,
    observed_counts,
    panels: Mapping[str, object] | None = None,
    var_names: Sequence[str] | None = None,
    levels: Sequence[float] = COVERAGE_LEVELS,
    target_sum: float = 1e4,
    seed: int = 0,
) -> list[dict]:
    """Benchmark records of calibration and proper scores, one per panel × metric.

    Metrics: ``coverage50|80|90|95`` (randomised-PIT coverage of central intervals of the
    counts, see :func:`interval_coverage`), ``nll`` (nats per spot per gene, see
    :func:`nll`) and ``crps`` (on log1p-normalised expression, see :func:`crps`).
    Normalisation uses all ``G`` columns given (as the point metrics do); panels then select
    columns; without an ``all`` panel only the columns some panel names are scored.

    Parameters
    ----------
    samples_counts
        Predictive count draws ``(S, N, G)``.
    mean_samples
        NB means per draw ``(S', N, G)`` (``S'`` may differ from ``S``; 1 for an NB-wrapped
        point predictor), or ``None`` to skip ``nll``.
    theta
        NB inverse dispersion per gene ``(G,)``, or ``None`` to skip ``nll``.
    observed_counts
        Held-out counts ``(N, G)``, dense or sparse, same columns as the draws.
    panels
        Panel name -> genes, as in :func:`~spartha_pyro.metrics.regression_metrics`
        (``None`` = all columns, integer indices, a boolean mask, or names with
        ``var_names``). Default ``{"all": None}``.
    var_names
        Names of the ``G`` columns (needed for panels given by name).
    levels
        Coverage levels; each becomes metric ``f"coverage{round(100 * level)}"``.
    target_sum
        Counts per spot of the log1p normalisation used by ``crps``.
    seed
        Seed of the randomised PIT.

    Returns
    -------
    List of ``{"panel", "metric", "value"}`` dicts (add ``method``, ``section``, ``seed``…
    as for the point metrics).
    """
    s, y = _pair(samples_counts, observed_counts)
    u = pit(s, y, "randomized", seed)  # every column, so the tie-breaking draws do not depend on the panels
    index = {name: _panel_index(panel, y.shape[1], var_names, name) for name, panel in (panels or {"all": None}).items()}
    totals = s.sum(-1), y.sum(-1)
    if not any(isinstance(i, slice) for i in index.values()):  # score only the columns some panel uses
        cols = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in index.values()]))
        u, s, y = u[:, cols], s[..., cols], y[:, cols]
        if mean_samples is not None and theta is not None:
            mean_samples, theta = np.asarray(mean_samples)[..., cols], np.asarray(theta)[cols]
        index = {name: np.searchsorted(cols, i) for name, i in index.items()}
    s_log = normalize_log1p(s, target_sum, total=totals[0])
    y_log = normalize_log1p(y, target_sum, total=totals[1])
    per_entry_nll = None if mean_samples is None or theta is None else nll(mean_samples, theta, y, reduce=None)
    per_entry_crps = crps(s_log, y_log, reduce=None)
    records = []
    for name, idx in index.items():
        values = {f"coverage{round(100 * a)}": float(_covered(u[:, idx], a).mean()) for a in levels}
        if per_entry_nll is not None:
            values["nll"] = float(per_entry_nll[:, idx].mean())
        values["crps"] = float(per_entry_crps[:, idx].mean())
        records += [{"panel": name, "metric": m, "value": v} for m, v in values.items()]
    return records
