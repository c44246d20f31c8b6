"""SPARTHA end to end on simulated data: training, latents, prediction, save/load."""
import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

import spartha_pyro as sp
from conftest import SMALL


def probe(z, y, seed=0):
    """Held-out balanced accuracy of a logistic probe (half the spots to fit, half to score)."""
    y = np.asarray(y).astype(str)
    idx = np.random.default_rng(seed).permutation(len(y))
    tr, te = idx[: len(y) // 2], idx[len(y) // 2 :]
    clf = LogisticRegression(max_iter=2000).fit(z[tr], y[tr])
    return balanced_accuracy_score(y[te], clf.predict(z[te]))


def histology_only(adata, n=None):
    """Spots stripped to histology, keeping ``obs["slide"]``: histology is standardised per
    section, so whole sections are predicted with their section column."""
    sub = adata[:n] if n else adata
    return ad.AnnData(obs=sub.obs[["slide"]].copy(), obsm={"histology": np.asarray(sub.obsm["histology"])})


def test_elbo_decreases(trained):
    losses = [r["loss"] for r in trained.history]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:2])


@pytest.mark.parametrize(
    "latent, factor, threshold",
    [("y", "cell_type", 0.8), ("d", "slide", 0.8), ("r", "qc_pass", 0.8)],
)
@pytest.mark.parametrize("encoder", ["full", "histology"])
def test_latents_recover_their_factor(trained, sim, latent, factor, threshold, encoder):
    z = trained.get_latent(latent=latent, encoder=encoder)
    assert z.shape == (sim.n_obs, trained.module.model.dims[{"y": "z_y0"}.get(latent, f"z_{latent}")])
    assert probe(z, sim.obs[factor]) > threshold
    assert f"X_spartha_{latent}" in sim.obsm


def test_random_latent_fails_the_probe(sim):
    # the probe threshold is meaningful: noise of the same width stays near chance
    z = np.random.default_rng(0).normal(size=(sim.n_obs, 8))
    assert probe(z, sim.obs["cell_type"]) < 0.45


def test_classifier_accuracies_logged(trained):
    last = trained.history[-1]
    assert last["acc_z_y0"] > 0.8 and last["acc_z_d"] > 0.8 and last["acc_z_r"] > 0.8


def test_predict_from_histology_only(trained, sim):
    new = histology_only(sim, 40)
    assert new.n_vars == 0
    pred = trained.predict_expression(new, num_samples=3, seed=1)
    assert pred.dims == ("sample", "spot", "gene")
    assert pred.shape == (3, 40, sim.n_vars)
    assert list(pred.coords["gene"].values) == list(sim.var_names)
    assert list(pred.coords["spot"].values) == list(new.obs_names)
    assert pred.dtype == np.int32 and (pred.values >= 0).all()
    mean = trained.predict_expression(new, num_samples=2, value="mean")
    assert mean.dtype == np.float32 and np.isfinite(mean.values).all()


def test_predictions_follow_histology(trained, sim):
    """Predicted expression from histology alone tracks the observed cell-type profiles."""
    pred = trained.predict_expression(histology_only(sim), num_samples=4, value="mean").mean("sample").values
    norm = lambda x: np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1))
    obs = norm(sim.X.toarray())
    p = norm(pred)
    pcc = [np.corrcoef(p[:, g], obs[:, g])[0, 1] for g in range(sim.n_vars) if obs[:, g].std() > 0]
    assert np.nanmean(pcc) > 0.3


def test_artifact_free_generation_restores_depth(trained, sim):
    """For artifact spots, drawing Z_r from p(Z_r | pass) gives more counts than its posterior."""
    art = sim.obs["true_artifact"].to_numpy()  # predicted within their whole sections (per-section scaling)
    new = histology_only(sim)
    depth = lambda a: float(trained.predict_expression(new, num_samples=3, artifact=a).sum("gene")[:, art].mean())
    assert depth("pass") > 2.0 * depth("posterior")


def test_seeded_prediction_is_reproducible(trained, sim):
    new = histology_only(sim, 20)
    a = trained.predict_expression(new, num_samples=2, seed=3)
    b = trained.predict_expression(new, num_samples=2, seed=3)
    np.testing.assert_array_equal(a.values, b.values)


def test_save_load_round_trip(trained, sim, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        trained.save(tmp_path / "m")
    loaded = sp.SPARTHA.load(tmp_path / "m", sim[:, ::-1].copy())  # gene order may differ
    new = histology_only(sim, 25)
    a = trained.predict_expression(new, num_samples=2, seed=7)
    b = loaded.predict_expression(new, num_samples=2, seed=7)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_allclose(trained.get_latent(latent="d"), loaded.get_latent(latent="d"), rtol=1e-5, atol=1e-6)


def test_load_rejects_corrupt_files(trained, sim, tmp_path):
    trained.save(tmp_path / "m")
    data = (tmp_path / "m" / "model.pt").read_bytes()
    (tmp_path / "m" / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(sp.InputError, match="model.pt"):
        sp.SPARTHA.load(tmp_path / "m", sim)
    (tmp_path / "m" / "settings.json").write_text("{not json")
    with pytest.raises(sp.InputError, match="settings.json"):
        sp.SPARTHA.load(tmp_path / "m", sim)


def test_spatialdiva_ablation(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", artifact_latent=False, **SMALL)
    assert "z_r" not in model.module.model.dims
    assert "z_r" not in model.module.classifiers.heads
    model.train(max_epochs=2, batch_size=200, progress=False, validation=None)
    with pytest.raises(sp.InputError, match="z_r"):
        model.get_latent(latent="r")
    pred = model.predict_expression(histology_only(sim, 10), num_samples=2)
    assert pred.shape == (2, 10, sim.n_vars)


def test_unseen_batch_and_zero_count_spots(sim):
    adata = sim.copy()
    X = adata.X.tolil()
    X[:5] = 0  # empty spots are kept and modelled
    adata.X = X.tocsr()
    model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", likelihood="zinb", **SMALL)
    hist = model.train(max_epochs=2, batch_size=200, progress=False, validation=None)
    assert np.isfinite([r["loss"] for r in hist]).all()
    new = adata[:10].copy()
    new.obs["slide"] = "a_new_slide"
    z = model.get_latent(new, latent="d")
    assert np.isfinite(z).all()
    assert model.predict_expression(new, num_samples=1).shape == (1, 10, adata.n_vars)


def test_validation_and_early_stopping(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    hist = model.train(max_epochs=30, batch_size=200, validation=["slide2"], patience=2, lr=3e-2, progress=False)
    assert "val_loss_histology" in hist[-1]
    assert model.module.model.n_spots == int((sim.obs["slide"] != "slide2").sum())
    with pytest.raises(sp.InputError, match="nope"):
        model.train(max_epochs=1, validation=["nope"], progress=False)


def test_unlabelled_spots_and_no_labels(sim):
    adata = sim.copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.loc[adata.obs_names[::2], "cell_type"] = np.nan
    model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", **SMALL)
    assert np.isfinite(model.train(max_epochs=1, batch_size=200, progress=False, validation=None)[-1]["loss"])
    no_labels = sp.SPARTHA(sim, label_keys=[], batch_key="slide", **SMALL)
    no_labels.train(max_epochs=1, batch_size=300, progress=False, validation=None)
    assert no_labels.get_latent(latent="x").shape == (sim.n_obs, SMALL["x_dim"])


def test_jit_matches_trace_elbo(sim):
    """JitTrace_ELBO computes the same loss and trains."""
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    a = [r["loss"] for r in model.train(max_epochs=2, batch_size=100, progress=False, seed=0, validation=None)]
    model.module.load_state_dict(state)
    b = [r["loss"] for r in model.train(max_epochs=2, batch_size=100, progress=False, seed=0, jit=True, validation=None)[2:]]
    # same data order and seed; the Monte Carlo draws differ, so agreement is to ~1%
    np.testing.assert_allclose(a, b, rtol=1e-2)
    assert b[1] < b[0]


def test_nan_during_training_names_the_term(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    with torch.no_grad():
        model.module.model.log_theta.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="x_t"):
        model.train(max_epochs=1, progress=False, validation=None)


def test_seed_fixes_initial_weights(sim):
    a = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=1, **SMALL)
    b = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=1, **SMALL)
    c = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=2, **SMALL)
    wa, wb, wc = (m.module.model.gene_logits.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bf16_autocast_trains_like_float32(sim):
    """precision="bf16" (CPU autocast here): same losses to within bfloat16 rounding, still learning."""
    losses = {}
    for precision in ("32", "bf16"):
        model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
        losses[precision] = [r["loss"] for r in model.train(max_epochs=3, batch_size=200, progress=False, seed=0, precision=precision, validation=None)]
    assert np.isfinite(losses["bf16"]).all() and losses["bf16"][-1] < losses["bf16"][0]
    np.testing.assert_allclose(losses["bf16"], losses["32"], rtol=1e-3)  # measured: 2e-5
    with pytest.raises(sp.InputError, match="precision"):
        model.train(max_epochs=1, progress=False, precision="fp8", validation=None)


def test_refit_after_early_stopping_uses_every_spot(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
    hist = model.train(max_epochs=6, batch_size=200, validation=["slide2"], patience=2, progress=False, refit=True)
    stages = [h["stage"] for h in hist]
    scores = [h["val_pcc_gene"] for h in hist if h["stage"] == "validation"]
    first = 6 // 2 - 1  # no epoch before min_epochs (default: half of max_epochs) is chosen
    best = first + int(np.argmax(scores[first:])) + 1
    assert stages.count("refit") == best == model.selection["epochs"] and stages[-1] == "refit"
    assert model.module.model.n_spots == sim.n_obs  # the validation slide is trained on
    with pytest.raises(sp.InputError, match="refit=True needs validation"):
        model.train(max_epochs=1, progress=False, refit=True, validation=None)


def test_gene_negative_binomial_is_the_nb_density_and_survives_plates(trained, sim):
    """The cheaper NB log-density equals torch's, and the model's x_t site keeps it through the
    plate's ``expand`` (it silently fell back to the generic density before)."""
    from pyro import poutine

    from spartha_pyro.models.likelihoods import GeneNegativeBinomial
    from spartha_pyro.loaders import minibatch

    g = torch.Generator().manual_seed(0)
    theta, logits = torch.rand(7, generator=g) * 5 + 0.1, torch.randn(4, 7, generator=g)
    x = torch.poisson(torch.rand(4, 7, generator=g) * 30)
    nb = GeneNegativeBinomial(theta, logits)
    reference = torch.distributions.NegativeBinomial(theta, logits=logits)
    torch.testing.assert_close(nb.log_prob(x), reference.log_prob(x))
    wide = nb.expand((3, 4, 7))
    assert isinstance(wide, GeneNegativeBinomial) and nb.expand((4, 7)) is nb
    torch.testing.assert_close(wide.log_prob(x), reference.expand((3, 4, 7)).log_prob(x))
    with pytest.raises(ValueError, match="over genes"):
        nb.expand((4, 8))

    batch = minibatch(trained._data, np.arange(32), torch.device("cpu"), sim.n_vars)
    fn = poutine.trace(trained.module.model).get_trace(*batch).nodes["x_t"]["fn"]
    while not isinstance(fn, GeneNegativeBinomial):
        assert hasattr(fn, "base_dist"), f"x_t site lost GeneNegativeBinomial: {type(fn).__name__}"
        fn = fn.base_dist


def test_early_stopping_and_refit_are_announced(sim, capsys):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
    # lr=0: the validation loss cannot improve beyond Monte Carlo noise, so patience 1 stops early
    hist = model.train(max_epochs=30, batch_size=200, validation=["slide2"], patience=1, lr=0.0, refit=True)
    out = capsys.readouterr().out
    ran = sum(h["stage"] == "validation" for h in hist)
    refit = sum(h["stage"] == "refit" for h in hist)
    assert ran < 30
    assert f"early stopping after epoch {ran} (no validation improvement for 1)" in out
    assert f"refit on every spot for {refit} epochs" in out
    model.train(max_epochs=2, batch_size=200, progress=False, validation=["slide2"], patience=1, lr=0.0)
    assert capsys.readouterr().out == ""  # quiet when progress=False
