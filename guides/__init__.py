"""Amortized Pyro guides of SPARTHA (installed as ``spartha_pyro.guides``)."""
from .spartha import AuxClassifiers, FullGuide, HistologyEncoder, HistologyGuide, NormalHeads, classifier_targets

__all__ = ["FullGuide", "HistologyGuide", "HistologyEncoder", "AuxClassifiers", "NormalHeads", "classifier_targets"]
