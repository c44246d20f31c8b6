"""Point-prediction baselines: fit/predict surface, ridge vs mean, HisToGene training, errors."""
import numpy as np
import pytest
import scipy.sparse as sp
from anndata import AnnData

from spartha_pyro import InputError
from spartha_pyro import metrics as M
from spartha_pyro.baselines import HisToGene, MeanPredictor, RidgePredictor


@pytest.fixture(scope="module")
def linear_toy():
    """Three slides whose histology vector linearly encodes log expression."""
    rng = np.random.default_rng(0)
    n, p, g = 450, 12, 80
    x = rng.normal(size=(n, p)).astype(np.float32)
    logits = 1.0 + x @ rng.normal(0, 0.4, (p, g))
    counts = rng.poisson(np.exp(logits) * 20).astype(np.int32)
    adata = AnnData(X=sp.csr_matrix(counts))
    adata.var_names = [f"g{i}" for i in range(g)]
    adata.obs["slide"] = np.repeat(["a", "b", "c"], n // 3)
    adata.obsm["histology"] = x
    side = np.arange(n // 3)
    adata.obsm["spatial"] = np.tile(np.stack([side % 12, side // 12], 1), (3, 1))
    return adata


def split(adata):
    return adata[adata.obs["slide"] != "c"].copy(), adata[adata.obs["slide"] == "c"].copy()


def test_ridge_beats_mean(linear_toy):
    train, test = split(linear_toy)
    obs = M.normalize_log1p(test.X).toarray()
    ridge = RidgePredictor(group_key="slide").fit(train)
    pred = ridge.predict(test)
    assert pred.shape == (test.n_obs, test.n_vars) and pred.dtype == np.float32
    assert ridge.alpha_ in ridge.alphas and ridge.cv_mse_.shape == ridge.alphas.shape
    mean = MeanPredictor().fit(train).predict(test)
    assert mean.shape == pred.shape
    assert M.pcc_gene(pred, obs) > 0.5 and M.pcc_gene(mean, obs) == 0.0
    assert M.mse(pred, obs) < 0.7 * M.mse(mean, obs)
    # no groups: shuffled KFold gives a close answer
    ungrouped = RidgePredictor().fit(train).predict(test)
    assert M.pcc_gene(ungrouped, obs) > 0.5


def test_ridge_errors(linear_toy):
    train, test = split(linear_toy)
    with pytest.raises(InputError, match="histology"):
        RidgePredictor(histology_key="missing").fit(train)
    with pytest.raises(InputError, match="group_key"):
        RidgePredictor(group_key="missing").fit(train)
    ridge = RidgePredictor().fit(train)
    narrow = test.copy()
    narrow.obsm["histology"] = narrow.obsm["histology"][:, :5]
    with pytest.raises(InputError, match="features"):
        ridge.predict(narrow)
    with pytest.raises(RuntimeError):
        MeanPredictor().predict(test)


def test_histogene_trains_and_predicts(linear_toy):
    train, test = split(linear_toy)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (linear_toy.n_obs, 8, 8, 3), dtype=np.uint8)
    p_train, p_test = patches[linear_toy.obs["slide"] != "c"], patches[linear_toy.obs["slide"] == "c"]
    model = HisToGene(dim=32, depth=1, heads=2, device="cpu", seed=0)
    model.fit(train, patches=p_train, epochs=15, lr=1e-3)
    assert len(model.history_) == 15 and model.history_[-1] < 0.7 * model.history_[0]
    pred = model.predict(test, patches=p_test)
    assert pred.shape == (test.n_obs, test.n_vars) and np.isfinite(pred).all()
    again = HisToGene(dim=32, depth=1, heads=2, device="cpu", seed=0).fit(train, patches=p_train, epochs=15, lr=1e-3)
    np.testing.assert_allclose(again.predict(test, patches=p_test), pred, rtol=1e-5, atol=1e-5)


def test_histogene_errors(linear_toy):
    train, _ = split(linear_toy)
    patches = np.zeros((train.n_obs, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="divide"):
        HisToGene(dim=30, heads=4)
    with pytest.raises(InputError, match="patches"):
        HisToGene(dim=16, heads=2).fit(train, patches=patches[:10], epochs=1)
    with pytest.raises(InputError, match="grid"):
        HisToGene(dim=16, heads=2, n_pos=5).fit(train, patches=patches, epochs=1)
    pixel = train.copy()
    pixel.obsm["spatial"] = pixel.obsm["spatial"] * 1.37
    with pytest.raises(InputError, match="integer"):
        HisToGene(dim=16, heads=2).fit(pixel, patches=patches, epochs=1)
    model = HisToGene(dim=16, heads=2).fit(train, patches=patches, epochs=1)
    with pytest.raises(InputError, match="shape"):
        model.predict(train, patches=np.zeros((train.n_obs, 4, 4, 3), dtype=np.uint8))
