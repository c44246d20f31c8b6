"""Evaluation metrics: point accuracy per gene panel, calibration and proper scores of
predictive distributions, QC pass rate and QC fidelity of generated spots, paired tests and
spatial bootstrap intervals over held-out sections, disentanglement probes, and benchmark
tables."""
from .calibration import (
    COVERAGE_LEVELS,
    calibration_records,
    crps,
    interval_coverage,
    nb_log_prob,
    nll,
    pit,
    pit_histogram,
    reliability,
)
from .disentanglement import probe_matrix, silhouette_matrix
from .normalize import normalize_log1p
from .panels import hvg_panel
from .qcpr import qcpr
from .regression import REGRESSION_METRICS, mae, mse, pcc_gene, pcc_spot, r2, r2_pooled, regression_metrics
from .report import format_table, summarize
from .stats import BootstrapCI, SignFlipResult, block_bootstrap_ci, constant_profile_counts, energy_distance, paired_sign_flip_test, qc_fidelity

__all__ = [
    "BootstrapCI",
    "SignFlipResult",
    "block_bootstrap_ci",
    "constant_profile_counts",
    "energy_distance",
    "paired_sign_flip_test",
    "qc_fidelity",
    "COVERAGE_LEVELS",
    "REGRESSION_METRICS",
    "calibration_records",
    "crps",
    "format_table",
    "hvg_panel",
    "interval_coverage",
    "mae",
    "mse",
    "nb_log_prob",
    "nll",
    "normalize_log1p",
    "pcc_gene",
    "pcc_spot",
    "pit",
    "pit_histogram",
    "probe_matrix",
    "qcpr",
    "r2",
    "r2_pooled",
    "regression_metrics",
    "reliability",
    "silhouette_matrix",
    "summarize",
]
