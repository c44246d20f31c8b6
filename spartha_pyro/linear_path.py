"""SPARTHA's linear histology path: a ridge probe blended into the point prediction.

On sections of an unseen patient the nonlinear histology guide ``q(Z | X_h)`` generalises
worse than a linear probe on the same features, while on sections like the training ones it
predicts better; their errors differ, so a convex blend of the two point predictions beats
both on a held-out training section. :meth:`SPARTHA.train <spartha_pyro.SPARTHA.train>`
fits the probe on the model's own standardised histology and chooses the blend's share on
the validation spots (never a held-out section); :meth:`SPARTHA.predict_mean
<spartha_pyro.SPARTHA.predict_mean>` returns

.. math::

    \\hat y = (1 - s)\\, \\mathbb E_{q(Z | X_h)} \\mathbb E_p[\\log(1 + 10^4 X_t / l)] + s\\, (X_h B + c),

with ``s`` the linear share. Generated counts (``predict_expression``) stay the model's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sps
from anndata import AnnData

#: shares of the linear path tried on the validation spots
SHARES = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
#: largest spots × genes target matrix the probe is fit on or scored on (800 MB as float64; the fit
#: holds a few such arrays at once); see :func:`subsample`
MAX_TARGET_SIZE = 100_000_000


@dataclass
class LinearPath:
    """A ridge probe from the standardised histology ``X_h`` (spots × H) to log1p(counts per
    10,000) over the model's genes (spots × G), and its share ``s`` in the point prediction.

    ``coef`` float32 ``(H, G)`` and ``intercept`` ``(G,)`` act on ``(x_h - x_mean) / x_scale``;
    ``alpha`` is the penalty chosen by cross-validation over batches; ``scores`` maps each tried
    share to the validation spots' mean per-gene PCC (``None`` for a share given by the user).
    """

    share: float
    coef: np.ndarray
    intercept: np.ndarray
    x_mean: np.ndarray
    x_scale: np.ndarray
    alpha: float
    scores: dict[float, float] | None = field(default=None)

    def check_shape(self, histology_dim: int, n_genes: int) -> None:
        """``ValueError`` unless the arrays fit ``histology_dim`` features and ``n_genes`` genes."""
        want = {"coef": (histology_dim, n_genes), "intercept": (n_genes,), "x_mean": (histology_dim,),
                "x_scale": (histology_dim,)}
        wrong = {k: getattr(self, k).shape for k, shape in want.items() if getattr(self, k).shape != shape}
        if wrong:
            raise ValueError(f"arrays of the wrong shape {wrong} for {histology_dim} features × {n_genes} genes")

    def predict(self, x_h: np.ndarray) -> np.ndarray:
        """The probe's prediction, float32 ``(n, G)``, for standardised histology ``(n, H)``."""
        return ((x_h - self.x_mean) / self.x_scale).astype(np.float32) @ self.coef + self.intercept

    def blend(self, model_pred: np.ndarray, x_h: np.ndarray) -> np.ndarray:
        """``(1 - share) * model_pred + share * predict(x_h)``, float32 ``(n, G)``."""
        return ((1.0 - self.share) * model_pred + self.share * self.predict(x_h)).astype(np.float32)

    def summary(self) -> dict:
        """JSON-serialisable description (share, penalty, validation scores)."""
        scores = None if self.scores is None else {str(k): v for k, v in self.scores.items()}
        return {"share": self.share, "alpha": self.alpha, "scores": scores}

    def save(self, path: Path) -> None:
        """Write the arrays to the ``.npz`` file ``path`` (the summary goes to ``settings.json``)."""
        with open(path, "wb") as fh:
            np.savez(fh, coef=self.coef, intercept=self.intercept, x_mean=self.x_mean, x_scale=self.x_scale)

    @classmethod
    def load(cls, path: Path, summary: dict) -> "LinearPath":
        """Read what :meth:`save` and :meth:`summary` wrote."""
        with np.load(path) as arrays:
            scores = summary.get("scores")
            return cls(float(summary["share"]), arrays["coef"], arrays["intercept"], arrays["x_mean"],
                       arrays["x_scale"], float(summary["alpha"]),
                       None if scores is None else {float(k): v for k, v in scores.items()})


def subsample(idx: np.ndarray, n_genes: int, seed: int = 0) -> np.ndarray:
    """At most ``MAX_TARGET_SIZE // n_genes`` of the spots ``idx`` (a seeded random subset, in order)."""
    cap = max(2, MAX_TARGET_SIZE // max(n_genes, 1))
    if len(idx) <= cap:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, cap, replace=False))


def fit_linear_path(x_h: np.ndarray, counts, batch: np.ndarray, share: float, seed: int = 0) -> LinearPath:
    """Fit the probe on training spots that have counts and histology.

    Parameters
    ----------
    x_h
        Standardised histology ``(n, H)`` as the model sees it.
    counts
        Counts ``(n, G)`` over the model's genes (dense or sparse); the normalisation is by
        each spot's total over them, as the model's library.
    batch
        Batch codes ``(n,)``; the penalty is chosen by cross-validation with whole batches
        held out (shuffled 5-fold over spots with a single batch).
    share
        The linear share ``s`` stored with the probe.
    seed
        Seed of the folds.
    """
    from .baselines.ridge import RidgePredictor  # lazy: the baselines load scanpy and the image stack

    groups = batch.astype(str)
    grouped = len(np.unique(groups)) >= 2
    adata = AnnData(X=sps.csr_matrix(counts), obsm={"x_h": np.asarray(x_h, np.float64)})
    if grouped:
        adata.obs["batch"] = groups
    ridge = RidgePredictor("x_h", group_key="batch" if grouped else None, seed=seed).fit(adata)
    return LinearPath(float(share), ridge.coef_, ridge.intercept_, ridge.x_mean_.astype(np.float32),
                      ridge.x_scale_.astype(np.float32), ridge.alpha_)


def choose_share(model_pred: np.ndarray, linear_pred: np.ndarray, observed: np.ndarray) -> tuple[float, dict[float, float]]:
    """The share in :data:`SHARES` whose blend has the highest mean per-gene PCC against
    ``observed`` (log1p-normalised, ``(n, G)``); ties keep the smaller share. Returns
    ``(share, {share: score})``."""
    from .metrics.regression import pcc_gene  # lazy: the metrics package loads scanpy and the image stack

    scores = {float(s): float(pcc_gene((1.0 - s) * model_pred + s * linear_pred, observed)) for s in SHARES}
    finite = {s: v for s, v in scores.items() if np.isfinite(v)}
    best = max(finite, key=lambda s: (finite[s], -s)) if finite else 0.0
    return best, scores
