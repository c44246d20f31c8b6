"""spartha_pyro.pl"""
from .evaluation import latent_umaps, probe_heatmap

__all__ = ["latent_umaps", "probe_heatmap"]
