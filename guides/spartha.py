r"""Amortized guides of SPARTHA, site by site with :class:`~spartha_pyro.models.SparthaModel`.

Two inference paths share one set of auxiliary classifiers ``q_psi(L | Z)``:

- :class:`FullGuide` — ``q_phi(Z_y^{1..m}, Z_d, Z_r, Z_x | X_t, X_h)``, a diagonal Normal per
  latent from an expression embedding (log1p of counts per 10,000 plus the log library) and
  a histology embedding. Spots without counts fall back to the histology path.
- :class:`HistologyGuide` — ``q_phi'(Z | X_h)``, from histology alone: the path used at
  prediction time, when a slide has an image and no counts.

**Why two guides, trained jointly.** At prediction time there are no counts, so the
histology path must itself be a good posterior. The training objective is

.. math::

    \mathcal L = \mathrm{ELBO}(p, q_\phi(Z | X_t, X_h))
        + \lambda_h\, \mathrm{ELBO}(p, q_{\phi'}(Z | X_h))
        + \sum_j \alpha_j\, \mathbb E_q \log q_\psi(L_j | Z_j)

so the histology-only posterior must explain *both* ``X_t`` and ``X_h`` under the shared
decoder (its ELBO is masked for spots without histology), while the full posterior keeps the
decoder and priors sharp. The classifier terms enter as ``pyro.factor`` sites in each guide
(weights ``alpha``), masked where a label is missing; a guide factor adds to ``log q``, so
``-alpha log q_psi(L | z)`` is minimised with the loss, with reparameterised gradients
reaching the encoders (``has_rsample=True``).
"""
from __future__ import annotations

from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..models.spartha import make_fc


class AuxClassifiers(nn.Module):
    """``q_psi(L | Z)``: one linear classifier per latent that has a label.

    Parameters
    ----------
    dims
        ``{site: latent width}`` for the sites that are classified (``z_y{k}``, ``z_d``, ``z_r``).
    n_classes
        ``{site: number of classes}``; sites with fewer than two classes get no classifier.
    """

    def __init__(self, dims: Mapping[str, int], n_classes: Mapping[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict(
            {s: nn.Linear(dims[s], n_classes[s]) for s in dims if n_classes.get(s, 0) >= 2}
        )

    def logits(self, site: str, z: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` float32 class logits of ``q_psi(L | z)`` for latent ``site``."""
        return self.heads[site](z).float()

    def factors(self, z: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], weights: Mapping[str, float]):
        """Add ``-w * log q_psi(L | z)`` per classified site as a guide factor (missing labels masked)."""
        for site in self.heads:
            target = targets[site]
            log_q = dist.Categorical(logits=self.logits(site, z[site])).log_prob(target.clamp(min=0))
            pyro.factor(f"aux_{site}", -weights[site] * log_q * (target >= 0), has_rsample=True)


def classifier_targets(labels, batch, qc, sites) -> dict[str, torch.Tensor]:
    """Map each latent site to the label it is classified against."""
    out = {f"z_y{k}": labels[:, k] for k in range(labels.shape[1])}
    out["z_d"] = batch
    if "z_r" in sites:
        out["z_r"] = qc
    return out


class NormalHeads(nn.Module):
    """From a feature vector to ``(loc, scale)`` of a diagonal Normal per latent site.

    ``hidden=None`` makes each head a single linear map (a ridge-like, low-capacity path).
    """

    def __init__(self, in_dim: int, dims: Mapping[str, int], hidden: int | None):
        super().__init__()
        widths = [in_dim] + ([hidden] if hidden else [])
        self.heads = nn.ModuleDict({s: make_fc(widths + [2 * d]) for s, d in dims.items()})

    def forward(self, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for site, head in self.heads.items():
            loc, raw = head(h).float().chunk(2, -1)  # float32 Normal parameters, also under autocast
            out[site] = (loc, F.softplus(raw) + 1e-4)
        return out


class HistologyEncoder(nn.Module):
    """``X_h -> {site: (loc, scale)}``; ``kind="mlp"`` or ``"linear"`` (ridge-like).

    Input dropout on the histology vector regularises the path that must generalise to new
    slides. Rows of spots without histology are zeroed before encoding.
    """

    def __init__(self, histology_dim: int, dims: Mapping[str, int], hidden: int, dropout: float, kind: str):
        super().__init__()
        if kind not in ("mlp", "linear"):
            raise ValueError(f"histology encoder kind must be 'mlp' or 'linear', got {kind!r}")
        self.dropout = nn.Dropout(dropout)
        if kind == "mlp":
            self.body = make_fc([histology_dim, hidden], dropout=dropout, last_activation=True)
            self.heads = NormalHeads(hidden, dims, hidden)
        else:
            self.body = nn.Identity()
            self.heads = NormalHeads(histology_dim, dims, None)

    def forward(self, x_h: torch.Tensor, has_histology: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        x_h = torch.nan_to_num(x_h) * has_histology.unsqueeze(-1)
        return self.heads(self.body(self.dropout(x_h)))


class _GuideBase(PyroModule):
    """Samples every latent site from the encoder's Normal and adds the classifier factors."""

    def __init__(self, n_spots: int, dims: Mapping[str, int], classifiers: AuxClassifiers, aux_weights: Mapping[str, float]):
        super().__init__()
        self.n_spots, self.dims = n_spots, dict(dims)
        self.classifiers = classifiers
        self.aux_weights = dict(aux_weights)

    def encode(self, x_t, x_h, has_counts, has_histology) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x_t, x_h, labels, batch, qc, has_counts, has_histology, index):
        """Same signature as the model; see :meth:`SparthaModel.forward`."""
        params = self.encode(x_t, x_h, has_counts, has_histology)
        with poutine.scale(scale=1.0 / self.n_spots), pyro.plate("spots", self.n_spots, subsample=index):
            z = {s: pyro.sample(s, dist.Normal(*params[s]).to_event(1)) for s in self.dims}
            self.classifiers.factors(z, classifier_targets(labels, batch, qc, self.dims), self.aux_weights)
        return z


class HistologyGuide(_GuideBase):
    """``q(Z | X_h)``: the histology-only posterior (prediction path)."""

    def __init__(self, encoder: HistologyEncoder, n_spots, dims, classifiers, aux_weights):
        super().__init__(n_spots, dims, classifiers, aux_weights)
        self.encoder = encoder

    def encode(self, x_t, x_h, has_counts, has_histology):
        return self.encoder(x_h, has_histology)


class FullGuide(_GuideBase):
    """``q(Z | X_t, X_h)``: expression + histology posterior; spots without counts use ``q(Z | X_h)``."""

    def __init__(self, n_genes: int, histology_dim: int, histology_encoder: HistologyEncoder, n_spots, dims, classifiers, aux_weights, hidden: int, dropout: float = 0.1):
        super().__init__(n_spots, dims, classifiers, aux_weights)
        self.histology_encoder = histology_encoder
        self.expression = make_fc([n_genes + 1, hidden], dropout=dropout, last_activation=True)
        self.histology = make_fc([histology_dim + 1, hidden // 2], dropout=dropout, last_activation=True)
        self.heads = NormalHeads(hidden + hidden // 2, dims, hidden)

    def encode(self, x_t, x_h, has_counts, has_histology):
        total = x_t.sum(-1, keepdim=True)
        expr_in = torch.cat([torch.log1p(1e4 * x_t / total.clamp(min=1.0)), torch.log1p(total)], -1)
        hist_in = torch.cat([torch.nan_to_num(x_h) * has_histology.unsqueeze(-1), has_histology.unsqueeze(-1).float()], -1)
        full = self.heads(torch.cat([self.expression(expr_in), self.histology(hist_in)], -1))
        hist_only = self.histology_encoder(x_h, has_histology)
        keep = has_counts.unsqueeze(-1)
        return {s: tuple(torch.where(keep, f, h) for f, h in zip(full[s], hist_only[s])) for s in full}
