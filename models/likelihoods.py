"""Observation and prior distributions used by the SPARTHA generative model.

- :class:`LabelConditionedNormal` — the DIVA prior ``p(Z | L)``: a diagonal Normal with a
  learned location and scale per class; a spot with a missing label (code ``-1``) gets the
  mixture over classes weighted by the training class frequencies, ``sum_c pi_c N(mu_c,
  sigma_c)`` (the marginal prior, as in semi-supervised VAEs), so unlabelled spots still
  train every encoder without guessing their label.
- :func:`count_likelihood` — negative binomial (or zero-inflated NB) on raw counts with mean
  ``mu = library * rho``, parameterised by inverse dispersion ``theta`` and logits
  ``log(mu + eps) - log(theta + eps)`` for numerical stability (as in Pyro's scANVI).
  The NB is :class:`GeneNegativeBinomial`: the same density as ``NegativeBinomial``, with
  ``lgamma(theta)`` computed once per gene instead of once per spot and gene.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro import distributions as dist
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution

EPS = 1e-6


class LabelConditionedNormal(TorchDistribution):
    """``p(z | L)``: ``Normal(loc[L], scale[L])``; the class mixture where ``L == -1``.

    Parameters
    ----------
    labels
        Long tensor ``(batch,)``: class codes in ``[0, C)`` or ``-1`` for missing.
    loc, scale
        ``(C, D)`` per-class locations and (positive) scales.
    class_logits
        ``(C,)`` log mixture weights used for missing labels.

    Event shape ``(D,)``, batch shape ``(batch,)``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 1)
    has_rsample = False

    def __init__(self, labels, loc, scale, class_logits, validate_args=None):
        self.labels, self.loc, self.scale = labels, loc, scale
        self.class_logits = class_logits
        super().__init__(labels.shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return LabelConditionedNormal(
            self.labels.expand(batch_shape), self.loc, self.scale, self.class_logits, validate_args=False
        )

    def log_prob(self, value):
        # (..., batch, 1, D) against (C, D) -> (..., batch, C)
        comp = dist.Normal(self.loc, self.scale).log_prob(value.unsqueeze(-2)).sum(-1)
        known = self.labels >= 0
        own = comp.gather(-1, self.labels.clamp(min=0).expand(comp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        mixture = torch.logsumexp(comp + F.log_softmax(self.class_logits, -1), -1)
        return torch.where(known, own, mixture)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            shape = torch.Size(sample_shape) + self.batch_shape
            drawn = torch.distributions.Categorical(logits=self.class_logits).sample(shape)
            cls = torch.where(self.labels >= 0, self.labels.expand(shape), drawn)
            return torch.normal(self.loc[cls], self.scale[cls])


class GeneNegativeBinomial(dist.NegativeBinomial):
    """``NegativeBinomial(total_count=theta, logits)`` with a per-gene ``theta``, cheaper ``log_prob``.

    Same density as :class:`torch.distributions.NegativeBinomial`,

    ``log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta log sigmoid(-l) + x log sigmoid(l)``,

    rewritten with ``log sigmoid(l) = l + log sigmoid(-l)`` (one ``logsigmoid`` instead of
    two) and ``lgamma(theta)`` on the ``(G,)`` vector, not on the broadcast ``(B, G)`` array
    (half the ``digamma`` work in the backward pass).

    Parameters
    ----------
    theta
        ``(G,)`` inverse dispersion, positive.
    logits
        ``(B, G)`` NB logits.
    """

    def __init__(self, theta: torch.Tensor, logits: torch.Tensor):
        super().__init__(total_count=theta, logits=logits, validate_args=False)
        self.theta = theta

    def expand(self, batch_shape, _instance=None):
        # Pyro's plates call expand on every sample site (even to the same shape): stay a
        # GeneNegativeBinomial, or training silently falls back to the generic density
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        if batch_shape[-1:] != self.theta.shape[-1:]:
            raise ValueError(f"cannot expand over genes: batch_shape {tuple(batch_shape)}, theta {tuple(self.theta.shape)}")
        return GeneNegativeBinomial(self.theta, self.logits.expand(batch_shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        theta = self.theta
        log_unnormalized = (theta + value) * F.logsigmoid(-self.logits) + value * self.logits
        return log_unnormalized + torch.lgamma(theta + value) - torch.lgamma(1.0 + value) - torch.lgamma(theta)


def count_likelihood(mu, theta, gate_logits=None, gene_mask=None):
    """NB (``gate_logits is None``) or zero-inflated NB over genes, event dim 1.

    Parameters
    ----------
    mu
        ``(batch, genes)`` expected counts (``library * rho``), non-negative.
    theta
        ``(genes,)`` inverse dispersion, positive.
    gate_logits
        ``(batch, genes)`` logits of the zero-inflation gate, or ``None`` for plain NB.
    gene_mask
        Bool ``(batch, genes)``: genes left out of the log-density where ``False``
        (unmeasured), or ``None`` for all genes.
    """
    logits = (mu + EPS).log() - (theta + EPS).log()
    d = GeneNegativeBinomial(theta, logits)
    if gate_logits is not None:
        d = dist.ZeroInflatedDistribution(d, gate_logits=gate_logits, validate_args=False)
    return (d if gene_mask is None else d.mask(gene_mask)).to_event(1)


def expected_log1p_normalised(
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor | None = None,
    target_sum: float = 1e4,
    exact_below: int = 32,
    ratio: float = 1.05,
    tol: float = 1e-5,
) -> torch.Tensor:
    """``E[log1p(target_sum * x / l)]`` for ``x ~ NB(mu, theta)`` (or the ZINB), per element.

    The point prediction in the metric's space with the count noise integrated out instead of
    sampled (Rao-Blackwellised). ``l = sum_g E[x_g]`` is the spot's library: the model's own
    ``l`` (``mu = l * rho``), which in training is the observed total count.

    The expectation is a sum over the NB probabilities: exact for ``x < exact_below`` (the
    recurrence ``p(k+1) / p(k) = (k + theta) / (k + 1) * mu / (mu + theta)``), and for the rest
    of the mass (kept only where it exceeds ``tol``) a quadrature on a geometric grid of ratio
    ``ratio``, on which the NB is smooth, normalised to that mass. Absolute error ~1e-3.

    Parameters
    ----------
    mu
        ``(..., G)`` NB means (expected counts), non-negative.
    theta
        ``(G,)`` inverse dispersion.
    gate_logits
        ``(..., G)`` zero-inflation logits, or ``None`` (plain NB).

    Returns
    -------
    ``(..., G)`` tensor, the dtype of ``mu``.
    """
    keep = 1.0 if gate_logits is None else torch.sigmoid(-gate_logits)  # P(not a structural zero)
    library = (keep * mu).sum(-1, keepdim=True).clamp(min=1.0)
    scale = (target_sum / library).expand_as(mu)
    theta = theta.expand_as(mu)
    p = mu / (mu + theta)
    pmf = torch.exp(theta * (torch.log(theta) - torch.log(theta + mu)))  # P(x = 0)
    mass, out = torch.zeros_like(mu), torch.zeros_like(mu)
    for k in range(exact_below):
        mass += pmf
        if k:
            out += pmf * torch.log1p(scale * k)
        pmf = pmf * (k + theta) / (k + 1) * p
    tail = (1 - mass) > tol
    if tail.any():
        m, th, sc = mu[tail], theta[tail], scale[tail]
        top = float((m + 30 * torch.sqrt(m + m * m / th)).max())
        n = int(math.ceil(math.log(top / (exact_below - 0.5)) / math.log(ratio))) + 2
        x = (exact_below - 0.5) * ratio ** torch.arange(n, dtype=mu.dtype, device=mu.device)
        width = torch.diff(torch.cat([x[:1], (x[1:] + x[:-1]) / 2, x[-1:]]))
        th_, m_ = th[:, None], m[:, None]
        log_pmf = (torch.lgamma(x + th_) - torch.lgamma(th_) - torch.lgamma(x + 1)
                   + th_ * (torch.log(th_) - torch.log(th_ + m_)) + x * (torch.log(m_) - torch.log(th_ + m_)))
        w = width * torch.exp(log_pmf - log_pmf.max(-1, keepdim=True).values)
        out[tail] += (1 - mass[tail]) * (w * torch.log1p(sc[:, None] * x)).sum(-1) / w.sum(-1)
    return keep * out
