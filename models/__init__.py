"""Pyro generative models of SPARTHA (installed as ``spartha_pyro.models``)."""
from .likelihoods import LabelConditionedNormal, count_likelihood, expected_log1p_normalised
from .spartha import LabelPrior, SparthaModel, make_fc

__all__ = ["SparthaModel", "LabelPrior", "LabelConditionedNormal", "count_likelihood", "expected_log1p_normalised", "make_fc"]
