"""Point-prediction baselines: histology vector (or patches) -> log1p-normalised expression."""
from .histogene import HisToGene
from .mean import MeanPredictor
from .ridge import RidgePredictor

__all__ = ["HisToGene", "MeanPredictor", "RidgePredictor"]
