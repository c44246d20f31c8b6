"""Unit tests of the model's building blocks, by hand: the label-conditioned prior
``p(Z | L)`` and the auxiliary classifier factors ``-alpha log q_psi(L | Z)``."""
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO

from spartha_pyro.guides import AuxClassifiers
from spartha_pyro.models.likelihoods import LabelConditionedNormal, count_likelihood, expected_log1p_normalised

C, D = 3, 2


@pytest.fixture
def prior():
    """Three well separated classes in 2-d, unequal mixture weights; labels with two missing."""
    torch.manual_seed(0)
    loc = torch.tensor([[-10.0, 0.0], [0.0, 10.0], [10.0, 0.0]])
    scale = torch.tensor([[0.5, 1.0], [1.0, 0.5], [2.0, 0.1]])
    class_logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    labels = torch.tensor([0, 2, -1, 1, -1])
    return LabelConditionedNormal(labels, loc, scale, class_logits)


def _by_hand(prior, value):
    """log p(z | L) one spot at a time, in float64: the class's Normal, or for -1 the mixture
    ``log sum_c pi_c N(z; mu_c, sigma_c)`` with ``pi = softmax(class_logits)``."""
    out = torch.empty(value.shape[:-1], dtype=torch.float64)
    weights = torch.softmax(prior.class_logits.double(), 0)
    labels = prior.labels.expand(value.shape[:-1])
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in value.shape[:-1]]).reshape(-1, value.dim() - 1):
        idx = tuple(idx.tolist())
        z, label = value[idx].double(), int(labels[idx])
        comp = torch.stack([
            torch.distributions.Normal(prior.loc[c].double(), prior.scale[c].double()).log_prob(z).sum() for c in range(C)
        ])
        if label >= 0:
            out[idx] = comp[label]
        else:
            top = comp.max()  # shifted so that exp does not underflow
            out[idx] = top + torch.log((weights * (comp - top).exp()).sum())
    return out.float()


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)  # float32 sums of terms ~1e2


def test_log_prob_is_the_class_normal_or_the_weighted_mixture(prior):
    value = torch.randn(5, D) * 3
    lp = prior.log_prob(value)
    assert lp.shape == (5,)
    _close(lp, _by_hand(prior, value))
    # the mixture for -1: logsumexp over classes of log N(z; mu_c, sigma_c) + log pi_c
    comp = torch.distributions.Normal(prior.loc, prior.scale).log_prob(value[2].unsqueeze(0)).sum(-1)
    _close(lp[2], torch.logsumexp(comp + F.log_softmax(prior.class_logits, 0), 0))
    # with sample dims in front of the batch (Predictive, num_particles)
    many = torch.randn(4, 5, D) * 3
    _close(prior.log_prob(many), _by_hand(prior, many))


def test_mixture_weights_are_normalised(prior):
    """Shifting every class logit by a constant changes nothing: they are log weights up to a constant."""
    value = torch.randn(5, D)
    shifted = LabelConditionedNormal(prior.labels, prior.loc, prior.scale, prior.class_logits + 7.0)
    torch.testing.assert_close(shifted.log_prob(value), prior.log_prob(value))


def test_sample_shapes_and_classes(prior):
    assert prior.batch_shape == (5,) and prior.event_shape == (D,)
    assert prior.sample().shape == (5, D)
    draws = prior.sample((4000,))
    assert draws.shape == (4000, 5, D)
    nearest = torch.cdist(draws.reshape(-1, D), prior.loc).argmin(-1).reshape(4000, 5)
    assert (nearest[:, [0, 1, 3]] == prior.labels[[0, 1, 3]]).all()  # a known label draws from its class
    freq = torch.bincount(nearest[:, [2, 4]].reshape(-1), minlength=C).float() / nearest[:, [2, 4]].numel()
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)  # missing: the mixture
    known = draws[:, 0]
    torch.testing.assert_close(known.mean(0), prior.loc[0], atol=0.05, rtol=0)
    torch.testing.assert_close(known.std(0), prior.scale[0], atol=0.05, rtol=0)


def test_expand(prior):
    same = prior.expand((5,))
    assert isinstance(same, LabelConditionedNormal) and same.batch_shape == (5,)
    wide = prior.expand((3, 5))
    assert isinstance(wide, LabelConditionedNormal) and wide.batch_shape == (3, 5)
    assert wide.sample().shape == (3, 5, D)
    value = torch.randn(3, 5, D)
    _close(wide.log_prob(value), _by_hand(prior, value))
    # as Pyro's plates use it: a sample site inside a plate of the batch size
    with poutine.trace() as tr, pyro.plate("spots", 5):
        pyro.sample("z", prior)
    site = tr.trace.nodes["z"]
    assert site["value"].shape == (5, D)
    _close(site["fn"].log_prob(site["value"]), _by_hand(prior, site["value"]))


# ---------------------------------------------------------------------------- classifiers
@pytest.fixture
def classifiers():
    torch.manual_seed(0)
    # z_d: 3 classes; z_r: 2 classes; z_y0 has one class only, hence no classifier
    return AuxClassifiers({"z_d": 4, "z_r": 4, "z_y0": 4}, {"z_d": 3, "z_r": 2, "z_y0": 1})


def test_classifiers_only_where_there_are_two_classes(classifiers):
    assert sorted(classifiers.heads) == ["z_d", "z_r"]


def _factors(classifiers, z, targets, weights):
    with poutine.trace() as tr:
        classifiers.factors(z, targets, weights)
    return {name: site["fn"].log_prob(site["value"]) for name, site in tr.trace.nodes.items() if site["type"] == "sample"}


def test_factor_is_minus_weighted_log_q_with_missing_labels_masked(classifiers):
    z = {s: torch.randn(6, 4) for s in ("z_d", "z_r", "z_y0")}
    targets = {"z_d": torch.tensor([0, 1, 2, -1, 2, -1]), "z_r": torch.tensor([1, 0, -1, 1, 0, 0])}
    weights = {"z_d": 50.0, "z_r": 2.0}
    factors = _factors(classifiers, z, targets, weights)
    assert sorted(factors) == ["aux_z_d", "aux_z_r"]
    for site in ("z_d", "z_r"):
        log_q = torch.log_softmax(classifiers.heads[site](z[site]), -1)
        t = targets[site]
        expected = torch.where(t >= 0, -weights[site] * log_q[torch.arange(6), t.clamp(min=0)], torch.zeros(6))
        torch.testing.assert_close(factors[f"aux_{site}"], expected)
        assert (factors[f"aux_{site}"] >= 0).all()  # a cost: -log q >= 0
        assert (factors[f"aux_{site}"][t < 0] == 0).all()


def test_factor_sign_trains_the_classifier_towards_the_label(classifiers):
    """As a guide term, the factor adds +alpha * CE to the loss (-ELBO): a gradient step on the
    loss raises q(L | z) for the labelled spots, and unlabelled spots give no gradient."""
    z = {"z_d": torch.randn(8, 4), "z_r": torch.randn(8, 4)}
    targets = {"z_d": torch.tensor([0, 1, 2, 0, -1, -1, -1, -1]), "z_r": torch.full((8,), -1)}
    weights = {"z_d": 3.0, "z_r": 5.0}

    def model():
        pyro.plate("spots", 8)

    def guide():
        with pyro.plate("spots", 8):
            classifiers.factors(z, targets, weights)

    loss = Trace_ELBO().differentiable_loss(model, guide)
    known = targets["z_d"] >= 0
    ce = F.cross_entropy(classifiers.heads["z_d"](z["z_d"][known]), targets["z_d"][known], reduction="sum")
    torch.testing.assert_close(loss, 3.0 * ce)  # z_r: every label missing, no contribution
    loss.backward()
    head = classifiers.heads["z_d"]
    assert classifiers.heads["z_r"].weight.grad is None or not classifiers.heads["z_r"].weight.grad.any()
    with torch.no_grad():
        before = F.cross_entropy(head(z["z_d"][known]), targets["z_d"][known])
        for p in head.parameters():
            p -= 0.1 * p.grad
        after = F.cross_entropy(head(z["z_d"][known]), targets["z_d"][known])
    assert after < before
    # the unlabelled rows' latents get no gradient either
    zz = z["z_d"].clone().requires_grad_(True)
    with poutine.trace() as tr:
        classifiers.factors({**z, "z_d": zz}, targets, weights)
    tr.trace.nodes["aux_z_d"]["fn"].log_prob(tr.trace.nodes["aux_z_d"]["value"]).sum().backward()
    assert not zz.grad[~known].any() and zz.grad[known].any()


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_expected_log1p_normalised_matches_monte_carlo(zero_inflated):
    """The exact head plus tail quadrature agrees with sampling the (ZI)NB, from sparse genes
    (mu 0.01) to deep ones (mu 5e4, a narrow log-scale peak far from the head) and theta
    0.05-1,000."""
    torch.manual_seed(0)
    mu = torch.tensor([[0.01, 0.3, 2.0, 15.0, 80.0, 600.0, 4000.0, 5e4, 40.0]], dtype=torch.float64)
    theta = torch.tensor([0.2, 1.0, 5.0, 0.5, 30.0, 2.0, 1000.0, 70.0, 0.05], dtype=torch.float64)
    gate = torch.linspace(-2.0, 1.0, 9, dtype=torch.float64)[None] if zero_inflated else None
    exact = expected_log1p_normalised(mu, theta, gate)
    x = count_likelihood(mu, theta, gate).sample((200_000,))
    library = (mu * (1 if gate is None else torch.sigmoid(-gate))).sum(-1, keepdim=True)
    mc = torch.log1p(1e4 * x / library)
    se = mc.std(0) / 200_000**0.5
    assert exact.shape == mu.shape
    assert ((exact - mc.mean(0)).abs() < 5 * se + 1e-3).all()
