"""Preprocessing: QC annotation, histology representations and combining ragged sections."""
from .clusters import expression_clusters
from .combine import combine_sections, gene_overlap
from .features import histology_features, stats_features
from .patches import annotate_patches, iter_patches, patch_qc_metrics, tissue_fraction
from .prepare import prepare
from .qc import annotate_qc, image_outliers, mad_reference, qc_metrics, qc_outliers

__all__ = ["annotate_qc", "expression_clusters", "combine_sections", "gene_overlap", "prepare", "qc_metrics", "mad_reference", "qc_outliers",
           "histology_features", "stats_features", "iter_patches", "annotate_patches", "tissue_fraction",
           "patch_qc_metrics", "image_outliers"]
