"""Calibration metrics against known truth, NB-wrapped baselines, and SPARTHA's own coverage."""
import anndata as ad
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from scipy import stats

import spartha_pyro as sp
from conftest import SMALL
from spartha_pyro.baselines import MeanPredictor, NBWrapper, RidgePredictor
from spartha_pyro.baselines.nb import fit_nb_theta
from spartha_pyro.metrics import (
    calibration_records,
    crps,
    interval_coverage,
    nb_log_prob,
    nll,
    pit_histogram,
    reliability,
)

LEVELS = (0.5, 0.8, 0.9, 0.95)


def nb_draws(rng, mu, theta, size=None):
    return rng.negative_binomial(theta, theta / (theta + mu), size=size)


@pytest.fixture(scope="module")
def nb_truth():
    """Means, inverse dispersions, one observation and 40 draws per entry from the same NB."""
    rng = np.random.default_rng(0)
    mu = rng.lognormal(0.0, 1.5, (500, 40))  # many low counts: plenty of ties
    theta = rng.uniform(0.5, 10.0, 40)
    return mu, theta, nb_draws(rng, mu, theta), nb_draws(rng, mu, theta, size=(40, 500, 40))


def test_true_predictive_covers_nominally(nb_truth):
    _, _, obs, draws = nb_truth
    cov = interval_coverage(draws, obs, LEVELS)
    np.testing.assert_allclose(cov["coverage"].values, LEVELS, atol=0.03)
    assert cov["coverage_gene"].shape == (4, 40)
    np.testing.assert_allclose(cov["coverage_gene"].mean("gene").values, cov["coverage"].values)
    hist = pit_histogram(draws, obs, bins=10)
    np.testing.assert_allclose(hist["density"], 1.0, atol=0.1)
    curve = reliability(draws, obs)
    np.testing.assert_allclose(curve["empirical"], curve["nominal"], atol=0.03)


def test_midpoint_pit_overcovers_with_ties(nb_truth):
    _, _, obs, draws = nb_truth
    cov = interval_coverage(draws, obs, LEVELS, ties="midpoint")["coverage"].values
    assert (cov > np.asarray(LEVELS)).all()


def test_too_narrow_predictive_undercovers(nb_truth):
    mu, _, obs, _ = nb_truth
    poisson = np.random.default_rng(1).poisson(mu, size=(40, *mu.shape))
    cov = interval_coverage(poisson, obs, LEVELS)["coverage"].values
    assert (cov < np.asarray(LEVELS) - 0.04).all()


def test_crps_hand_example_and_point_mass():
    # draws {0, 1, 3}, y = 2: integral of (F(x) - 1[x >= 2])^2 = (1/3)^2 + (2/3)^2 + (1/3)^2 = 2/3
    assert crps(np.array([3.0, 0.0, 1.0]).reshape(3, 1, 1), np.array([[2.0]])) == pytest.approx(2 / 3)
    point = np.full((7, 2, 3), 1.5)
    obs = np.array([[0.0, 1.5, 4.0], [2.0, -1.0, 1.0]])
    np.testing.assert_allclose(crps(point, obs, reduce=None), np.abs(1.5 - obs), atol=1e-12)


def test_crps_matches_pairwise_energy_form():
    rng = np.random.default_rng(0)
    draws, obs = rng.normal(size=(9, 4, 5)), rng.normal(size=(4, 5))
    pairwise = np.abs(draws[:, None] - draws[None]).mean((0, 1))
    expected = np.abs(draws - obs).mean(0) - 0.5 * pairwise
    np.testing.assert_allclose(crps(draws, obs, reduce=None), expected)
    np.testing.assert_allclose(crps(draws, obs, reduce="gene"), expected.mean(0))


def test_nll_single_draw_is_scipy_nb_and_mixes_draws():
    rng = np.random.default_rng(0)
    mu, theta = rng.lognormal(0.0, 1.0, (1, 6, 3)), np.array([0.7, 2.0, 15.0])
    obs = nb_draws(rng, mu[0], theta)
    scipy_lp = stats.nbinom.logpmf(obs, theta, theta / (theta + mu[0]))
    np.testing.assert_allclose(nll(mu, theta, obs, reduce=None), -scipy_lp, rtol=1e-10)
    np.testing.assert_allclose(nb_log_prob(obs, mu[0], theta), scipy_lp, rtol=1e-10)
    mix = np.concatenate([mu, 3 * mu])
    pmf = stats.nbinom.pmf(obs, theta, theta / (theta + mix))
    assert nll(mix, theta, obs) == pytest.approx(-np.log(pmf.mean(0)).mean())


def test_bad_inputs_raise():
    with pytest.raises(sp.InputError, match="do not match"):
        interval_coverage(np.zeros((3, 4, 5)), np.zeros((4, 6)))
    with pytest.raises(sp.InputError, match="theta"):
        nll(np.ones((2, 4, 5)), np.ones(4), np.zeros((4, 5)))
    with pytest.raises(sp.InputError, match="ties"):
        interval_coverage(np.zeros((3, 4, 5)), np.zeros((4, 5)), ties="up")


def test_calibration_records_per_panel(nb_truth):
    mu, theta, obs, draws = nb_truth
    names = [f"g{i}" for i in range(40)]
    records = calibration_records(draws, mu[None], theta, obs, panels={"all": None, "few": names[:5]}, var_names=names)
    metrics = ["coverage50", "coverage80", "coverage90", "coverage95", "nll", "crps"]
    assert [r["metric"] for r in records] == metrics * 2
    assert [r["panel"] for r in records] == ["all"] * 6 + ["few"] * 6
    values = {r["metric"]: r["value"] for r in records if r["panel"] == "all"}
    assert values["coverage90"] == pytest.approx(0.9, abs=0.03)
    assert values["nll"] == pytest.approx(nll(mu[None], theta, obs))
    assert {r["metric"] for r in calibration_records(draws, None, None, obs)} == set(metrics) - {"nll"}
    # without an "all" panel only the panels' columns are scored, with the same values
    panels = {"few": names[:5], "odd": names[1::7]}
    subset = calibration_records(draws, mu[None], theta, obs, panels=panels, var_names=names)
    full = calibration_records(draws, mu[None], theta, obs, panels={"all": None, **panels}, var_names=names)
    np.testing.assert_allclose([r["value"] for r in subset], [r["value"] for r in full[6:]], rtol=1e-12)


def test_fit_nb_theta_recovers_dispersion():
    rng = np.random.default_rng(0)
    mu = rng.lognormal(1.0, 1.0, (3000, 3))
    theta = np.array([0.5, 5.0, 1e5])
    fitted = fit_nb_theta(nb_draws(rng, mu, theta).astype(float), mu)
    np.testing.assert_allclose(fitted[:2], theta[:2], rtol=0.15)
    assert fitted[2] > 50  # Poisson data: no overdispersion detected


@pytest.fixture(scope="module")
def split(sim):
    held = sim.obs["slide"].cat.categories[-1]
    return sim[sim.obs["slide"] != held].copy(), sim[sim.obs["slide"] == held].copy()


@pytest.mark.parametrize("library", ["train_median", "histology", "auto", "observed"])
def test_nb_wrapped_ridge_gives_finite_nll(split, library):
    train, test = split
    wrapper = NBWrapper(RidgePredictor(), library=library).fit(train)
    assert wrapper.theta_.shape == wrapper.scale_.shape == (train.n_vars,) and (wrapper.theta_ > 0).all()
    mean = wrapper.mean(test)
    log_p = wrapper.log_prob(test)
    assert np.isfinite(log_p).all()
    obs = test.X.toarray()
    assert -log_p.mean() == pytest.approx(nll(mean[None], wrapper.theta_, obs))
    draws = wrapper.sample(test, num_samples=5)
    assert draws.dims == ("sample", "spot", "gene") and draws.shape == (5, *obs.shape)
    records = calibration_records(draws, mean[None], wrapper.theta_, obs)
    assert all(np.isfinite(r["value"]) for r in records)


def test_nb_wrapper_library_rules(split):
    train, test = split
    median = NBWrapper(MeanPredictor(), cross_fit=None).fit(train)
    assert np.allclose(median.mean(test).sum(1), median.mean(test).sum(1)[0])  # same for every spot
    observed = NBWrapper(MeanPredictor(), library="observed", cross_fit=None).fit(train)
    lib = np.asarray(test.X.sum(1)).ravel()
    np.testing.assert_allclose(observed.mean(test), observed.mean(test, library=lib))
    with pytest.raises(sp.InputError, match="no counts"):
        observed.mean(test[:, []])
    with pytest.raises(sp.InputError, match="library"):
        NBWrapper(MeanPredictor(), library="test_median")


def test_histology_library_follows_the_image_and_lowers_the_nll():
    """When the library depends on the histology, the ``"histology"`` rule recovers it from the
    features alone and scores a better held-out NLL than one median library for every spot."""
    rng = np.random.default_rng(0)
    n, genes = 600, 40
    x = rng.normal(size=(n, 6)).astype(np.float32)
    library = np.exp(7.0 + 0.8 * x[:, 0])
    profile = rng.dirichlet(np.ones(genes))
    adata = ad.AnnData(rng.poisson(library[:, None] * profile).astype(np.float32), obsm={"histology": x})
    train, test = adata[:400].copy(), adata[400:].copy()
    by_rule = {rule: NBWrapper(MeanPredictor(), library=rule).fit(train) for rule in ("train_median", "histology")}
    predicted = by_rule["histology"].library_model_.predict_library(test)
    assert np.corrcoef(np.log(predicted), np.log(library[400:]))[0, 1] > 0.9
    nlls = {rule: -w.log_prob(test).mean() for rule, w in by_rule.items()}
    assert nlls["histology"] < nlls["train_median"] - 0.1, nlls
    auto = NBWrapper(MeanPredictor(), library="auto").fit(train)  # chooses on the training counts
    assert auto.library_rule_ == "histology" and set(auto.training_nll_) == {"train_median", "histology"}
    np.testing.assert_allclose(auto.mean(test), by_rule["histology"].mean(test))


def test_plot_calibration(nb_truth):
    mu, _, obs, draws = nb_truth
    axes = sp.pl.calibration({"NB": draws, "Poisson": np.random.default_rng(0).poisson(mu, (10, *mu.shape))}, obs)
    assert len(axes) == 2 and len(axes[1].lines) == 3
    matplotlib.pyplot.close("all")


def test_spartha_coverage_on_simulated_training_spots(trained, sim):
    """90% intervals of SPARTHA's histology-only predictive on its training spots.

    Measured (40 epochs, 100 draws, all 600 spots): coverage 0.63/0.91/0.96/0.985 at 50/80/90/95% — too
    wide, not within ±0.03. The library model is the main cause: its scale ``s`` stays near
    its initial value (~0.7) while the histology-predicted library is off by only ~0.32 (the
    simulator's own noise is 0.3); ``theta`` (~3.6) also lags the truth (5). With each spot's
    observed library put in, coverage is near nominal; that, and a sane band for the full
    predictive, is what is asserted.
    """
    spots = sim[::2]  # every other spot, all slides: 300 spots × 150 genes
    obs = spots.X.toarray()
    draws = trained.predict_expression(spots, num_samples=20, artifact="posterior", batch_size=300, seed=0)
    cov90 = float(interval_coverage(draws, obs, (0.9,))["coverage"][0])
    assert 0.85 <= cov90 <= 0.99

    mean = trained.predict_expression(spots, num_samples=20, artifact="posterior", value="mean", batch_size=300, seed=1).values
    theta = trained.dispersion
    assert theta.shape == (sim.n_vars,) and np.isfinite(nll(mean, theta, obs))
    at_observed_library = mean / mean.sum(2, keepdims=True) * obs.sum(1)[None, :, None]
    counts = np.random.default_rng(0).negative_binomial(theta, theta / (theta + at_observed_library))
    assert float(interval_coverage(counts, obs, (0.9,))["coverage"][0]) == pytest.approx(0.9, abs=0.05)


def test_export_posterior_layers(trained, sim):
    adata = sim[:40, ::-1].copy()  # genes in another order
    trained.export_posterior(adata, num_samples=10, quantiles=(0.05, 0.95))
    names = ["mean", "sd", "counts_mean", "q05", "q95", "cv"]
    assert all(adata.layers[f"spartha_{n}"].shape == adata.shape for n in names)
    lo, mid, hi = (adata.layers[f"spartha_{n}"] for n in ("q05", "mean", "q95"))
    assert (lo <= hi).all() and np.isfinite(mid).all()
    ref = trained.predict_expression(adata, num_samples=10, seed=0)
    np.testing.assert_allclose(adata.layers["spartha_counts_mean"][:, 0], ref.values.mean(0)[:, -1], rtol=1e-5)
    with pytest.raises(sp.InputError, match="none of the model's genes"):
        trained.export_posterior(sim[:5, []].copy())


def test_predict_summary_streams_the_draws_of_predict_expression(trained, sim, tmp_path):
    """Summaries made minibatch by minibatch equal those of all draws at once (same seed and
    batch size), the NetCDF holds those very draws, and X is predict_mean."""
    adata = sim[:40].copy()
    kw = dict(num_samples=5, batch_size=7, seed=3)
    got = trained.predict_summary(adata, quantiles=(0.5,), out=tmp_path / "d.nc", **kw)
    draws = trained.predict_expression(adata, **kw)
    ref = sp.predictions.summarize_samples(draws, quantiles=(0.5,))
    np.testing.assert_array_equal(sp.predictions.read_samples(tmp_path / "d.nc").values, draws.values)
    for name in ("sd", "q50", "counts_mean"):
        np.testing.assert_allclose(got.layers[name], ref.layers[name], rtol=1e-6)
    np.testing.assert_allclose(got.layers["draws_mean"], ref.X, rtol=1e-6)
    np.testing.assert_allclose(got.X, trained.predict_mean(adata, artifact="pass", **kw).values, rtol=1e-6)
    assert got.uns["prediction"]["seed"] == 3 and got.obs_names.equals(adata.obs_names)


def test_spartha_calibrated_on_held_out_spots(sim):
    """Coverage of SPARTHA's histology-only predictive on held-out spots is nominal ±0.03.

    The truth is known here (NB counts, theta = 5). Trained to convergence (120 epochs of
    batch 50 on 458 spots, ~1,100 steps), measured on the 142 held-out spots: 0.507 / 0.803 /
    0.903 / 0.951 at 50/80/90/95% (theta median 4.86). After 40 epochs of batch 100 it is too
    wide (0.63/0.90/0.96/0.985): theta (3.8) and the library scale (0.70 vs ~0.3) are still
    moving — under-training, not a wrong model, so the test trains longer rather than
    loosening the band.
    """
    held = np.random.default_rng(1).random(sim.n_obs) < 0.25
    model = sp.SPARTHA(sim[~held].copy(), label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
    model.train(max_epochs=120, batch_size=50, lr=3e-3, progress=False, seed=0, validation=None)
    test = sim[held]
    histology = ad.AnnData(obs=test.obs[[]].copy(), obsm={"histology": np.asarray(test.obsm["histology"])})
    draws = model.predict_expression(histology, num_samples=200, artifact="posterior", seed=0)
    coverage = interval_coverage(draws, test.X, LEVELS)["coverage"].values
    np.testing.assert_allclose(coverage, LEVELS, atol=0.03)
