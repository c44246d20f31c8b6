"""The linear histology path: a ridge probe blended into ``predict_mean``, its share chosen on validation spots."""
import numpy as np
import pandas as pd
import pytest

import spartha_pyro as sp
from conftest import SMALL
from spartha_pyro.cli import linear_path_setting
from spartha_pyro.linear_path import SHARES, choose_share, fit_linear_path

FAST = dict(max_epochs=4, batch_size=100, lr=3e-3, progress=False, seed=0)


@pytest.fixture(scope="module")
def blended(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(**FAST)  # validation="auto": slide2 held out, then a refit
    return model


def test_share_is_the_best_scoring_one_on_the_validation_spots(blended):
    chosen = blended.selection["linear_path"]
    scores = {float(k): v for k, v in chosen["scores"].items()}
    assert sorted(scores) == list(SHARES) and chosen["share"] == max(scores, key=scores.get)
    assert "linear histology path: share" in blended.selection["message"]
    if chosen["share"] > 0:
        assert blended.linear_path.share == chosen["share"] and blended.linear_path.scores == scores


def test_predict_mean_blends_the_model_and_the_probe(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=None, linear_path=0.3, **FAST)
    spots = sim[sim.obs["slide"] == "slide2"].copy()
    blend, alone = model.predict_mean(spots, num_samples=4), model.predict_mean(spots, num_samples=4, linear_path=False)
    probe = model.linear_path.predict(model._encode_histology(spots, "posterior").x_h)
    np.testing.assert_allclose(blend.values, 0.7 * alone.values + 0.3 * probe, rtol=1e-5, atol=1e-5)
    assert blend.attrs["linear_share"] == 0.3 and alone.attrs["linear_share"] == 0.0
    # artifact-free generation is scored against clean truth: the probe (fit on measured spots) stays out
    clean = model.predict_mean(spots, num_samples=4, artifact="pass")
    np.testing.assert_array_equal(clean.values, model.predict_mean(spots, num_samples=4, artifact="pass", linear_path=False).values)
    assert clean.attrs["linear_share"] == 0.0


def test_the_linear_path_is_saved_with_the_model(blended, sim, tmp_path):
    spots = sim[sim.obs["slide"] == "slide1"].copy()
    blended.save(tmp_path / "m")
    loaded = sp.SPARTHA.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.predict_mean(spots, num_samples=4).values,
                                  blended.predict_mean(spots, num_samples=4).values)
    blended.linear_path, kept = None, blended.linear_path
    try:  # a model without the path, saved over one with it, leaves no stale probe behind
        blended.save(tmp_path / "m", overwrite=True)
        assert not (tmp_path / "m" / "linear_path.npz").exists() and sp.SPARTHA.load(tmp_path / "m").linear_path is None
    finally:
        blended.linear_path = kept


def test_no_linear_path_without_validation_or_when_asked(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=None, **FAST)
    assert model.linear_path is None and model.selection is None
    model.train(linear_path=None, **FAST)
    assert model.linear_path is None and "linear_path" not in model.selection


def test_without_refit_the_probe_learns_the_training_spots_only(sim):
    """No refit: the final model never saw the validation section, nor may its probe."""
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=["slide2"], refit=False, linear_path=np.float32(0.5), **FAST)
    train = sim[sim.obs["slide"] != "slide2"].copy()
    data = model._encode_histology(sim, "posterior")
    counts = train.X.toarray()
    observed = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    probe = model.linear_path.predict(data.x_h[(sim.obs["slide"] != "slide2").to_numpy()])
    np.testing.assert_allclose(model.linear_path.intercept, observed.mean(0), rtol=1e-4, atol=1e-5)
    assert probe.shape == observed.shape and model.linear_path.share == 0.5


def test_a_fixed_share_is_refused_with_a_gene_mask(sim):
    adata = sim.copy()
    slides = list(adata.obs["slide"].cat.categories)
    adata.varm["measured"] = pd.DataFrame(True, index=adata.var_names, columns=slides)
    model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", gene_mask_key="measured", **SMALL)
    with pytest.raises(sp.InputError, match="gene_mask_key"):
        model.train(linear_path=0.5, **FAST)


@pytest.mark.parametrize("damage", ["empty", "truncated", "wrong shape"])
def test_a_damaged_probe_file_is_an_input_error(sim, tmp_path, damage):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(validation=None, linear_path=0.3, max_epochs=1, batch_size=200, progress=False)
    model.save(tmp_path / "m")
    npz = tmp_path / "m" / "linear_path.npz"
    if damage == "empty":
        npz.write_bytes(b"")
    elif damage == "truncated":
        npz.write_bytes(npz.read_bytes()[:100])
    else:
        arrays = dict(np.load(npz))
        arrays["coef"] = arrays["coef"][:-1]
        np.savez(npz, **arrays)
    with pytest.raises(sp.InputError, match="linear_path.npz"):
        sp.SPARTHA.load(tmp_path / "m")


@pytest.mark.parametrize("bad", [1.5, -0.1, "yes", True])
def test_bad_linear_path_settings_are_refused_before_training(sim, bad):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    with pytest.raises(sp.InputError, match="linear_path"):
        model.train(linear_path=bad, **FAST)
    assert not model.is_trained


def test_command_line_setting():
    assert linear_path_setting("auto") == "auto" and linear_path_setting("None") is None
    assert linear_path_setting("0.4") == 0.4
    with pytest.raises(ValueError):
        linear_path_setting("2")


def test_choose_share_picks_the_predictor_that_is_right():
    rng = np.random.default_rng(0)
    truth, noise = rng.normal(size=(50, 6)), rng.normal(size=(50, 6))
    assert choose_share(truth, noise, truth)[0] == 0.0
    assert choose_share(noise, truth, truth)[0] == 1.0
    # two independent noisy views of the truth: the even blend beats either alone
    a, b = truth + rng.normal(size=truth.shape), truth + rng.normal(size=truth.shape)
    share, scores = choose_share(a, b, truth)
    assert 0.0 < share < 1.0 and scores[share] > max(scores[0.0], scores[1.0])


def test_probe_recovers_a_linear_relation():
    """Counts whose log-normalised expression is linear in the histology: the probe predicts it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    rates = np.exp(x @ rng.normal(size=(5, 8)) * 0.5 + 3.0)
    counts = rng.poisson(rates)
    path = fit_linear_path(x, counts, np.repeat(np.arange(4), 100), share=0.5)
    observed = np.log1p(1e4 * counts / counts.sum(1, keepdims=True))
    assert sp.metrics.pcc_gene(path.predict(x), observed) > 0.8
