"""Histology feature extractors on synthetic and (when present) real her2st patches."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from anndata import AnnData
from PIL import Image

from spartha_pyro import InputError
from spartha_pyro.pp import histology_features, stats_features
from spartha_pyro.pp.features import STATS_FEATURE_NAMES, efficientnet_lite0, resnet50

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


@pytest.fixture
def tiny(tmp_path):
    """6 spots on a 300×300 image, 4 on tissue, 1 half outside, plus 2 spots of an image-less section."""
    img = np.full((300, 300, 3), 245, np.uint8)
    rng = np.random.default_rng(0)
    img[40:260, 40:260] = rng.integers(60, 180, (220, 220, 3), dtype=np.uint8)  # "tissue"
    Image.fromarray(img).save(tmp_path / "s1.png")
    xy = np.array([[80, 80], [150, 80], [80, 150], [150, 150], [295, 150], [10, 10], [0, 0], [5, 5]], float)
    obs = pd.DataFrame(
        {"slide": ["s1"] * 6 + ["s2"] * 2, "has_image": [True] * 6 + [False] * 2},
        index=[f"spot{i}" for i in range(8)],
    )
    ad = AnnData(np.ones((8, 3), np.float32), obs=obs)
    ad.obsm["spatial"] = xy
    ad.uns["spatial"] = {
        "s1": {
            "scalefactors": {"spot_diameter_fullres": 40.0, "tissue_lowres_scalef": 1.0},
            "metadata": {"source_image_path": str(tmp_path / "s1.png"), "microns_per_pixel": 1.0},
        }
    }
    return ad


def test_stats_extractor_shape_and_finite(tiny):
    histology_features(tiny, extractor="stats", patch_size=32, progress=False)
    F = tiny.obsm["histology"]
    assert F.shape == (8, 66) == (8, len(STATS_FEATURE_NAMES))
    assert np.isfinite(F[:6]).all() and np.isnan(F[6:]).all()  # no image -> NaN row
    assert tiny.obs["patch_outside"].tolist() == [False] * 4 + [True, True, False, False]
    assert tiny.obs["patch_background"].iloc[5]  # the corner crop is white background
    assert (tiny.obs["patch_tissue_fraction"].iloc[:4] > 0.9).all()
    assert tiny.uns["histology"]["columns"] == {"stats": [0, 66]}


def test_stats_on_white_and_black():
    p = np.zeros((2, 16, 16, 3), np.uint8)
    p[0] = 255
    F = stats_features(p)
    assert np.isfinite(F).all()
    assert F[:, STATS_FEATURE_NAMES.index("tissue_fraction")].tolist() == [0.0, 0.0]


def test_lite0_loads_package_weights_and_gives_1280d(tiny):
    model = efficientnet_lite0()  # strict load; raises InputError on any key mismatch
    assert model.num_features == 1280
    histology_features(tiny, extractor=["efficientnet_lite0", "stats"], patch_size=64, neighbors=True,
                       device="cpu", progress=False)
    F = tiny.obsm["histology"]
    cols = tiny.uns["histology"]["columns"]
    assert cols["efficientnet_lite0"] == [0, 1280] and cols["stats"] == [1280, 1346]
    assert cols["stats_neighbors"] == [2626, 2692] and F.shape == (8, 2692)
    assert np.isfinite(F[:6]).all() and np.isnan(F[6:]).all()


@pytest.mark.skipif(not (DATA / "images" / "C5.jpg").is_file(), reason="her2st images absent")
def test_lite0_on_real_patches():
    from spartha_pyro.datasets import read_her2st

    ad = read_her2st(DATA, sections=["C5"], deconvolution=(), image_downscale=200)[:8].copy()
    histology_features(ad, progress=False, device="cpu")
    F = ad.obsm["histology"]
    assert F.shape == (8, 1280) and np.isfinite(F).all() and F.std(axis=0).mean() > 0.01


def test_precomputed_validation(tiny):
    tiny.obsm["uni"] = np.random.default_rng(0).normal(size=(8, 16))
    histology_features(tiny, extractor="precomputed", precomputed_key="uni", n_features=16, progress=False)
    assert tiny.obsm["histology"].shape == (8, 16)
    with pytest.raises(InputError, match="expected n_features=32"):
        histology_features(tiny, extractor="precomputed", precomputed_key="uni", n_features=32)
    with pytest.raises(InputError, match="'missing'"):
        histology_features(tiny, extractor="precomputed", precomputed_key="missing")
    bad = tiny.obsm["uni"].copy()
    bad[2, 3] = np.inf
    tiny.obsm["uni"] = bad
    with pytest.raises(InputError, match="spot2"):
        histology_features(tiny, extractor="precomputed", precomputed_key="uni")
    ok = np.ones((8, 4))
    ok[6:] = np.nan  # all-NaN rows = histology missing: allowed
    tiny.obsm["uni"] = ok
    histology_features(tiny, extractor="precomputed", precomputed_key="uni")
    tiny.obsm["uni"] = pd.DataFrame(np.ones((8, 4)), index=tiny.obs_names)  # DataFrames too
    histology_features(tiny, extractor="precomputed", precomputed_key="uni")
    partial = np.ones((8, 4))
    partial[7, 0] = np.nan  # partly NaN row: neither finite nor "missing"
    tiny.obsm["uni"] = partial
    with pytest.raises(InputError, match="spot7"):
        histology_features(tiny, extractor="precomputed", precomputed_key="uni")


def test_resnet50_without_weights_warns(tiny):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = resnet50()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)


def test_bad_extractor_and_no_image(tiny):
    with pytest.raises(InputError, match="extractor"):
        histology_features(tiny, extractor="uni")
    no_img = tiny[tiny.obs["slide"] == "s2"].copy()
    with pytest.raises(InputError, match="image"):
        histology_features(no_img, extractor="stats", progress=False)
