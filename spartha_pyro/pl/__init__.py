"""spartha_pyro.pl"""
from .calibration import calibration
from .evaluation import latent_umaps, probe_heatmap
from .spatial import qc_failures, qc_summary, spatial

__all__ = ["calibration", "latent_umaps", "probe_heatmap", "qc_failures", "qc_summary", "spatial"]
