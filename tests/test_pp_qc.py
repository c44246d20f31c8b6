"""MAD QC annotation and the simulator's ground truth."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sps
from anndata import AnnData

import spartha_pyro as sp


def test_simulate_is_seeded_and_integer():
    a = sp.datasets.simulate(n_spots=120, n_genes=60, seed=1)
    b = sp.datasets.simulate(n_spots=120, n_genes=60, seed=1)
    assert sps.issparse(a.X) and (a.X != b.X).nnz == 0
    assert np.all(a.X.data == np.round(a.X.data))
    assert a.obsm["histology"].shape == (120, 64)
    assert set(a.obs["slide"]) == {"slide0", "slide1", "slide2"}
    assert 0.05 < a.obs["true_artifact"].mean() < 0.35


def test_annotate_qc_flags_artifacts_and_keeps_spots(sim):
    assert sim.n_obs == 600  # nothing dropped
    fail = (sim.obs["qc_pass"] == "fail").to_numpy()
    art = sim.obs["true_artifact"].to_numpy()
    assert (fail & art).sum() / art.sum() > 0.8  # artifacts are caught
    assert (fail & ~art).sum() / (~art).sum() < 0.05  # clean spots mostly pass
    assert {"qc_log1p_total_counts", "qc_pct_counts_mt"} <= set(sim.obs)
    assert sim.uns["qc"]["nmads"] == 5.0


def test_more_mads_fail_fewer_spots():
    adata = sp.datasets.simulate(n_spots=300, n_genes=80, seed=2)
    fails = [int((sp.pp.annotate_qc(adata, batch_key="slide", nmads=k).obs["qc_pass"] == "fail").sum()) for k in (3, 4, 5)]
    assert fails[0] >= fails[1] >= fails[2]


def test_qc_metrics_by_hand():
    X = sps.csr_matrix(np.array([[0, 0, 0], [1, 2, 7], [5, 0, 5]]))
    m = sp.pp.qc_metrics(X, ["MT-1", "g2", "g3"])
    np.testing.assert_allclose(m["log1p_total_counts"], np.log1p([0, 10, 10]))
    np.testing.assert_allclose(m["log1p_n_genes_by_counts"], np.log1p([0, 3, 2]))
    np.testing.assert_allclose(m["pct_counts_in_top_20_genes"], [0, 100, 100])
    np.testing.assert_allclose(m["pct_counts_mt"], [0, 10, 50])
    # more than 20 detected genes: only the 20 largest counts are summed (the top-20 branch)
    rng = np.random.default_rng(0)
    row = rng.permutation(np.arange(1, 26))  # 25 genes with counts 1..25, shuffled
    X = sps.csr_matrix(np.vstack([row, np.r_[row[:21], 0, 0, 0, 0], np.r_[np.ones(20), np.zeros(5)]]))
    m = sp.pp.qc_metrics(X, [f"g{j}" for j in range(25)])
    top21 = np.sort(row[:21])[-20:].sum()
    np.testing.assert_allclose(m["pct_counts_in_top_20_genes"],
                               [100 * sum(range(6, 26)) / 325, 100 * top21 / row[:21].sum(), 100])
    assert "pct_counts_mt" not in m


def test_zero_count_spots_fail_without_nan():
    adata = sp.datasets.simulate(n_spots=150, n_genes=50, seed=3)
    X = adata.X.tolil()
    X[0] = 0
    adata.X = X.tocsr()
    sp.pp.annotate_qc(adata)
    assert adata.obs["qc_pass"].iloc[0] == "fail"
    assert np.isfinite(adata.obs.filter(like="qc_").select_dtypes("number").to_numpy()).all()


def test_annotate_qc_errors():
    adata = sp.datasets.simulate(n_spots=60, n_genes=30, seed=0)
    with pytest.raises(sp.InputError, match="nope"):
        sp.pp.annotate_qc(adata, batch_key="nope")
    with pytest.raises(sp.InputError, match="nmads"):
        sp.pp.annotate_qc(adata, nmads=0)
    with pytest.raises(sp.InputError, match="no genes"):
        sp.pp.annotate_qc(AnnData(obs=pd.DataFrame(index=["a", "b"])))
