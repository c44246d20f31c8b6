"""The container that owns SPARTHA's model, guides and objective (no AnnData here).

:class:`SparthaModule` builds :class:`~spartha_pyro.models.SparthaModel`, the two guides of
:mod:`spartha_pyro.guides` with their shared classifiers, and computes the training loss

``loss = -ELBO(model, full guide) - histology_weight * ELBO(model, histology guide)``

per spot (the classifier factors sit inside each guide). The histology path's ELBO is masked
for spots without histology.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from pyro.nn.module import to_pyro_module_
from torch import nn

from .config import ModelConfig
from .guides import AuxClassifiers, FullGuide, HistologyEncoder, HistologyGuide
from .loaders import Batch
from .models import SparthaModel


class SparthaModule(nn.Module):
    """Model, full guide, histology guide and classifiers, with the joint loss.

    Parameters
    ----------
    n_spots, n_genes, histology_dim
        Training set size, number of genes, histology width.
    label_class_counts, batch_class_counts, qc_class_counts
        Per-class spot counts (see :class:`~spartha_pyro.models.SparthaModel`).
    config
        The architecture (:class:`~spartha_pyro.config.ModelConfig`).
    gene_mask
        Bool ``(n_batches, n_genes)`` of the genes each batch measured (``None``: all).
    """

    def __init__(
        self,
        n_spots: int,
        n_genes: int,
        histology_dim: int,
        label_class_counts: Sequence[torch.Tensor],
        batch_class_counts: torch.Tensor,
        qc_class_counts: torch.Tensor,
        config: ModelConfig,
        gene_mask: torch.Tensor | None = None,
    ):
        super().__init__()
        self.model = SparthaModel(
            n_spots, n_genes, histology_dim, label_class_counts, batch_class_counts, qc_class_counts, config, gene_mask
        )
        dims = self.model.dims
        classified = {s: d for s, d in dims.items() if s != "z_x"}
        site_weights = {s: config.aux_weights["y" if s.startswith("z_y") else s[-1]] for s in classified}
        n_classes = {f"z_y{k}": len(c) for k, c in enumerate(label_class_counts)}
        n_classes.update(z_d=len(batch_class_counts), z_r=len(qc_class_counts))
        self.classifiers = AuxClassifiers(classified, n_classes)
        hist_encoder = HistologyEncoder(
            histology_dim, dims, config.hidden, config.histology_dropout, config.histology_encoder
        )
        self.guide_hist = HistologyGuide(hist_encoder, n_spots, dims, self.classifiers, site_weights)
        self.guide_full = FullGuide(
            n_genes, histology_dim, hist_encoder, n_spots, dims, self.classifiers, site_weights, config.hidden
        )
        self.histology_weight = config.histology_weight
        for program in (self.model, self.guide_full, self.guide_hist):
            to_pyro_module_(program)  # every submodule a PyroModule: needed by Pyro's JIT
        self.configure(n_spots, jit=False)

    def configure(self, n_spots: int, jit: bool) -> None:
        """Set the training-set size (the ELBO's plate size) and the ELBO implementation.

        ``jit=True`` uses :class:`~pyro.infer.JitTrace_ELBO`: shapes are traced once, so train
        with full minibatches only.
        """
        for program in (self.model, self.guide_full, self.guide_hist):
            program.n_spots = n_spots
        make = (lambda: JitTrace_ELBO(ignore_jit_warnings=True)) if jit else Trace_ELBO
        self._elbo_full, self._elbo_hist = make(), make()
        # JitTrace_ELBO keys its compiled function on id(model), id(guide): a bound method
        # made afresh at each call (``self.histology_model``) would be re-traced every step
        # (and every trace kept), so hold one bound method per program.
        self._hist_programs = (self.histology_model, self.histology_guide)

    def histology_model(self, *args):
        """The model with every site masked to spots that have histology (``args``: a :class:`Batch`)."""
        with poutine.mask(mask=Batch(*args).has_histology):
            return self.model(*args)

    def histology_guide(self, *args):
        """The histology guide with every site masked to spots that have histology."""
        with poutine.mask(mask=Batch(*args).has_histology):
            return self.guide_hist(*args)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_full, loss_hist)``: negative ELBOs per spot of both paths on a minibatch."""
        loss_full = self._elbo_full.differentiable_loss(self.model, self.guide_full, *batch)
        loss_hist = self._elbo_hist.differentiable_loss(*self._hist_programs, *batch)
        return loss_full, loss_hist
