"""The container that owns SPARTHA's model, guides and every Pyro verb on them (no AnnData here).

:class:`SparthaModule` builds :class:`~spartha_pyro.models.SparthaModel`, the two guides of
:mod:`spartha_pyro.guides` with their shared classifiers, and computes the training loss

``loss = -ELBO(model, full guide) - histology_weight * ELBO(model, histology guide)``

per spot (the classifier factors sit inside each guide; minibatches stratified by histology
get per-stratum scales, :meth:`SparthaModule.stratum_scale`). The histology path's ELBO is masked
for spots without histology. Everything else done to the programs is here too, one
:class:`~spartha_pyro.loaders.Batch` at a time: posterior predictive draws (with the
artifact-free override), posterior means of the latents, the histology path's prediction,
classifier accuracy and the diagnosis of a non-finite loss. :mod:`spartha_pyro.model` turns
AnnData into batches and results back into arrays; :mod:`spartha_pyro.train` runs the loop.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from pyro import poutine
from pyro.infer import JitTrace_ELBO, Predictive, Trace_ELBO
from pyro.nn.module import to_pyro_module_
from torch import nn

from .config import ModelConfig
from .data import QC_CODES
from .guides import AuxClassifiers, FullGuide, HistologyEncoder, HistologyGuide, classifier_targets
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
        #: ``(spots with histology, spots without)`` in the training set while minibatches are
        #: stratified by histology (set by :func:`spartha_pyro.train.fit`), else ``None``
        self.strata: tuple[int, int] | None = None
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
        self._full_programs = (self._stratified(self.model), self._stratified(self.guide_full))
        self._hist_programs = (self._stratified(self.histology_model), self._stratified(self.histology_guide))

    def stratum_scale(self, has_histology: torch.Tensor) -> torch.Tensor | float:
        """Per-spot ELBO weight ``(B,)`` that keeps a minibatch stratified by histology unbiased.

        The plate scales every spot of a minibatch of ``B`` by ``N / B``; a stratum of ``N_s``
        spots with ``m_s`` of them in the minibatch must be scaled by ``N_s / m_s``, so each
        spot gets ``(N_s / m_s) (B / N)`` (1 when the minibatch holds the strata in their data
        proportions). ``1.0`` when :attr:`strata` is ``None`` (uniform minibatches).
        """
        if self.strata is None:
            return 1.0
        n_with, n_without = self.strata
        b = has_histology.shape[0]
        m_with = has_histology.sum()
        weight = torch.where(has_histology, n_with / m_with.clamp(min=1), n_without / (b - m_with).clamp(min=1))
        return weight * (b / (n_with + n_without))

    def _stratified(self, program):
        """``program`` with every site scaled by :meth:`stratum_scale` (computed inside the
        program from the batch, so a JIT trace stays valid for every minibatch)."""

        def run(*args):
            with poutine.scale(scale=self.stratum_scale(Batch(*args).has_histology)):
                return program(*args)

        return run

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
        loss_full = self._elbo_full.differentiable_loss(*self._full_programs, *batch)
        loss_hist = self._elbo_hist.differentiable_loss(*self._hist_programs, *batch)
        return loss_full, loss_hist

    def histology_loss(self, batch: Batch) -> torch.Tensor:
        """The histology path's negative ELBO per spot, always eager (a traced ELBO is fixed to
        the training minibatch's shape)."""
        return Trace_ELBO().differentiable_loss(self.histology_model, self.histology_guide, *batch)

    def latent_means(self, batch: Batch, sites: Sequence[str], encoder: str = "full") -> torch.Tensor:
        """Posterior means of ``sites``, concatenated ``(B, sum of widths)``, from the full guide
        ``q(Z | X_t, X_h)`` (``encoder="full"``) or the histology guide ``q(Z | X_h)``."""
        guide = self.guide_full if encoder == "full" else self.guide_hist
        params = guide.encode(batch.x_t, batch.x_h, batch.has_counts, batch.has_histology)
        return torch.cat([params[s][0] for s in sites], -1)

    def histology_prediction(self, batch: Batch) -> torch.Tensor:
        """Expression proportions ``rho(E_q[Z | X_h])`` ``(B, G)``: the decoder at the histology posterior means."""
        return self.model.decode(self.latent_means(batch, list(self.model.dims), "histology"))[0]

    def posterior_predictive(
        self, batch: Batch, num_samples: int, sites: Sequence[str], artifact_free: bool
    ) -> dict[str, torch.Tensor]:
        """Draws ``{site: (num_samples, B, ...)}`` of model ``sites`` from histology alone:
        ``Z ~ q(Z | X_h)``, then the model generates (``batch.x_t`` is ignored).

        ``artifact_free``: ``Z_r`` is drawn from its prior given a passing spot,
        ``p(Z_r | L_r = pass)``, instead of from ``q(Z_r | X_h)`` (hidden from the guide, so
        ``Predictive`` samples it from the model).
        """
        batch = batch._replace(x_t=None, qc=torch.full_like(batch.qc, QC_CODES["pass"]),
                               index=torch.arange(len(batch.index), device=batch.index.device))
        hide_r = artifact_free and "z_r" in self.model.dims
        guide = poutine.block(self.guide_hist, hide=["z_r"]) if hide_r else self.guide_hist
        predictive = Predictive(self.model, guide=guide, num_samples=num_samples, return_sites=list(sites))
        return predictive(*batch)

    def classifier_accuracy(self, batch: Batch) -> dict[str, float]:
        """``{"acc_<site>": accuracy}`` of each ``q_psi(L | Z)`` at the full guide's posterior means
        (spots with a known label only)."""
        params = self.guide_full.encode(batch.x_t, batch.x_h, batch.has_counts, batch.has_histology)
        targets = classifier_targets(batch.labels, batch.batch, batch.qc, self.model.dims)
        out = {}
        for site, head in self.classifiers.heads.items():
            t = targets[site]
            known = t >= 0
            if known.any():
                pred = head(params[site][0]).argmax(-1)
                out[f"acc_{site}"] = float((pred[known] == t[known]).float().mean())
        return out

    @torch.no_grad()
    def diagnose_nonfinite(self, batch: Batch) -> str:
        """Names of the model/guide terms (and parameters) that are not finite on ``batch``."""
        bad = []
        for path, guide, model in (
            ("full", self.guide_full, self.model),
            ("histology", self.histology_guide, self.histology_model),
        ):
            guide_tr = poutine.trace(guide).get_trace(*batch)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*batch)
            for where, tr in (("guide", guide_tr), ("model", model_tr)):
                tr.compute_log_prob()
                for name, site in tr.nodes.items():
                    if site["type"] == "sample" and not torch.isfinite(site["log_prob_sum"]):
                        bad.append(f"{where} site {name!r} ({path} path)")
        nonfinite_params = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if nonfinite_params:
            bad.append(f"parameters {nonfinite_params[:5]}")
        return "; ".join(bad) or "no single term (overflow in the sum)"
