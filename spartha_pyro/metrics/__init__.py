"""Evaluation metrics: point accuracy per gene panel, QC pass rate of generated spots,
disentanglement probes, and benchmark tables."""
from .disentanglement import probe_matrix, silhouette_matrix
from .normalize import normalize_log1p
from .panels import hvg_panel
from .qcpr import qcpr
from .regression import REGRESSION_METRICS, mae, mse, pcc_gene, pcc_spot, r2, r2_pooled, regression_metrics
from .report import format_table, summarize

__all__ = [
    "REGRESSION_METRICS",
    "format_table",
    "hvg_panel",
    "mae",
    "mse",
    "normalize_log1p",
    "pcc_gene",
    "pcc_spot",
    "probe_matrix",
    "qcpr",
    "r2",
    "r2_pooled",
    "regression_metrics",
    "silhouette_matrix",
    "summarize",
]
