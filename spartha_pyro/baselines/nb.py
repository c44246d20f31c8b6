r"""A negative binomial predictive distribution around any point predictor.

The baselines predict log1p-normalised expression ``p[n, g]`` (counts per 10,000, see
:func:`~spartha_pyro.metrics.normalize_log1p`). :class:`NBWrapper` turns that into counts:

.. math::

    \mu_{ng} = c_g \, l_n \, \frac{\mathrm{expm1}(\max(p_{ng}, 0))}{10^4}, \qquad
    y_{ng} \sim \mathrm{NB}(\mu_{ng}, \theta_g)\ \ (\mathrm{Var} = \mu + \mu^2/\theta)

- ``expm1(p) / 1e4`` is the predicted share of the spot's counts going to gene ``g``.
- ``l_n`` is the spot's library size (total counts over all genes of the AnnData), by the
  ``library`` rule: ``"train_median"`` (default) — the median training library for every
  spot; ``"histology"`` — ``expm1`` of a ridge regression of ``log1p(library)`` on the
  histology features (:class:`LibraryRidge`), the information SPARTHA has when it generates
  from histology alone (its decoder predicts ``log l_n`` from the latents);
  ``"auto"`` — whichever of those two gives the lower NLL of the training counts under the
  cross-fitted predictions (a point predictor whose log1p prediction already follows depth,
  as ridge's does through sparse low-depth spots, can do worse with a predicted library);
  ``"observed"`` — the spot's own observed total, an oracle at test time (the test spot's
  counts are needed, which SPARTHA never sees) that removes library variation from the
  baseline's uncertainty.
- ``c_g`` matches the training total of gene ``g``: ``c_g = sum_n y_ng / sum_n l_n expm1(p_ng)/1e4``.
  It corrects the retransformation bias of ``expm1`` of a log-scale prediction (the mean of
  ``log1p`` under-estimates the log of the mean, most for sparse genes).
- ``theta_g`` is the maximum-likelihood inverse dispersion of the training counts given
  ``mu`` (root of the score in ``log theta`` by bisection, within :data:`THETA_BOUNDS`).

``c`` and ``theta`` are fit on **training** spots, with ``mu`` computed exactly as at
prediction time (same library rule) from **cross-fitted** predictions by default: each
training spot is predicted by the point predictor fit on the other folds, so ``theta``
reflects held-out errors rather than the smaller in-sample residuals.
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import scipy.sparse as sp
import xarray as xr
from anndata import AnnData
from scipy.special import digamma

from .._errors import InputError
from ..metrics.calibration import MU_FLOOR, nb_log_prob
from ._base import PointPredictor, cv_folds
from .ridge import RidgePredictor

#: range of the fitted inverse dispersion (the upper end is practically Poisson)
THETA_BOUNDS = (1e-3, 1e5)
LIBRARY_RULES = ("train_median", "histology", "auto", "observed")


def _counts(adata: AnnData, layer: str | None) -> np.ndarray:
    """Dense float64 counts ``(n_spots, n_genes)`` of ``X`` or ``layers[layer]``."""
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None or adata.n_vars == 0:
        raise InputError("this AnnData has no counts (library='observed' and fit need them)")
    return (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)


def fit_nb_theta(counts: np.ndarray, mu: np.ndarray, iterations: int = 50, chunk: int = 512) -> np.ndarray:
    """Maximum-likelihood NB inverse dispersion per gene, given the means.

    Solves ``sum_n d/dtheta log NB(y_n | mu_n, theta) = 0`` per gene by bisection on
    ``log theta`` within :data:`THETA_BOUNDS`; the score is
    ``psi(y + theta) - psi(theta) + log theta + 1 - log(theta + mu) - (y + theta)/(theta + mu)``.
    A gene whose score stays positive (no overdispersion) gets the upper bound.

    Parameters
    ----------
    counts
        Observed counts ``(n_spots, n_genes)``.
    mu
        NB means ``(n_spots, n_genes)``, positive.
    iterations
        Bisection steps (50 halve the log-range to ~1e-14).
    chunk
        Genes processed at a time (memory ~ ``6 * n_spots * chunk`` floats).

    Returns
    -------
    float64 ``(n_genes,)``.
    """
    lo_bound, hi_bound = np.log(THETA_BOUNDS)
    theta = np.empty(counts.shape[1])
    for start in range(0, counts.shape[1], chunk):
        y, m = counts[:, start : start + chunk], mu[:, start : start + chunk]
        lo = np.full(y.shape[1], lo_bound)
        hi = np.full(y.shape[1], hi_bound)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            t = np.exp(mid)
            score = (digamma(y + t) - digamma(t) + mid + 1.0 - np.log(t + m) - (y + t) / (t + m)).sum(0)
            # the log-likelihood rises while the score is positive: the root lies above
            lo = np.where(score > 0, mid, lo)
            hi = np.where(score > 0, hi, mid)
        theta[start : start + chunk] = np.exp((lo + hi) / 2)
    return theta


class LibraryRidge(RidgePredictor):
    """Ridge regression from histology features to ``log1p`` of each spot's library size.

    A :class:`~spartha_pyro.baselines.RidgePredictor` (same parameters: penalty by
    cross-validation, optional per-section standardisation) whose single target is
    ``log1p(sum_g counts)``; :meth:`predict_library` returns the library ``(n_spots,)``.
    """

    def _fit_target(self, adata: AnnData, layer: str | None) -> np.ndarray:
        self.var_names_ = pd.Index(["log1p_library"])
        return np.log1p(_counts(adata, layer).sum(1, keepdims=True))

    def predict_library(self, adata: AnnData) -> np.ndarray:
        """Predicted library sizes, float64 ``(adata.n_obs,)``; needs only ``obsm[histology_key]``."""
        return np.expm1(np.clip(self.predict(adata)[:, 0].astype(np.float64), 0.0, None))


class NBWrapper:
    """Negative binomial predictive distribution around a point predictor (see module docstring).

    Parameters
    ----------
    predictor
        A :class:`~spartha_pyro.baselines.MeanPredictor`, :class:`~spartha_pyro.baselines.RidgePredictor`
        or any object with ``fit(adata, layer=..., **kw)`` and ``predict(adata, **kw)``
        returning log1p-normalised expression ``(n_spots, n_genes)``.
    library
        ``"train_median"`` (default), ``"histology"`` (a :class:`LibraryRidge` on the
        predictor's histology features, per-section standardised as the predictor's; fair
        against SPARTHA, which predicts each spot's library from histology too), ``"auto"``
        (the one of those two with the lower training NLL, see the module docstring) or
        ``"observed"`` (the test spot's own total count: oracle information).
    cross_fit
        Folds of the cross-fitted training predictions used to fit ``c`` and ``theta``;
        ``None`` uses the in-sample predictions of the final fit (cheaper, over-confident for
        flexible predictors).
    group_key
        ``obs`` column (e.g. the slide) kept whole within a fold; ``None``: shuffled folds.
    target_sum
        Counts per spot of the predictor's log1p normalisation.
    seed
        Seed of the fold shuffle.
    """

    def __init__(
        self,
        predictor: PointPredictor,
        library: str = "train_median",
        cross_fit: int | None = 5,
        group_key: str | None = None,
        target_sum: float = 1e4,
        seed: int = 0,
    ):
        if library not in LIBRARY_RULES:
            raise InputError(f"library must be one of {LIBRARY_RULES}, got {library!r}")
        if cross_fit is not None and cross_fit < 2:
            raise InputError(f"cross_fit must be None or at least 2 folds, got {cross_fit}")
        self.predictor, self.library, self.cross_fit = predictor, library, cross_fit
        self.group_key, self.target_sum, self.seed = group_key, target_sum, seed

    def _library(self, adata: AnnData, layer: str | None, library: np.ndarray | None) -> np.ndarray:
        """Library size per spot ``(n_spots,)`` by the wrapper's rule, or ``library`` when given."""
        if library is not None:
            library = np.asarray(library, dtype=np.float64)
            if library.shape != (adata.n_obs,) or (library < 0).any():
                raise InputError(f"library must be non-negative with shape ({adata.n_obs},), got {library.shape}")
            return library
        if self.library_rule_ == "observed":
            return _counts(adata, layer).sum(1)
        if self.library_rule_ == "histology":
            return self.library_model_.predict_library(adata)
        return np.full(adata.n_obs, self.median_library_)

    def _library_model(self) -> LibraryRidge:
        """A fresh :class:`LibraryRidge` on the predictor's histology key and section scaling."""
        return LibraryRidge(getattr(self.predictor, "histology_key", "histology"), group_key=self.group_key,
                            seed=self.seed, section_key=getattr(self.predictor, "section_key", None))

    def _mu(self, prediction: np.ndarray, library: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        share = np.expm1(np.clip(np.asarray(prediction, dtype=np.float64), 0.0, None)) / self.target_sum
        return np.maximum(scale * library[:, None] * share, MU_FLOOR)

    def fit(self, adata: AnnData, layer: str | None = None, **fit_kwargs) -> NBWrapper:
        """Fit the point predictor on ``adata``, then ``c`` and ``theta`` on its training counts.

        Parameters
        ----------
        adata
            Training spots with raw counts in ``X`` (or ``layers[layer]``) and whatever the
            predictor needs (e.g. ``obsm["histology"]``).
        layer
            Layer holding the counts.
        **fit_kwargs
            Passed to ``predictor.fit``.

        Returns
        -------
        ``self``, with ``scale_`` (``c``, ``(n_genes,)``), ``theta_`` (``(n_genes,)``),
        ``median_library_``, ``var_names_``, ``library_rule_`` (the rule used; ``"auto"``
        resolved), ``training_nll_`` (``{rule: NLL per spot per gene}`` of the training counts
        for each rule tried) and, for the histology rule, ``library_model_`` (the fitted
        :class:`LibraryRidge`).
        """
        counts = _counts(adata, layer)
        self.median_library_ = float(np.median(counts.sum(1)))
        rules = ("train_median", "histology") if self.library == "auto" else (self.library,)
        histology_library = "histology" in rules
        if self.cross_fit is None:
            prediction, library = None, None
        else:  # held-out predictions of the expression (and of the library) for every training spot
            prediction = np.empty(counts.shape, dtype=np.float64)
            library = np.empty(adata.n_obs) if histology_library else None
            for tr, va in cv_folds(adata, self.cross_fit, self.group_key, self.seed):
                fold = copy.deepcopy(self.predictor).fit(adata[tr], layer=layer, **fit_kwargs)
                prediction[va] = fold.predict(adata[va])
                if histology_library:
                    library[va] = self._library_model().fit(adata[tr], layer=layer).predict_library(adata[va])
        self.predictor.fit(adata, layer=layer, **fit_kwargs)
        if histology_library:
            self.library_model_ = self._library_model().fit(adata, layer=layer)
        if prediction is None:
            prediction = self.predictor.predict(adata)
        self.var_names_ = self.predictor.var_names_
        fits = {}
        for rule in rules:
            self.library_rule_ = rule
            lib = self._library(adata, layer, library if rule == "histology" else None)
            base = self._mu(prediction, lib, 1.0)
            totals = base.sum(0)
            scale = np.where(totals > 0, counts.sum(0) / totals, 1.0)
            mu = self._mu(prediction, lib, scale)
            theta = fit_nb_theta(counts, mu)
            fits[rule] = (float(-nb_log_prob(counts, mu, theta).mean()), scale, theta)
        self.training_nll_ = {rule: fit[0] for rule, fit in fits.items()}
        self.library_rule_ = min(fits, key=lambda rule: fits[rule][0])
        _, self.scale_, self.theta_ = fits[self.library_rule_]
        if self.library_rule_ != "histology":
            self.__dict__.pop("library_model_", None)
        return self

    def mean(self, adata: AnnData, layer: str | None = None, library=None, **predict_kwargs) -> np.ndarray:
        """NB means ``mu`` (expected counts), float64 ``(adata.n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Spots to predict (what the predictor needs; counts only for ``library="observed"``).
        layer
            Layer of the counts for ``library="observed"``.
        library
            Library size per spot ``(n_spots,)`` overriding the wrapper's rule.
        **predict_kwargs
            Passed to ``predictor.predict``.
        """
        if not hasattr(self, "theta_"):
            raise RuntimeError("NBWrapper is not fitted: call fit(adata_train) first")
        prediction = self.predictor.predict(adata, **predict_kwargs)
        return self._mu(prediction, self._library(adata, layer, library), self.scale_)

    def sample(
        self, adata: AnnData, num_samples: int = 20, seed: int = 0, layer: str | None = None, library=None, **predict_kwargs
    ) -> xr.DataArray:
        """Draws from the NB predictive, shaped like :meth:`SPARTHA.predict_expression`.

        Parameters
        ----------
        adata, layer, library, **predict_kwargs
            As in :meth:`mean`.
        num_samples
            Draws per spot.
        seed
            Seed of the numpy generator.

        Returns
        -------
        int64 ``xarray.DataArray`` with dims ``("sample", "spot", "gene")``.
        """
        if num_samples < 1:
            raise InputError("num_samples must be positive")
        mu = self.mean(adata, layer, library, **predict_kwargs)
        p = self.theta_ / (self.theta_ + mu)
        draws = np.random.default_rng(seed).negative_binomial(self.theta_, p, size=(num_samples, *mu.shape))
        return xr.DataArray(
            draws,
            dims=("sample", "spot", "gene"),
            coords={"sample": np.arange(num_samples), "spot": np.asarray(adata.obs_names), "gene": np.asarray(self.var_names_)},
            name="expression",
            attrs={"library": self.library_rule_ if library is None else "given", "seed": seed, "model": f"NB({type(self.predictor).__name__})"},
        )

    def log_prob(self, adata: AnnData, layer: str | None = None, library=None, **predict_kwargs) -> np.ndarray:
        """NB log pmf of the observed counts of ``adata``, float64 ``(n_spots, n_genes)``.

        ``adata`` must hold the counts of the training genes in the same order; ``library``
        and ``**predict_kwargs`` as in :meth:`mean`. ``-log_prob(...).mean()`` equals
        :func:`spartha_pyro.metrics.nll` with one draw of means.
        """
        counts = _counts(adata, layer)
        if counts.shape[1] != len(self.var_names_) or not np.array_equal(adata.var_names, self.var_names_):
            raise InputError("adata must hold the training genes, in the training order")
        return nb_log_prob(counts, self.mean(adata, layer, library, **predict_kwargs), self.theta_)
