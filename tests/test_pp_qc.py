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


def test_patch_metrics_see_whitespace_blur_and_stain():
    from PIL import Image, ImageFilter

    from spartha_pyro.pp.patches import patch_qc_metrics

    rng = np.random.default_rng(0)
    tissue = rng.integers(60, 200, (48, 48, 3)).astype(np.uint8)
    white = tissue.copy()
    white[:, :24] = 242  # half the patch is bare glass
    blurred = np.asarray(Image.fromarray(tissue).filter(ImageFilter.GaussianBlur(3)))
    dark = (tissue * 0.6).astype(np.uint8)
    m = patch_qc_metrics(np.stack([tissue, white, blurred, dark]))
    assert m["tissue_fraction"][0] == 1 and 0.45 < m["tissue_fraction"][1] < 0.55
    assert m["log_sharpness"][2] < m["log_sharpness"][0] - 1
    assert m["od_mean"][3] > m["od_mean"][0] > m["od_mean"][1]


def _imaged(n=60, seed=0):
    """Simulated spots, one batch, with typical patch metrics in ``obs``; spot 0's patch is
    out of focus, spot 1's a third bare glass, spot 2's over-stained, spot 3 has no image."""
    adata = sp.datasets.simulate(n_spots=n, n_genes=40, artifact_rate=0.0, seed=seed)
    rng = np.random.default_rng(seed)
    adata.obs["patch_tissue_fraction"] = rng.uniform(0.95, 1.0, n)
    adata.obs["patch_log_sharpness"] = rng.normal(-3.0, 0.1, n)
    adata.obs["patch_od_mean"] = rng.normal(0.27, 0.01, n)
    adata.obs.loc[adata.obs_names[0], "patch_log_sharpness"] = -5.5
    adata.obs.loc[adata.obs_names[1], "patch_tissue_fraction"] = 0.66
    adata.obs.loc[adata.obs_names[2], "patch_od_mean"] = 0.5
    adata.obs.loc[adata.obs_names[3], ["patch_tissue_fraction", "patch_log_sharpness", "patch_od_mean"]] = np.nan
    return adata


def test_image_qc_fails_bad_patches_whatever_their_counts():
    adata = _imaged()
    counts_only = (sp.pp.annotate_qc(adata.copy()).obs["qc_pass"] == "fail").to_numpy()
    sp.pp.annotate_qc(adata, image=True)
    fail = (adata.obs["qc_pass"] == "fail").to_numpy()
    image_fail = adata.obs["qc_pass_image"].to_numpy(bool)
    assert image_fail[:3].all() and not image_fail[3:].any()  # no image: judged on counts alone
    assert (fail == (counts_only | image_fail)).all()
    assert adata.uns["qc"]["image"] and adata.uns["qc"]["max_background"] == 0.25
    # the background share is an absolute limit: a stricter one fails the 0.66 patch's neighbours too
    sp.pp.annotate_qc(adata, image=True, max_background=0.02)
    assert adata.obs["qc_pass_image"].sum() > image_fail.sum()


def test_image_qc_needs_the_patch_metrics():
    adata = sp.datasets.simulate(n_spots=60, n_genes=30, seed=0)
    with pytest.raises(sp.InputError, match="histology_features or sp.pp.annotate_patches"):
        sp.pp.annotate_qc(adata, image=True)
    with pytest.raises(sp.InputError, match="max_background"):
        sp.pp.annotate_qc(_imaged(), image=True, max_background=1.0)
    with pytest.raises(sp.InputError, match="image_qc needs images"):
        sp.pp.prepare(adata, extractor=None, image_qc=True)


def test_qc_summary_counts_the_image_failures_as_annotate_qc_does():
    adata = _imaged()
    adata.obs["slide"] = "s"
    sp.pp.annotate_qc(adata, batch_key="slide", image=True)
    table = sp.pl.qc_summary(adata, batch_key="slide", nmads=[5], image=True)
    assert table.loc["s", "fail_5mad"] == (adata.obs["qc_pass"] == "fail").sum()
    assert table.loc["s", "fail_5mad"] > sp.pl.qc_summary(adata, batch_key="slide", nmads=[5], image=False).loc["s", "fail_5mad"]


def test_annotate_qc_without_image_drops_a_stale_image_column_and_bad_sides_are_named():
    adata = _imaged()
    sp.pp.annotate_qc(adata, image=True)
    sp.pp.annotate_qc(adata)
    assert "qc_pass_image" not in adata.obs and not adata.uns["qc"]["image"]
    with pytest.raises(sp.InputError, match="outlier side"):
        sp.pp.qc_outliers(pd.DataFrame({"m": [1.0, 2.0]}), pd.DataFrame({"median": [1.0], "mad": [1.0]}, index=["m"]),
                          5, {"m": "above"})
    with pytest.raises(sp.InputError, match="MAD thresholds"):
        sp.pp.prepare(adata, extractor=None, nmads=[0])


def test_prepare_judges_the_patches_by_default_when_there_are_images(tmp_path):
    """``image_qc=None`` (default): image QC when some spot has an image, counts only otherwise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (200, 200, 3)).astype(np.uint8)
    img[:, :40] = 245  # bare glass on the left
    Image.fromarray(img).save(tmp_path / "s1.png")
    adata = sp.datasets.simulate(n_spots=40, n_genes=30, seed=0)
    adata.obs["slide"] = "s1"
    adata.obs["has_image"] = True
    xy = np.stack(np.meshgrid(np.linspace(20, 180, 8), np.linspace(30, 170, 5)), -1).reshape(-1, 2)
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"s1": {"scalefactors": {"spot_diameter_fullres": 30.0},
                                   "metadata": {"source_image_path": str(tmp_path / "s1.png")}}}
    sp.pp.prepare(adata, extractor=None, progress=False)
    assert adata.uns["qc"]["image"] and adata.obs.loc[xy[:, 0] < 25, "qc_pass_image"].all()
    table = sp.pl.qc_summary(adata, nmads=[5])
    assert table.loc["s1", "fail_5mad"] == (adata.obs["qc_pass"] == "fail").sum()
    plain = sp.datasets.simulate(n_spots=40, n_genes=30, seed=0)
    sp.pp.prepare(plain, extractor=None)
    assert not plain.uns["qc"]["image"] and "qc_pass_image" not in plain.obs
