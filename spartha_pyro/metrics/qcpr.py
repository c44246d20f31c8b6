"""QC pass rate (QCPR) of generated spots, judged against the real spots of the same section."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import xarray as xr

from .._errors import InputError
from ..pp.qc import mad_reference, mito_mask, qc_metrics, qc_outliers


def qcpr(
    generated_counts,
    real_counts,
    var_names: Sequence[str],
    nmads: Sequence[float] = (3, 4, 5),
) -> dict[str, float]:
    """Share of generated spots that pass the standard MAD QC of :mod:`spartha_pyro.pp.qc`.

    The medians and MADs of the QC metrics (log total counts, log genes detected, % counts in
    the top 20 genes, % mitochondrial) come from the REAL spots; each generated spot is then
    a pass when no metric is an outlier at ``k`` MADs. Pass both on the same gene panel and
    from the same section.

    Parameters
    ----------
    generated_counts
        Counts drawn from the posterior predictive: ``(n_spots, n_genes)`` or
        ``(n_samples, n_spots, n_genes)`` (the pass rate is then averaged over samples), dense
        or, for 2-D, sparse. A DataArray with dims ``sample``, ``spot``, ``gene`` is
        transposed to that order.
    real_counts
        Observed counts of the section, ``(n_real_spots, n_genes)``, dense or sparse.
    var_names
        Gene names of the columns (``MT-``/``mt-`` prefixes mark mitochondrial genes; without
        any, the mitochondrial criterion is off and a ``UserWarning`` says so — pass the
        mitochondrial genes in the panel to keep it).
    nmads
        MAD multiples to report.

    Returns
    -------
    ``{"qcpr3": ..., "qcpr4": ..., "qcpr5": ...}`` (keys ``f"qcpr{k:g}"``), each in [0, 1].
    """
    if isinstance(generated_counts, xr.DataArray):
        order = [d for d in ("sample", "spot", "gene") if d in generated_counts.dims]
        if len(order) == generated_counts.ndim:
            generated_counts = generated_counts.transpose(*order)
        generated_counts = generated_counts.values
    gen = generated_counts if generated_counts.ndim == 2 else np.asarray(generated_counts)
    if gen.ndim not in (2, 3):
        raise InputError(f"generated_counts must be 2-D or 3-D, got shape {gen.shape}")
    samples = [gen] if gen.ndim == 2 else list(gen)
    if real_counts.shape[1] != gen.shape[-1] or len(var_names) != gen.shape[-1]:
        raise InputError(
            f"gene axes differ: generated {gen.shape[-1]}, real {real_counts.shape[1]}, var_names {len(var_names)}"
        )
    if any(k <= 0 for k in nmads):
        raise InputError(f"nmads must be positive, got {tuple(nmads)}")
    if not mito_mask(var_names).any():
        warnings.warn(
            f"qcpr: no MT-/mt- genes among the {len(var_names)} genes: the mitochondrial criterion is off",
            UserWarning,
            stacklevel=2,
        )
    reference = mad_reference(qc_metrics(real_counts, var_names))
    metrics = [qc_metrics(s, var_names) for s in samples]
    return {
        f"qcpr{k:g}": float(np.mean([1.0 - qc_outliers(m, reference, k).mean() for m in metrics])) for k in nmads
    }
