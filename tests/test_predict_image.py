"""`spartha predict-image`: the saved feature recipe, image reading, tissue, grid, bad input.

A 600 × 600 px synthetic "H&E" image at 2 µm/px (an elliptic tissue with stripes of two
stains) carries a square grid of 87 training spots (80 µm spacing, 64 µm patches = 32 px);
a tiny model is trained on their ``stats`` features.
"""
from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

import spartha_pyro as sp
from spartha_pyro import InputError
from spartha_pyro.cli import BAD_INPUT, main
from spartha_pyro.image import detect_tissue, image_features, lattice_neighbor_mean, open_image, predict_image, spot_grid
from spartha_pyro.recipe import check_recipe, read_recipe

UM_PER_PX, SPACING_PX, PATCH_PX = 2.0, 40, 32


def he_image(h: int = 600, w: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A white slide with an elliptic tissue striped in two stains every 100 px; and its tissue mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((xx - w / 2) / (0.38 * w)) ** 2 + ((yy - h / 2) / (0.33 * h)) ** 2 < 1
    stain = np.where((xx // 100 % 2 == 0)[..., None], np.array([200, 110, 170]), np.array([150, 60, 140]))
    img = np.full((h, w, 3), 240, np.uint8)
    img[tissue] = np.clip(stain + rng.integers(-25, 25, (h, w, 3)), 0, 255)[tissue]
    return img, tissue


def write_pyramid(path: Path, img: np.ndarray, um_per_px: float, levels: int = 2, tile: int = 64) -> None:
    """A tiled pyramidal TIFF (sub-IFDs at 1/2, 1/4 …) with its resolution in the TIFF tags."""
    res = 1e4 / um_per_px  # pixels per cm
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(tile, tile), subifds=levels, photometric="rgb", compression="zlib",
                 resolution=(res, res), resolutionunit="CENTIMETER")
        for k in range(1, levels + 1):
            tw.write(img[:: 2**k, :: 2**k], tile=(tile, tile), subfiletype=1, photometric="rgb", compression="zlib")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The image (PNG), training spots with stats features, and a tiny model saved to disk."""
    d = tmp_path_factory.mktemp("predict_image")
    img, tissue = he_image()
    Image.fromarray(img).save(d / "slide.png")
    xy, _ = spot_grid(600, 600, SPACING_PX, "square")
    xy = xy[tissue[xy[:, 1].astype(int), xy[:, 0].astype(int)]]
    rng = np.random.default_rng(0)
    stripe = xy[:, 0] // 100 % 2 == 0
    rate = np.where(stripe[:, None], 5.0, 1.0) * rng.gamma(2, 1, 12)[None] + 1
    adata = ad.AnnData(rng.poisson(5 * rate).astype(np.float32),
                       obs=pd.DataFrame({"slide": "s1"}, index=[f"spot{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(12)]))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"s1": {"scalefactors": {"spot_diameter_fullres": 20.0},
                                   "metadata": {"source_image_path": str(d / "slide.png"), "microns_per_pixel": UM_PER_PX,
                                                "spot_diameter_um": 40.0}}}
    sp.pp.annotate_qc(adata, batch_key="slide")
    sp.pp.histology_features(adata, extractor="stats", patch_size=PATCH_PX, progress=False)
    model = sp.SPARTHA(adata, hidden=16, y_dim=2, d_dim=2, r_dim=2, x_dim=2)
    model.train(max_epochs=2, batch_size=64, progress=False)
    model.save(d / "model")
    return d, adata, model


# ---------------------------------------------------------------------------- the recipe
def test_recipe_recorded_saved_and_loaded(setup, tmp_path):
    d, adata, model = setup
    recipe = adata.uns["histology"]["recipe"]
    assert recipe["extractors"] == ["stats"] and recipe["n_features"] == 66
    assert recipe["patch_px"] == PATCH_PX and recipe["patch_um"] == pytest.approx(PATCH_PX * UM_PER_PX)
    assert recipe["um_per_px"] == UM_PER_PX and recipe["neighbors"] is False
    assert recipe["spot_spacing_um"] == pytest.approx(SPACING_PX * UM_PER_PX) and recipe["grid"] == "square"
    assert recipe["spot_diameter_um"] == 40.0 and "stats" in recipe["versions"]
    assert model.registry.histology_recipe == recipe
    assert sp.SPARTHA.load(d / "model").registry.histology_recipe == recipe
    adata.write_h5ad(tmp_path / "a.h5ad")  # survives h5ad (numpy types back to plain ones)
    assert read_recipe(ad.read_h5ad(tmp_path / "a.h5ad"), "histology") == recipe


def test_recipe_mismatch_is_refused_and_no_recipe_allowed(setup):
    _, adata, model = setup
    other = adata.copy()
    other.uns["histology"] = {**adata.uns["histology"],
                              "recipe": {**adata.uns["histology"]["recipe"], "patch_px": 64, "patch_um": 128.0}}
    with pytest.raises(InputError, match=r"patch_px: model 32, data 64.*patch_um"):
        model.predict_expression(other, num_samples=2)
    with pytest.raises(InputError, match="another recipe"):
        model.get_latent(other, latent="x", encoder="histology")
    bare = ad.AnnData(obs=adata.obs[[]], obsm={"histology": adata.obsm["histology"]})  # no recipe: as before
    assert model.predict_expression(bare, num_samples=2).shape == (2, adata.n_obs, 12)
    pca = adata.copy()  # vectors changed after extraction: the stale recipe is ignored, with a warning
    pca.obsm["histology"] = pca.obsm["histology"][:, :10]
    with pytest.warns(UserWarning, match="ignoring the recipe"):
        assert read_recipe(pca, "histology") is None
    with pytest.raises(InputError, match="extractors"):
        check_recipe({"extractors": ["stats"]}, {"extractors": ["efficientnet_lite0", "stats"]})


# ---------------------------------------------------------------------------- grid and tissue
@pytest.mark.parametrize("kind, n_nbr", [("square", 4), ("hex", 6)])
def test_grid_geometry(kind, n_nbr):
    from scipy.spatial import cKDTree

    xy, rowcol = spot_grid(1000, 800, 50.0, kind)
    tree = cKDTree(xy)
    dist = tree.query(xy, k=2)[0][:, 1]
    np.testing.assert_allclose(dist, 50.0, rtol=1e-9)
    interior = (xy[:, 0] > 100) & (xy[:, 0] < 900) & (xy[:, 1] > 100) & (xy[:, 1] < 700)
    counts = np.array([len(n) - 1 for n in tree.query_ball_point(xy[interior], r=50.0 * 1.01)])
    assert (counts == n_nbr).all()
    dy = np.diff(np.unique(xy[:, 1]))
    np.testing.assert_allclose(dy, 50.0 * (np.sqrt(3) / 2 if kind == "hex" else 1.0))
    assert (xy >= 0).all() and (xy[:, 0] < 1000).all() and (xy[:, 1] < 800).all()
    assert len(np.unique(rowcol, axis=0)) == len(xy)


def test_tissue_detection_fills_small_holes_and_finds_none_on_blank():
    img, tissue = he_image(300, 300)
    img[140:146, 140:146] = 245  # a small hole inside the tissue
    mask = detect_tissue(img)
    assert mask[143, 143] and (mask == tissue).mean() > 0.97
    assert not detect_tissue(np.full((200, 200, 3), 243, np.uint8)).any()
    noisy = np.clip(243 + np.random.default_rng(0).integers(-4, 4, (200, 200, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(noisy).mean() < 0.01


# ---------------------------------------------------------------------------- reading
def test_region_read_decodes_only_touched_tiles(tmp_path, monkeypatch):
    from tifffile import zarr as tiff_zarr

    data = np.random.default_rng(0).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)  # 12 MB
    tifffile.imwrite(tmp_path / "big.tif", data, tile=(128, 128), photometric="rgb", compression="zlib")
    keys = []
    get = tiff_zarr.ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(tiff_zarr.ZarrTiffStore, "get", counting_get)
    with open_image(tmp_path / "big.tif") as slide:
        keys.clear()
        tracemalloc.start()
        region = slide.read_region(200, 130, 100, 100)  # inside tiles (1, 1) and (1, 2)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        np.testing.assert_array_equal(region, data[130:230, 200:300])
        assert sorted(keys) == ["1.1.0", "1.2.0"]
        assert peak < 1_000_000  # the level is 12 MB
        edge = slide.read_region(2000, -10, 100, 40)  # past the border: white
        assert (edge[:10] == 255).all() and (edge[10:, 48:] == 255).all()
        np.testing.assert_array_equal(edge[10:, :48], data[:30, 2000:])


# ---------------------------------------------------------------------------- end to end
def test_predict_image_png_cli_end_to_end(setup, tmp_path):
    d, adata, model = setup
    out, plots = tmp_path / "maps.h5ad", tmp_path / "plots"
    code = main(["predict-image", str(d / "model"), str(d / "slide.png"), "-o", str(out), "--um-per-px", "2",
                 "--num-samples", "4", "--genes", "g0", "g3", "--plot-dir", str(plots), "--quiet"])
    assert code == 0
    pred = ad.read_h5ad(out)
    assert list(pred.var_names) == model.registry.genes
    assert {"sd", "q05", "q50", "q95", "counts_mean"} <= set(pred.layers)
    assert np.all(pred.layers["q05"] <= pred.layers["q95"] + 1e-6) and np.isfinite(pred.X).all()
    lib = pred.uns["spatial"]["slide"]
    assert lib["images"]["hires"].shape[2] == 3 and 0 < lib["scalefactors"]["tissue_hires_scalef"] <= 1
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(20.0)
    assert pred.uns["image_grid"]["um_per_px_source"] == "argument"
    # the pseudo-spots land on the training grid: same positions, same features as training
    train = pd.DataFrame(adata.obsm["histology"], index=[tuple(p) for p in adata.obsm["spatial"].round(3)])
    mine = pd.DataFrame(pred.obsm["histology"], index=[tuple(p) for p in pred.obsm["spatial"].round(3)])
    common = train.index.intersection(mine.index)
    assert len(common) >= 0.9 * adata.n_obs
    np.testing.assert_allclose(mine.loc[common].to_numpy(), train.loc[common].to_numpy(), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in plots.iterdir()) == ["g0.png", "g3.png"]
    with Image.open(plots / "g0.png") as im:
        assert im.size[0] > im.size[1]  # mean and sd side by side
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sc.pl.spatial(pred, color="g0", library_id="slide", show=False)  # scanpy plots it directly


def test_predict_image_pyramidal_tiff(setup, tmp_path):
    d, _, model = setup
    img, _ = he_image()
    big = np.asarray(Image.fromarray(img).resize((1200, 1200), Image.Resampling.NEAREST))
    write_pyramid(tmp_path / "slide.ome.tif", big, um_per_px=1.0)  # 2× finer than training
    pred = predict_image(model, tmp_path / "slide.ome.tif", out=tmp_path / "p.h5ad", samples=tmp_path / "d.nc",
                         num_samples=3, progress=False)
    g = pred.uns["image_grid"]
    assert g["um_per_px"] == pytest.approx(1.0) and g["um_per_px_source"] == "file metadata"
    assert g["level"] == 1 and g["level_um_per_px"] == pytest.approx(2.0) and g["size"] == [1200, 1200]
    png = predict_image(model, d / "slide.png", um_per_px=2.0, num_samples=3, progress=False)
    assert abs(pred.n_obs - png.n_obs) <= 0.1 * png.n_obs  # same tissue, same grid
    np.testing.assert_allclose(np.median(pred.obsm["spatial"], 0), 2 * np.median(png.obsm["spatial"], 0), rtol=0.05)
    draws = sp.predictions.read_samples(tmp_path / "d.nc")
    assert draws.shape == (3, pred.n_obs, 12)
    np.testing.assert_allclose(pred.layers["draws_mean"], sp.metrics.normalize_log1p(draws.values).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_predictions_scale_the_whole_image_and_x_is_the_predictive_mean(setup, monkeypatch):
    """Every pseudo-spot's histology is scaled with the whole image's (section scaling), however
    many spots are predicted at a time, and X is the model's predict_mean (count noise
    integrated out), not the mean of a few draws. (Chunks of spots used to be scaled by their
    own statistics.)"""
    d, _, model = setup
    spots = image_features(d / "slide.png", model.registry.histology_recipe, um_per_px=2.0, progress=False)
    point = model.predict_mean(spots, num_samples=4, artifact="pass")
    encoded, encode = [], model._encode_histology
    monkeypatch.setattr(model, "_encode_histology", lambda adata, artifact: encoded.append(adata.n_obs) or encode(adata, artifact))
    whole = predict_image(model, d / "slide.png", um_per_px=2.0, num_samples=4, progress=False)
    # one minibatch in both (fewer than 256 pseudo-spots), so the same draws of the latents
    assert spots.n_obs < 256
    np.testing.assert_allclose(whole.X, point.values, rtol=1e-5, atol=1e-6)
    assert not np.allclose(whole.X, whole.layers["draws_mean"], atol=1e-3)  # 4 draws are not the mean
    chunked = predict_image(model, d / "slide.png", um_per_px=2.0, num_samples=4, chunk_spots=7, progress=False)
    assert chunked.n_obs > 7 and set(encoded) == {spots.n_obs}
    assert chunked.layers["sd"].shape == whole.layers["sd"].shape and np.isfinite(chunked.layers["sd"]).all()


def test_image_features_hex_grid_and_spacing(setup):
    d, _, model = setup
    spots = image_features(d / "slide.png", model.registry.histology_recipe, um_per_px=2.0, spacing_um=100.0,
                           grid="hex", progress=False)
    from scipy.spatial import cKDTree

    xy = spots.obsm["spatial"]
    np.testing.assert_allclose(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]), 50.0)
    assert spots.uns["histology"]["recipe"]["grid"] == "hex"


@pytest.mark.parametrize("kind, second_moment", [("square", 0.5), ("hex", 0.5)])
def test_lattice_neighbour_context_is_one_training_spacing_away(kind, second_moment):
    """On a refined grid the context still averages the pseudo-spots one training spacing away:
    for f = x² that mean is x² + s²/2 at spacing s (it would be x² + s²/8 at the refined step)."""
    s = 40.0
    for k in (1, 2, 3):
        xy, _ = spot_grid(800, 800, s / k, kind)
        f = np.stack([xy[:, 0], xy[:, 0] ** 2], axis=1)
        ctx = lattice_neighbor_mean(xy, f, s, kind)
        interior = (np.abs(xy - 400) < 300).all(1)
        np.testing.assert_allclose(ctx[interior, 0], xy[interior, 0], rtol=1e-9)
        np.testing.assert_allclose(ctx[interior, 1] - xy[interior, 0] ** 2, second_moment * s**2, rtol=1e-6)
        if k == 1:  # the training grid: the same as the training features' neighbour means
            a = ad.AnnData(obs=pd.DataFrame({"slide": "s"}, index=[str(i) for i in range(len(xy))]), obsm={"spatial": xy})
            np.testing.assert_allclose(ctx, sp.pp.features.neighbor_mean(a, f), rtol=1e-9)


def test_subdivided_grid_is_denser_with_training_size_patches(setup):
    d, _, model = setup
    recipe = model.registry.histology_recipe
    base = image_features(d / "slide.png", recipe, um_per_px=2.0, progress=False)
    fine = image_features(d / "slide.png", recipe, um_per_px=2.0, subdivide=2, progress=False)
    from scipy.spatial import cKDTree

    xy = fine.obsm["spatial"]
    np.testing.assert_allclose(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]), SPACING_PX / 2)
    assert 3 * base.n_obs <= fine.n_obs <= 5 * base.n_obs
    g = fine.uns["image_grid"]
    assert g["subdivide"] == 2 and g["pseudo_spot_spacing_um"] == pytest.approx(g["spacing_um"] / 2)
    assert g["patch_side_px"] == base.uns["image_grid"]["patch_side_px"]
    with pytest.raises(InputError, match="subdivide"):
        image_features(d / "slide.png", recipe, um_per_px=2.0, subdivide=0, progress=False)


# ---------------------------------------------------------------------------- bad input
def _bad(tmp_path: Path, setup, image: Path, *extra: str, match: str, capsys) -> None:
    d = setup[0]
    out = tmp_path / "out" / "pred.h5ad"
    before = set(tmp_path.rglob("*"))
    code = main(["predict-image", str(d / "model"), str(image), "-o", str(out), "--quiet", "--num-samples", "2", *extra])
    assert code == BAD_INPUT
    assert match in capsys.readouterr().err
    assert not out.exists() and set(tmp_path.rglob("*")) - before <= {out.parent}  # nothing (half-)written


def test_bad_images(setup, tmp_path, capsys):
    (tmp_path / "junk.png").write_text("not an image")
    _bad(tmp_path, setup, tmp_path / "junk.png", match="cannot read image", capsys=capsys)
    _bad(tmp_path, setup, tmp_path / "missing.png", match="does not exist", capsys=capsys)
    Image.fromarray(he_image()[0][..., 0]).save(tmp_path / "gray.png")
    _bad(tmp_path, setup, tmp_path / "gray.png", match="not 8-bit RGB", capsys=capsys)
    tifffile.imwrite(tmp_path / "gray16.tif", np.zeros((64, 64), np.uint16))
    _bad(tmp_path, setup, tmp_path / "gray16.tif", match="not 8-bit RGB", capsys=capsys)
    Image.fromarray(np.full((300, 300, 3), 243, np.uint8)).save(tmp_path / "blank.png")
    _bad(tmp_path, setup, tmp_path / "blank.png", "--um-per-px", "2", match="no tissue found", capsys=capsys)
    Image.fromarray(he_image()[0][:20, :20]).save(tmp_path / "tiny.png")
    _bad(tmp_path, setup, tmp_path / "tiny.png", "--um-per-px", "2", match="smaller than one patch", capsys=capsys)


def test_bad_options(setup, tmp_path, capsys):
    d = setup[0]
    png = d / "slide.png"
    _bad(tmp_path, setup, png, "--um-per-px", "5", match="2.50× off", capsys=capsys)
    _bad(tmp_path, setup, png, "--um-per-px", "0.9", match="× off", capsys=capsys)
    _bad(tmp_path, setup, png, "--um-per-px", "2", "--genes", "NOPE", "--plot-dir", str(tmp_path / "p"),
         match="NOPE", capsys=capsys)
    blank = np.zeros((600, 600), np.uint8)
    Image.fromarray(blank).save(tmp_path / "mask.png")
    _bad(tmp_path, setup, png, "--um-per-px", "2", "--tissue-mask", str(tmp_path / "mask.png"), match="no tissue",
         capsys=capsys)
    out = tmp_path / "exists.h5ad"
    out.write_text("keep me")
    code = main(["predict-image", str(d / "model"), str(png), "-o", str(out), "--quiet"])
    assert code == BAD_INPUT and out.read_text() == "keep me"


def test_model_without_recipe_is_refused(tmp_path):
    sim = sp.datasets.simulate(n_spots=60, n_genes=30, histology_dim=4, seed=0)  # vectors not from an image
    sp.pp.annotate_qc(sim, batch_key="slide")
    model = sp.SPARTHA(sim, hidden=8, y_dim=2, d_dim=2, r_dim=2, x_dim=2)
    Image.fromarray(he_image()[0]).save(tmp_path / "s.png")
    with pytest.raises(InputError, match="no feature recipe"):
        predict_image(model, tmp_path / "s.png", progress=False)


def test_help_lists_predict_image(capsys):
    assert main(["--help"]) == 0
    assert "predict-image" in capsys.readouterr().out
    assert main(["predict-image", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--um-per-px", "--spacing-um", "--spot-um", "--grid", "--tissue-mask", "--genes", "--plot-dir",
                   "--samples", "--overwrite"):
        assert option in out
