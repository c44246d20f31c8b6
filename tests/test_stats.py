"""Statistics for held-out-section designs, on synthetic cases whose answer is known."""
import numpy as np
import pytest
import scipy.sparse as sp

from spartha_pyro import InputError
from spartha_pyro.metrics import (
    block_bootstrap_ci,
    constant_profile_counts,
    energy_distance,
    paired_sign_flip_test,
    pcc_gene,
    qc_fidelity,
)


# ---------------------------------------------------------------------------- sign flip
def test_sign_flip_exact_values():
    # sign patterns of [1, 2, 3]: only all-plus reaches a sum of 6
    assert paired_sign_flip_test([1, 2, 3], "greater").p_value == pytest.approx(1 / 8)
    assert paired_sign_flip_test([1, 2, 3]).p_value == pytest.approx(2 / 8)
    assert paired_sign_flip_test([1, 2, 3], "less").p_value == pytest.approx(1.0)
    r = paired_sign_flip_test([0.5, np.nan, 1.5], "greater")
    assert r.n == 2 and r.exact and r.statistic == pytest.approx(1.0) and r.p_value == pytest.approx(1 / 4)


def test_true_edge_is_significant_identical_is_not():
    edge5 = [0.010, 0.016, 0.004, 0.012, 0.001]  # a method better on each of 5 sections
    one = paired_sign_flip_test(edge5, "greater")
    two = paired_sign_flip_test(edge5)
    assert one.p_value == pytest.approx(1 / 32) and one.p_value < 0.05
    # two-sided with 5 sections cannot go below 2/32 = 0.0625: documented, not a bug
    assert two.p_value == pytest.approx(0.0625) and two.min_p_value == pytest.approx(0.0625)
    rng = np.random.default_rng(0)
    edge10 = 0.01 + 0.004 * rng.standard_normal(10)  # enough sections for a two-sided test
    assert paired_sign_flip_test(edge10).p_value < 0.05
    # identical methods: all differences 0 -> p = 1, whatever the alternative
    for alt in ("two-sided", "greater", "less"):
        assert paired_sign_flip_test(np.zeros(5), alt).p_value == 1.0
    # no true edge: symmetric noise is not significant
    assert paired_sign_flip_test(0.01 * rng.standard_normal(12)).p_value > 0.05


def test_sign_flip_monte_carlo_matches_exact():
    d = np.random.default_rng(1).normal(0.3, 1.0, 12)
    exact = paired_sign_flip_test(d, "greater", n_perm=2**12)
    mc = paired_sign_flip_test(d, "greater", n_perm=4000, seed=3)
    assert exact.exact and not mc.exact
    assert mc.p_value == pytest.approx(exact.p_value, abs=0.006)
    with pytest.raises(InputError, match="alternative"):
        paired_sign_flip_test(d, "bigger")
    with pytest.raises(InputError, match="non-NaN"):
        paired_sign_flip_test([np.nan])


# ---------------------------------------------------------------------------- block bootstrap
def _section(seed=0, side=20, n_genes=40):
    """A side x side grid whose genes follow smooth spatial fields plus spot noise."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(side), np.arange(side))
    coords = np.column_stack([x.ravel(), y.ravel()]).astype(float)
    freq = rng.uniform(0.1, 0.4, (2, n_genes))
    phase = rng.uniform(0, 2 * np.pi, n_genes)
    signal = np.sin(coords[:, :1] * freq[0] + coords[:, 1:] * freq[1] + phase)
    obs = signal + 0.8 * rng.standard_normal(signal.shape)
    return coords, signal, obs, rng


def test_bootstrap_ci_identical_and_better():
    coords, signal, obs, rng = _section()
    good = signal + 0.8 * rng.standard_normal(signal.shape)
    bad = rng.standard_normal(signal.shape)
    same = block_bootstrap_ci(good, good, obs, coords, block_size=4, n_boot=300, seed=0)
    assert same.estimate == 0 and same.ci_low <= 0 <= same.ci_high
    assert same.n_blocks == 25 and same.n_genes == obs.shape[1]
    better = block_bootstrap_ci(good, bad, obs, coords, block_size=4, n_boot=300, seed=0)
    assert better.ci_low > 0 and better.ci_low < better.estimate < better.ci_high
    # the point estimate is the plain difference in mean per-gene PCC
    assert better.estimate == pytest.approx(pcc_gene(good, obs) - pcc_gene(bad, obs), abs=1e-9)
    # two equally good predictions (independent noise): the interval covers 0
    twin = signal + 0.8 * rng.standard_normal(signal.shape)
    tie = block_bootstrap_ci(good, twin, obs, coords, block_size=4, n_boot=300, seed=0)
    assert tie.ci_low < 0 < tie.ci_high
    # seeded, sparse input accepted, wider tiles -> fewer blocks
    again = block_bootstrap_ci(sp.csr_matrix(good), bad, obs, coords, block_size=4, n_boot=300, seed=0)
    assert (again.ci_low, again.ci_high) == pytest.approx((better.ci_low, better.ci_high))
    assert block_bootstrap_ci(good, bad, obs, coords, block_size=10, n_boot=50).n_blocks == 4


def test_bootstrap_constant_genes_and_errors():
    coords, signal, obs, rng = _section(side=10, n_genes=5)
    obs[:, 0] = 1.0  # constant observed gene: left out of both means
    pred = signal.copy()
    pred[:, 1] = 2.0  # constant prediction: PCC 0, as pcc_gene scores it
    r = block_bootstrap_ci(pred, signal, obs, coords, block_size=3, n_boot=50)
    assert r.n_genes == 4
    assert r.estimate == pytest.approx(pcc_gene(pred, obs) - pcc_gene(signal, obs), abs=1e-9)
    with pytest.raises(InputError, match="shape"):
        block_bootstrap_ci(pred[:, :3], signal, obs, coords)
    with pytest.raises(InputError, match="coords"):
        block_bootstrap_ci(pred, signal, obs, coords[:5])


# ---------------------------------------------------------------------------- QC fidelity
def _real_spots(rng, n_spots, profiles, mt):
    """Heterogeneous real spots: per-spot library, cell-type mixture and gamma-Poisson noise."""
    lib = np.exp(rng.normal(np.log(3000), 0.6, n_spots))
    mix = rng.dirichlet(np.full(len(profiles), 0.5), n_spots) @ profiles
    mix[:, mt] *= np.exp(rng.normal(0, 0.7, (n_spots, 1)))  # varying mitochondrial share
    mix /= mix.sum(1, keepdims=True)
    return rng.poisson(lib[:, None] * mix * rng.gamma(2.0, 0.5, mix.shape)).astype(np.float32)


def test_constant_generator_loses_fidelity():
    rng = np.random.default_rng(0)
    n_genes = 300
    genes = [f"mt-Gene{i}" for i in range(5)] + [f"Gene{i}" for i in range(5, n_genes)]
    mt = np.arange(5)
    profiles = rng.gamma(0.3, 1.0, (3, n_genes))
    profiles[:, mt] += 2.0
    train = _real_spots(rng, 400, profiles, mt)
    real = _real_spots(rng, 200, profiles, mt)  # the held-out section
    other_real = _real_spots(rng, 200, profiles, mt)  # real spots of the same distribution
    constant = constant_profile_counts(train, real.sum(1), n_samples=5, seed=1)
    assert constant.shape == (5, 200, n_genes)
    real_score = qc_fidelity(other_real, real, genes)
    constant_score = qc_fidelity(constant, real, genes)
    assert 0 <= real_score < constant_score / 3
    # the mitochondrial share takes part: without it the distance changes
    no_mt = [g.replace("mt-", "x") for g in genes]
    assert qc_fidelity(constant, real, no_mt) != pytest.approx(constant_score)


def test_energy_distance_basics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    near = energy_distance(x, rng.standard_normal((300, 2)))
    far = energy_distance(x, rng.standard_normal((300, 2)) + 1.0)
    assert 0 <= near < far
    assert energy_distance(np.zeros(3), np.ones(4)) == pytest.approx(2.0)
    with pytest.raises(InputError, match="same d"):
        energy_distance(x, x[:, :1])
