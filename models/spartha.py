r"""The SPARTHA generative model ``p(X_t, X_h, l | Z_y, Z_d, Z_r, Z_x) p(Z | L)``.

For each spot ``n`` (a ``pyro.plate("spots")`` with subsampling):

.. math::

    Z_y^k &\sim \mathcal N(\mu^k_{L^k_n}, \sigma^k_{L^k_n}) \quad k = 1..m
        \qquad\text{(biological latents, one per label set)}\\
    Z_d &\sim \mathcal N(\mu^d_{L_{d,n}}, \sigma^d_{L_{d,n}})
        \qquad\text{(batch / slide latent)}\\
    Z_r &\sim \mathcal N(\mu^r_{L_{r,n}}, \sigma^r_{L_{r,n}})
        \qquad\text{(artifact latent, } L_r = \text{QC pass/fail)}\\
    Z_x &\sim \mathcal N(0, I) \qquad\text{(optional free residual, SpatialDIVA's } z_x)\\
    h &= f_\theta(Z_y^{1..m}, Z_d, Z_r, Z_x)\\
    \log l_n &\sim \mathcal N(a_\theta(h), s_\theta) \qquad\text{(log1p library size, observed in training)}\\
    X_{t,n} &\sim \mathrm{NB}(l_n\, \mathrm{softmax}_{M_{d_n}}(W_t h),\ \theta)
        \quad\text{(or ZINB; all genes)}\\
    X_{h,n} &\sim \mathcal N(W_h h, \mathrm{diag}(\sigma_h^2)) \qquad\text{(standardised histology vector)}

A missing label (code ``-1``) makes its prior the class mixture (see
:class:`~spartha_pyro.models.likelihoods.LabelConditionedNormal`). Spots without counts
(``has_counts = False``) or without histology (``has_histology = False``) have that
likelihood masked out. With a gene mask ``M`` (which genes each batch's panel measured, as
after an outer join of sections), the softmax is taken over the genes ``M_{d_n}`` that the
spot's batch measured and the other genes are left out of its count likelihood instead of
being read as zeros; generated counts (``X_t`` not observed) cover every gene. Every site is
scaled by ``1 / n_spots`` so the loss is the negative ELBO per spot and learning rates do not
depend on data size; the plate's subsampling scales a minibatch up to the full data.

With ``artifact_latent=False`` there is no ``Z_r``: the same code is the SpatialDIVA
ablation. The auxiliary classifiers ``q_psi(L | Z)`` live in :mod:`spartha_pyro.guides`.
"""
from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..config import ModelConfig
from .likelihoods import LabelConditionedNormal, count_likelihood

def make_fc(dims: Sequence[int], dropout: float = 0.0, last_activation: bool = False) -> nn.Sequential:
    """Fully connected stack ``dims[0] -> ... -> dims[-1]`` with LayerNorm + ReLU between layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers += [nn.LayerNorm(b), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class LabelPrior(PyroModule):
    """Learned per-class location and scale of ``p(Z | L)`` for one label set: ``(C, D)`` each."""

    def __init__(self, class_counts: torch.Tensor, dim: int):
        super().__init__()
        n_classes = len(class_counts)
        self.loc = nn.Parameter(torch.randn(n_classes, dim) * (0.5 if n_classes > 1 else 0.0))
        self.raw_scale = nn.Parameter(torch.zeros(n_classes, dim))
        self.register_buffer("class_logits", torch.log(class_counts.float().clamp(min=1.0)))

    def forward(self, labels: torch.Tensor) -> LabelConditionedNormal:
        return LabelConditionedNormal(labels, self.loc, F.softplus(self.raw_scale) + 1e-3, self.class_logits)


class SparthaModel(PyroModule):
    """The generative model (see the module docstring for the math).

    Parameters
    ----------
    n_spots
        Number of training spots ``N`` (plate size and ELBO normaliser).
    n_genes
        Number of genes ``G`` modelled (all genes).
    histology_dim
        Width ``H`` of the (standardised) histology vector.
    label_class_counts
        One tensor of per-class spot counts per label set ``k`` (their lengths are the class
        numbers; the counts weight the prior mixture for unlabelled spots).
    batch_class_counts, qc_class_counts
        Per-class counts for the batch and the QC label (``[n_fail, n_pass]``).
    config
        Architecture: ``y_dim``, ``d_dim``, ``r_dim``, ``x_dim``, ``hidden``, ``likelihood``
        and ``artifact_latent`` (``False`` drops ``Z_r``: SpatialDIVA) are read here.
    gene_mask
        Bool ``(n_batches, G)``: ``True`` where batch ``d`` measured gene ``g`` (``None``:
        every batch measured every gene). A batch with no measured gene (no counts) counts
        as measuring all of them.
    """

    def __init__(
        self,
        n_spots: int,
        n_genes: int,
        histology_dim: int,
        label_class_counts: Sequence[torch.Tensor],
        batch_class_counts: torch.Tensor,
        qc_class_counts: torch.Tensor,
        config: ModelConfig | None = None,
        gene_mask: torch.Tensor | None = None,
    ):
        super().__init__()
        c = config or ModelConfig()
        self.n_spots, self.n_genes, self.histology_dim = n_spots, n_genes, histology_dim
        self.artifact_latent, self.likelihood = c.artifact_latent, c.likelihood
        self.dims = {f"z_y{k}": c.y_dim for k in range(len(label_class_counts))}
        self.dims["z_d"] = c.d_dim
        if c.artifact_latent:
            self.dims["z_r"] = c.r_dim
        if c.x_dim > 0:
            self.dims["z_x"] = c.x_dim

        self.prior_y = nn.ModuleList([LabelPrior(counts, c.y_dim) for counts in label_class_counts])
        self.prior_d = LabelPrior(batch_class_counts, c.d_dim)
        self.prior_r = LabelPrior(qc_class_counts, c.r_dim) if c.artifact_latent else None

        z_total = sum(self.dims.values())
        self.trunk = make_fc([z_total, c.hidden, c.hidden], last_activation=True)
        self.gene_logits = nn.Linear(c.hidden, n_genes)
        self.gate_logits = nn.Linear(c.hidden, n_genes) if c.likelihood == "zinb" else None
        self.log_theta = nn.Parameter(torch.full((n_genes,), 1.0))
        self.library_loc = nn.Linear(c.hidden, 1)
        self.library_raw_scale = nn.Parameter(torch.zeros(1))
        self.histology_loc = nn.Linear(c.hidden, histology_dim)
        self.histology_raw_scale = nn.Parameter(torch.zeros(histology_dim))
        if gene_mask is not None:
            if gene_mask.shape != (len(batch_class_counts), n_genes):
                want = (len(batch_class_counts), n_genes)
                raise ValueError(f"gene_mask must be (n_batches, n_genes) = {want}, got {tuple(gene_mask.shape)}")
            gene_mask = gene_mask.bool() | ~gene_mask.bool().any(-1, keepdim=True)
        self.register_buffer("gene_mask", gene_mask)

    def measured(self, batch: torch.Tensor) -> torch.Tensor | None:
        """Bool ``(B, G)``: the genes each spot's batch measured (all for an unknown batch ``-1``); ``None`` without a mask."""
        if self.gene_mask is None:
            return None
        return self.gene_mask[batch.clamp(min=0)] | (batch < 0).unsqueeze(-1)

    def latent_priors(self, labels, batch, qc):
        """``{site: p(Z | L)}`` for the spots of a minibatch, in decoding order."""
        priors = {f"z_y{k}": p(labels[:, k]) for k, p in enumerate(self.prior_y)}
        priors["z_d"] = self.prior_d(batch)
        if self.artifact_latent:
            priors["z_r"] = self.prior_r(qc)
        if "z_x" in self.dims:
            loc = batch.new_zeros((len(batch), self.dims["z_x"]), dtype=torch.float32)
            priors["z_x"] = dist.Normal(loc, 1.0).to_event(1)
        return priors

    def decode(self, z: torch.Tensor):
        """Decoder heads for concatenated latents ``z`` ``(batch, sum(dims))``; every output
        is float32 (under bfloat16 autocast only the layers' matrix products are not)."""
        h = self.trunk(z)
        gate = self.gate_logits(h).float() if self.gate_logits is not None else None
        lib_scale = F.softplus(self.library_raw_scale) + 1e-3
        hist_scale = F.softplus(self.histology_raw_scale) + 1e-3
        return (
            F.softmax(self.gene_logits(h).float(), -1),
            gate,
            self.library_loc(h).squeeze(-1).float(),
            lib_scale,
            self.histology_loc(h).float(),
            hist_scale,
        )

    def forward(self, x_t, x_h, labels, batch, qc, has_counts, has_histology, index):
        """Run the generative program on one minibatch.

        Parameters
        ----------
        x_t
            ``(B, G)`` float counts, or ``None`` to generate them.
        x_h
            ``(B, H)`` standardised histology (rows of spots without histology are ignored),
            or ``None`` to generate.
        labels
            ``(B, m)`` long label codes, ``-1`` = missing.
        batch, qc
            ``(B,)`` long batch and QC codes (QC: 0 fail, 1 pass; ``-1`` = unknown).
        has_counts, has_histology
            ``(B,)`` bool masks of observed modalities.
        index
            ``(B,)`` long spot indices into the training set (the plate's subsample).
        """
        with poutine.scale(scale=1.0 / self.n_spots), pyro.plate("spots", self.n_spots, subsample=index):
            z = [pyro.sample(name, prior) for name, prior in self.latent_priors(labels, batch, qc).items()]
            rho, gate, lib_loc, lib_scale, hist_loc, hist_scale = self.decode(torch.cat(z, -1))
            if gate is not None:  # named, so that prediction can integrate the count noise out
                gate = pyro.deterministic("zi_logits", gate, event_dim=1)

            measured = self.measured(batch) if x_t is not None else None
            if measured is not None:  # proportions over the genes this spot's panel measured
                rho = rho * measured
                rho = rho / rho.sum(-1, keepdim=True)
            obs_log_lib = torch.log1p(x_t.sum(-1)) if x_t is not None else None
            log_lib = pyro.sample(
                "log_library", dist.Normal(lib_loc, lib_scale).mask(has_counts), obs=obs_log_lib
            )
            mu = pyro.deterministic("mu", torch.expm1(log_lib).clamp(min=0.0).unsqueeze(-1) * rho, event_dim=1)
            theta = self.log_theta.exp()
            pyro.sample("x_t", count_likelihood(mu, theta, gate, measured).mask(has_counts), obs=x_t)
            pyro.sample(
                "x_h", dist.Normal(hist_loc, hist_scale).to_event(1).mask(has_histology), obs=x_h
            )
