"""Evaluation metrics against hand-computed values and on toy data with known structure."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spartha_pyro import InputError
from spartha_pyro import metrics as M
from spartha_pyro.datasets import simulate


@pytest.fixture(scope="module")
def toy():
    return simulate(n_spots=600, n_genes=200, seed=0)


def test_normalize_log1p_dense_sparse_samples():
    counts = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]])
    expected = np.log1p(np.array([[2500.0, 7500.0, 0.0], [0.0, 0.0, 0.0], [2500.0, 2500.0, 5000.0]]))
    np.testing.assert_allclose(M.normalize_log1p(counts), expected)
    out = M.normalize_log1p(sp.csr_matrix(counts))
    assert sp.issparse(out)
    np.testing.assert_allclose(out.toarray(), expected)
    stacked = M.normalize_log1p(np.stack([counts, 2 * counts]), dtype=np.float32)
    assert stacked.shape == (2, 3, 3) and stacked.dtype == np.float32
    np.testing.assert_allclose(stacked[1], expected, rtol=1e-6)
    total = counts.sum(1)  # a gene subset normalised by the full library equals the full result subset
    np.testing.assert_allclose(M.normalize_log1p(counts[:, :2], total=total), expected[:, :2])
    np.testing.assert_allclose(M.normalize_log1p(sp.csr_matrix(counts[:, :2]), total=total).toarray(), expected[:, :2])
    np.testing.assert_allclose(M.normalize_log1p(np.stack([counts, counts])[..., 1:], total=np.stack([total, total]))[0], expected[:, 1:])


def test_point_metrics_match_hand_computation():
    obs = np.array([[1.0, 2.0], [2.0, 0.0], [3.0, 1.0], [4.0, 5.0]])
    pred = np.array([[1.5, 1.0], [2.0, 1.0], [2.5, 1.0], [5.0, 2.0]])
    per_gene = [np.corrcoef(pred[:, g], obs[:, g])[0, 1] for g in range(2)]
    per_spot = [np.corrcoef(pred[s], obs[s])[0, 1] for s in range(4)]
    r2 = [1 - ((obs[:, g] - pred[:, g]) ** 2).sum() / ((obs[:, g] - obs[:, g].mean()) ** 2).sum() for g in range(2)]
    np.testing.assert_allclose(M.pcc_gene(pred, obs, reduce=False), per_gene)
    assert M.pcc_gene(pred, obs) == pytest.approx(np.mean(per_gene))
    assert M.pcc_spot(pred, obs) == pytest.approx(np.mean(per_spot))
    assert M.r2(pred, obs) == pytest.approx(np.mean(r2))
    assert M.r2_pooled(pred, obs) == pytest.approx(1 - ((obs - pred) ** 2).sum() / ((obs - obs.mean()) ** 2).sum())
    assert M.mae(pred, obs) == pytest.approx(np.abs(pred - obs).mean())
    assert M.mse(pred, obs) == pytest.approx(((pred - obs) ** 2).mean())


def test_constant_genes_conventions():
    obs = np.array([[1.0, 3.0, 1.0], [2.0, 3.0, 5.0], [3.0, 3.0, 2.0]])
    pred = np.array([[1.0, 0.0, 4.0], [2.0, 1.0, 4.0], [3.0, 2.0, 4.0]])
    r = M.pcc_gene(pred, obs, reduce=False)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1]) and r[2] == 0.0  # constant obs: NaN; constant pred: 0
    assert M.pcc_gene(pred, obs) == pytest.approx(0.5)
    assert np.isnan(M.r2(pred, obs, reduce=False)[1])


def test_perfect_and_mean_predictor(toy):
    y = M.normalize_log1p(toy.X).toarray()
    train, test = y[:400], y[400:]
    perfect = M.regression_metrics(test, test, panels={"all": None, "hvg": np.arange(50)})
    assert list(perfect.columns) == ["panel", "metric", "value"]
    values = perfect.set_index(["panel", "metric"])["value"]
    for panel in ("all", "hvg"):
        assert values[panel, "pcc_gene"] == pytest.approx(1.0)
        assert values[panel, "pcc_spot"] == pytest.approx(1.0)
        assert values[panel, "r2"] == pytest.approx(1.0)
        assert values[panel, "mae"] == 0.0 and values[panel, "mse"] == 0.0
    mean = np.tile(train.mean(0), (len(test), 1))
    res = M.regression_metrics(mean, test).set_index("metric")["value"]
    assert not res.isna().any()
    assert res["pcc_gene"] == 0.0
    assert res["pcc_spot"] > 0.3  # the mean profile already correlates across genes
    assert res["r2"] < 0.05


def test_panels_by_name_and_errors(toy):
    y = M.normalize_log1p(toy.X).toarray()
    names = list(toy.var_names[:10])
    by_name = M.regression_metrics(y, y + 1.0, panels={"p": names}, var_names=toy.var_names)
    by_mask = M.regression_metrics(y, y + 1.0, panels={"p": np.isin(toy.var_names, names)})
    pd.testing.assert_frame_equal(by_name, by_mask)
    with pytest.raises(InputError):
        M.regression_metrics(y, y, panels={"p": ["nope"]}, var_names=toy.var_names)
    with pytest.raises(InputError):
        M.regression_metrics(y, y[:, :5])


def test_hvg_panel_on_training_spots(toy):
    genes = M.hvg_panel(toy[:300], n_top=25)
    assert len(genes) == 25 and len(set(genes)) == 25 and set(genes) <= set(toy.var_names)
    assert len(M.hvg_panel(toy[:300], n_top=1000)) == toy.n_vars


def test_qcpr_real_vs_degraded(toy):
    real = toy[toy.obs["slide"] == "slide0"].X
    good = M.qcpr(real, real, toy.var_names)
    assert set(good) == {"qcpr3", "qcpr4", "qcpr5"}
    assert good["qcpr3"] <= good["qcpr4"] <= good["qcpr5"] and good["qcpr5"] > 0.75
    dense = real.toarray()
    assert M.qcpr(np.zeros_like(dense), real, toy.var_names)["qcpr5"] == 0.0
    degraded = np.stack([dense, dense // 20])  # the second sample loses ~95% of its counts
    assert M.qcpr(degraded, real, toy.var_names)["qcpr5"] == pytest.approx(good["qcpr5"] / 2, abs=0.05)
    with pytest.raises(InputError):
        M.qcpr(dense[:, :10], real, toy.var_names)


def test_probe_and_silhouette(toy):
    rng = np.random.default_rng(0)
    cell_type = toy.obs["cell_type"].cat.codes.to_numpy()
    latents = {
        "encoded": np.eye(4)[cell_type] @ rng.normal(size=(4, 6)) + rng.normal(0, 0.3, (toy.n_obs, 6)),
        "random": rng.normal(size=(toy.n_obs, 6)),
    }
    factors = {"cell_type": toy.obs["cell_type"], "slide": toy.obs["slide"]}
    idx = rng.permutation(toy.n_obs)
    probe = M.probe_matrix(latents, factors, idx[:400], idx[400:])
    assert probe.dims == ("latent", "factor")
    assert probe.sel(latent="encoded", factor="cell_type") > 0.9
    assert abs(float(probe.sel(latent="random", factor="cell_type")) - 0.25) < 0.12
    assert abs(float(probe.sel(latent="random", factor="slide")) - 1 / 3) < 0.12
    sil = M.silhouette_matrix(latents, factors, max_spots=300)
    assert sil.sel(latent="encoded", factor="cell_type") > sil.sel(latent="random", factor="cell_type") + 0.2
    with pytest.raises(InputError):
        M.probe_matrix({"z": np.zeros((5, 2))}, {"f": [0, 1]}, [0], [1])


def test_summarize_and_format_table():
    records = [
        {"method": m, "panel": p, "metric": k, "section": s, "seed": seed, "value": v + seed * 0.01}
        for m, v in (("ridge", 0.1), ("mean", 0.0))
        for p in ("all", "hvg")
        for k in ("pcc_gene", "mse")
        for s in ("C5", "C4")
        for seed in (0, 1)
    ] + [{"method": "ridge", "panel": "all", "metric": "qcpr5", "section": "C5", "seed": 0, "value": 0.9}]
    summary = M.summarize(records)
    row = summary.query("method == 'ridge' and panel == 'all' and metric == 'pcc_gene'").iloc[0]
    assert row["mean"] == pytest.approx(0.105) and row["sd"] == pytest.approx(np.std([0.1, 0.11], ddof=1))
    assert row["n_seeds"] == 2
    text = M.format_table(records)
    assert "[all]" in text and "[hvg]" in text and "QCPR" in text and "0.1050 ± 0.0071" in text


def test_probes_skip_missing_labels():
    """Unlabelled spots (NaN) are left out of a factor's probe and silhouette, not a class."""
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 100, dtype=object)
    z = (y == "a")[:, None] * 3.0 + rng.normal(size=(200, 2))
    y_missing = y.copy()
    y_missing[::5] = np.nan
    idx = np.arange(200)
    probe = M.probe_matrix({"z": z}, {"y": y_missing}, idx[:120], idx[120:])
    assert float(probe.sel(latent="z", factor="y")) > 0.9
    assert float(probe.coords["chance"].sel(factor="y")) == 0.5
    assert np.isfinite(M.silhouette_matrix({"z": z}, {"y": y_missing}).values).all()
