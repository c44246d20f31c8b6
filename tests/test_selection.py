"""Defaults chosen on training data only: per-section histology scaling, epochs by an inner
held-out training section, automatic biology labels, and the point prediction."""
import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sparse
from sklearn.metrics import adjusted_rand_score

import spartha_pyro as sp
from conftest import SMALL
from spartha_pyro.data import MIN_SECTION_SPOTS, standardize_histology
from spartha_pyro.demo import holdout_split

FAST = dict(max_epochs=4, batch_size=100, lr=3e-3, progress=False, seed=0)


def test_section_scaling_removes_a_slide_shift(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    one = sim[sim.obs["slide"] == "slide2"]
    shifted = ad.AnnData(obs=one.obs[[]].copy(), obsm={"histology": one.obsm["histology"] * 1.7 + 3.0})
    plain = ad.AnnData(obs=one.obs[[]].copy(), obsm={"histology": np.asarray(one.obsm["histology"])})
    a = sp.data.encode_adata(shifted, model.registry).x_h
    b = sp.data.encode_adata(plain, model.registry).x_h
    np.testing.assert_allclose(a, b, atol=1e-4)
    # each training section is centred on its own mean
    x = model._data.x_h
    for s in sim.obs["slide"].cat.categories:
        assert np.abs(x[(sim.obs["slide"] == s).to_numpy()].mean(0)).max() < 1e-4
    glob = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", histology_scaling="global", **SMALL)
    assert not np.allclose(sp.data.encode_adata(shifted, glob.registry).x_h, sp.data.encode_adata(plain, glob.registry).x_h)


def test_small_sections_fall_back_to_training_statistics():
    rng = np.random.default_rng(0)
    H = rng.normal(size=(MIN_SECTION_SPOTS + 3, 4)).astype(np.float32)
    sections = np.array(["big"] * MIN_SECTION_SPOTS + ["tiny"] * 3)
    mean, std = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    with pytest.warns(UserWarning, match="tiny"):
        x = standardize_histology(H, np.ones(len(H), bool), sections, mean, std)
    np.testing.assert_allclose(x[-3:], (H[-3:] - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(x[:MIN_SECTION_SPOTS].mean(0), 0.0, atol=1e-5)


def test_ridge_sees_the_same_per_section_features(sim):
    train = sim[sim.obs["slide"] != "slide2"].copy()
    test = sim[sim.obs["slide"] == "slide2"].copy()
    shifted = test.copy()
    shifted.obsm["histology"] = test.obsm["histology"] + 5.0
    ridge = sp.baselines.RidgePredictor(section_key="slide").fit(train)
    np.testing.assert_allclose(ridge.predict(test), ridge.predict(shifted), atol=1e-4)


def test_auto_validation_holds_out_a_training_section_and_refits(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    history = model.train(**FAST)
    sel = model.selection
    assert sel["held_out"] == "batches ['slide2']" and sel["refit"] and sel["monitor"] == "pcc"
    assert 1 <= sel["epochs"] <= 4 and np.isfinite(sel["val_pcc_gene"])
    assert [h["stage"] for h in history].count("refit") == sel["epochs"]
    assert "val_pcc_gene" in history[0]


def test_auto_validation_on_one_section_is_a_spatial_block(sim):
    one = sim[sim.obs["slide"] == "slide0"].copy()
    model = sp.SPARTHA(one, label_keys=["cell_type"], batch_key="slide", **SMALL)
    train_idx, val_idx = model._split("auto", 0)
    x = one.obsm["spatial"][:, 0]
    assert len(val_idx) == round(0.2 * one.n_obs)
    assert x[val_idx].min() >= x[train_idx].max()  # one block at the largest x, not scattered spots


def test_explicit_settings_are_kept(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    history = model.train(validation=None, **FAST)
    assert len(history) == 4 and model.selection is None
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=["slide1"], refit=False, monitor="elbo", **FAST)
    assert model.selection["held_out"] == "batches ['slide1']" and not model.selection["refit"]
    assert model.selection["val_pcc_gene"] is None


def test_held_out_section_never_influences_a_choice(sim):
    """Scramble the held-out section's counts: labels, epochs and scores chosen stay identical."""
    chosen = []
    for seed in (1, 2):
        adata = sim.copy()
        test = (adata.obs["slide"] == "slide2").to_numpy()
        counts = adata.X.toarray()
        counts[test] = np.random.default_rng(seed).permutation(counts[test].ravel()).reshape(counts[test].shape)
        adata.X = sparse.csr_matrix(counts)
        train, _, _ = holdout_split(adata, test="slide2")
        model = sp.SPARTHA(train, batch_key="slide", **SMALL)  # default: automatic labels
        model.train(**FAST)
        chosen.append((model.selection, model.auto_labels, train.obs["spartha_cluster"].tolist()))
    assert chosen[0] == chosen[1]


def test_expression_clusters_recover_cell_types(sim):
    adata = sim.copy()
    info = sp.pp.expression_clusters(adata, batch_key="slide")
    labels = adata.obs["spartha_cluster"]
    assert labels.dtype == "category" and info["n_clusters"] == len(labels.cat.categories)
    clean = ~adata.obs["true_artifact"].to_numpy()
    assert adjusted_rand_score(adata.obs["cell_type"][clean], labels[clean]) > 0.7


def test_automatic_labels_are_saved_and_need_no_labels_to_predict(sim, tmp_path):
    adata = sim.copy()
    model = sp.SPARTHA(adata, batch_key="slide", **SMALL)
    assert model.registry.label_keys == ["spartha_cluster"] and "z_y0" in model.module.model.dims
    model.train(validation=None, **FAST)
    model.save(tmp_path / "m")
    loaded = sp.SPARTHA.load(tmp_path / "m")
    assert loaded.auto_labels == {**model.auto_labels, "scores": {str(k): v for k, v in model.auto_labels["scores"].items()}}
    new = ad.AnnData(obs=adata.obs[[]].iloc[:50].copy(), obsm={"histology": adata.obsm["histology"][:50]})
    assert loaded.predict_mean(new, num_samples=2).shape == (50, adata.n_vars)
    assert sp.SPARTHA(adata, label_keys=[], batch_key="slide", **SMALL).registry.label_keys == []


def test_sampled_predict_mean_is_the_mean_of_normalised_draws(trained, sim):
    new = ad.AnnData(obs=sim.obs[[]].iloc[:60].copy(), obsm={"histology": sim.obsm["histology"][:60]})
    draws = trained.predict_expression(new, num_samples=6, artifact="posterior", seed=3).values
    mean = trained.predict_mean(new, num_samples=6, artifact="posterior", counts="sampled", seed=3, chunk=6)
    np.testing.assert_allclose(mean.values, sp.metrics.normalize_log1p(draws).mean(0), rtol=1e-5, atol=1e-5)
    assert mean.dims == ("spot", "gene")
    # chunks change the random stream, not the estimate: two 60-draw means agree closely
    whole = trained.predict_mean(new, num_samples=60, artifact="posterior", counts="sampled", seed=3, chunk=60)
    chunked = trained.predict_mean(new, num_samples=60, artifact="posterior", counts="sampled", seed=3, chunk=7)
    assert np.corrcoef(chunked.values.ravel(), whole.values.ravel())[0, 1] > 0.98


def test_expected_predict_mean_is_the_many_draw_limit_of_the_sampled_one(trained, sim):
    """Integrating the count noise out estimates the same mean as sampling counts, with less
    noise: 10 expected draws sit closer to a 400-draw sampled mean than 10 sampled draws do."""
    new = ad.AnnData(obs=sim.obs[[]].iloc[:60].copy(), obsm={"histology": sim.obsm["histology"][:60]})
    reference = trained.predict_mean(new, num_samples=400, counts="sampled", seed=1, chunk=100).values
    expected = trained.predict_mean(new, num_samples=10, seed=2).values
    sampled = trained.predict_mean(new, num_samples=10, counts="sampled", seed=2).values
    assert expected.dtype == np.float32 and np.isfinite(expected).all()
    assert np.abs(expected - reference).mean() < 0.5 * np.abs(sampled - reference).mean()
    with pytest.raises(sp.InputError, match="counts"):
        trained.predict_mean(new, counts="mode")


def test_early_stopping_waits_for_min_epochs(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    history = model.train(validation=["slide2"], refit=False, patience=1, min_epochs=6, **{**FAST, "max_epochs": 8})
    assert len(history) >= 6  # patience 1 alone would stop within the first few noisy epochs


def test_no_epoch_before_min_epochs_is_chosen(sim, monkeypatch):
    """A barely trained model can score a spurious validation PCC in the first epochs; that
    epoch must not be chosen (its refit would train for it and predict nothing). Before the
    fix, epoch 1 (PCC 0.5) won here."""
    scores = iter([0.5, 0.1, 0.1, 0.2, 0.3, 0.25, 0.2, 0.1])
    monkeypatch.setattr(sp.train, "evaluate_pcc", lambda *a, **k: next(scores))
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=["slide2"], refit=False, patience=2, min_epochs=4, **{**FAST, "max_epochs": 8})
    assert model.selection["epochs"] == 5 and model.selection["val_pcc_gene"] == pytest.approx(0.3)


def test_label_sets_are_kept_only_when_they_help_on_validation(sim, capsys):
    """``label_sets="auto"``: each label set is left out in turn on the validation stage; the
    kept combination validates at least as well as all of them (a tie leaves out), and the final
    model is the one built with the kept label sets alone; ``"all"`` keeps every one."""
    adata = sim.copy()
    adata.obs["noise"] = np.random.default_rng(0).choice(["a", "b", "c"], adata.n_obs)
    kw = dict(batch_key="slide", **SMALL)
    fit = dict(FAST, min_epochs=1)
    model = sp.SPARTHA(adata, label_keys=["cell_type", "noise"], **kw)
    model.train(**{**fit, "progress": True})
    chosen = model.selection["label_sets"]
    assert chosen["message"] in capsys.readouterr().out
    scores = chosen["scores"]
    assert set(scores) == {"cell_type+noise", "cell_type", "noise"}
    kept = "+".join(chosen["used"])
    assert model.registry.label_keys == chosen["used"] and chosen["left_out"] == [
        k for k in ("cell_type", "noise") if k not in chosen["used"]]
    assert scores[kept] == max(scores.values()) if chosen["left_out"] else scores[kept] > max(scores["cell_type"], scores["noise"])
    alone = sp.SPARTHA(adata, label_keys=chosen["used"], **kw)
    alone.train(**fit)
    for name, weight in alone.module.state_dict().items():
        np.testing.assert_array_equal(model.module.state_dict()[name].numpy(), weight.numpy(), err_msg=name)
    every = sp.SPARTHA(adata, label_keys=["cell_type", "noise"], **kw)
    every.train(**fit, label_sets="all")
    assert every.registry.label_keys == ["cell_type", "noise"] and "label_sets" not in every.selection
    with pytest.raises(sp.InputError, match="label_sets"):
        every.train(max_epochs=1, label_sets="some")
