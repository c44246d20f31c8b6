"""Point-prediction baselines: histology vector (or patches) -> log1p-normalised expression;
:class:`NBWrapper` gives any of them a negative binomial predictive distribution of counts."""
from .histogene import HisToGene
from .mean import MeanPredictor
from .nb import LibraryRidge, NBWrapper
from .ridge import RidgePredictor

__all__ = ["HisToGene", "LibraryRidge", "MeanPredictor", "NBWrapper", "RidgePredictor"]
