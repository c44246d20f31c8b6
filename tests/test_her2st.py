"""read_her2st on the real data in ../shared/data/her2st (skipped when absent)."""
import gzip
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spartha_pyro import InputError
from spartha_pyro.datasets import her2st, read_her2st
from spartha_pyro.pp.patches import annotate_patches, iter_patches

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"
pytestmark = pytest.mark.skipif(not (DATA / "counts").is_dir(), reason=f"her2st data not at {DATA}")


@pytest.fixture(scope="module")
def adata():
    # C5: full-resolution image; A1: lowres PNG + pathology; D2: counts only
    return read_her2st(DATA, sections=["C5", "A1", "D2"], image_downscale=500)


def _small_copy(tmp_path, section="C5", n_spots=12, image=True):
    """A tiny her2st folder: the first spots of one section, optionally with its image."""
    for sub in ("counts", "spots", "images"):
        (tmp_path / sub).mkdir(parents=True)
    with gzip.open(DATA / "counts" / f"{section}.tsv.gz", "rt") as src, gzip.open(
        tmp_path / "counts" / f"{section}.tsv.gz", "wt"
    ) as dst:
        for _, line in zip(range(n_spots + 1), src):
            dst.write(line)
    shutil.copy(DATA / "spots" / f"{section}_selection.tsv", tmp_path / "spots")
    if image:
        (tmp_path / "images" / f"{section}.jpg").symlink_to(DATA / "images" / f"{section}.jpg")
    return tmp_path


def test_shapes_counts_and_coordinates(adata):
    n = adata.obs["slide"].value_counts()
    assert n["A1"] == 346 and n["C5"] == 181 and n["D2"] > 100
    assert 11_000 < adata.n_vars < 15_000
    assert adata.X.format == "csr"
    data = adata.X.data
    assert np.array_equal(data, np.round(data)) and (data >= 0).all()
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["spatial"]).all()
    # every counted spot joined its selected coordinates (none dropped for these sections)
    for s, rep in adata.uns["her2st"]["unjoined"].items():
        assert rep["counts_without_coordinates"] == 0, s
    sel = pd.read_csv(DATA / "spots" / "C5_selection.tsv", sep="\t")
    sel.index = "C5_" + sel["x"].astype(str) + "x" + sel["y"].astype(str)
    c5 = adata.obs_names[adata.obs["slide"] == "C5"]
    np.testing.assert_allclose(
        adata[c5].obsm["spatial"], sel.loc[c5, ["pixel_x", "pixel_y"]].to_numpy()
    )


def test_labels(adata):
    cl = adata.obs["cluster"].dropna().astype(str)
    patients = adata.obs.loc[cl.index, "patient"].astype(str)
    assert all(c.startswith(p + "_") for c, p in zip(cl, patients))
    assert adata.obs.loc[adata.obs["slide"] == "A1", "pathology"].notna().all()
    assert adata.obs.loc[adata.obs["slide"] == "C5", "pathology"].isna().all()
    major = adata.obsm["deconv_major"]
    assert list(major.index) == list(adata.obs_names)
    assert np.allclose(major.dropna().sum(axis=1), 1.0, atol=1e-3)


def test_images_and_counts_only_sections(adata):
    has = adata.obs.groupby("slide", observed=True)["has_image"].all().to_dict()
    assert has == {"C5": True, "A1": True, "D2": False}
    assert set(adata.uns["spatial"]) == {"C5", "A1"}
    for s, entry in adata.uns["spatial"].items():
        img = entry["images"]["lowres"]
        assert img.dtype == np.uint8 and max(img.shape[:2]) <= 500
        assert Path(entry["metadata"]["source_image_path"]).is_absolute()
        assert 140 < entry["scalefactors"]["spot_diameter_fullres"] < 150
        # lowres spot positions land inside the lowres image
        xy = adata[adata.obs["slide"] == s].obsm["spatial"] * entry["scalefactors"]["tissue_lowres_scalef"]
        assert (xy >= 0).all() and (xy[:, 0] < img.shape[1]).all() and (xy[:, 1] < img.shape[0]).all()
    assert entry["metadata"]["source_image_scalef"] == pytest.approx(2000 / 6954)  # A1 last


def test_patches_are_centred_on_tissue(adata):
    c5 = adata[adata.obs["slide"] == "C5"][:16].copy()
    idx, patches = next(iter_patches(c5, batch_size=16))
    assert patches.shape == (16, 224, 224, 3) and patches.dtype == np.uint8
    # a background crop: the image corner, far from the tissue
    from spartha_pyro.io._images import load_rgb

    corner = load_rgb(c5.uns["spatial"]["C5"]["metadata"]["source_image_path"], "C5", max_px=None)[0][:224, :224]
    assert patches.mean() < corner.mean() - 20
    annotate_patches(c5)
    assert not c5.obs["patch_outside"].any()
    assert (c5.obs["patch_tissue_fraction"] > 0.5).all()


def test_join_outer_and_gene_warning():
    inner = read_her2st(DATA, sections=["C5", "B4"], deconvolution=(), image_downscale=200)
    outer = read_her2st(DATA, sections=["C5", "B4"], join="outer", deconvolution=(), image_downscale=200)
    assert outer.n_vars > inner.n_vars
    assert set(inner.var_names) <= set(outer.var_names)
    assert outer.X.sum() >= inner.X.sum()
    assert inner.varm["measured"].to_numpy().all()
    measured = outer.varm["measured"]
    assert list(measured.columns) == ["C5", "B4"] and measured.loc[inner.var_names].to_numpy().all()
    for s in ("C5", "B4"):  # a gene the section did not report has no counts there
        rows = (outer.obs["slide"] == s).to_numpy()
        assert outer[rows][:, ~measured[s].to_numpy()].X.nnz == 0 and not measured[s].all()


def test_low_gene_overlap_warns(tmp_path):
    root = _small_copy(tmp_path, "C5", image=False)
    shutil.copy(DATA / "spots" / "B4_selection.tsv", root / "spots")
    with gzip.open(DATA / "counts" / "B4.tsv.gz", "rt") as src, gzip.open(root / "counts" / "B4.tsv.gz", "wt") as dst:
        for _, line in zip(range(6), src):
            fields = line.rstrip("\n").split("\t")
            dst.write("\t".join(fields[:1] + fields[1:4000]) + "\n")  # keep ~25% of the genes
    with pytest.warns(UserWarning, match="'B4'.*join="):
        read_her2st(root)


def test_bad_inputs_name_file_and_section(tmp_path):
    # a section without an image file loads counts only
    root = _small_copy(tmp_path / "a", image=False)
    ad = read_her2st(root)
    assert not ad.obs["has_image"].any()
    # unreadable JPEG
    root = _small_copy(tmp_path / "b", image=False)
    (root / "images" / "C5.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match=r"'C5'.*C5\.jpg"):
        read_her2st(root)
    # spots outside the image (scale mismatch)
    root = _small_copy(tmp_path / "c", image=False)
    from PIL import Image

    Image.new("RGB", (500, 500), "white").save(root / "images" / "C5.jpg")
    with pytest.raises(InputError, match=r"'C5'.*outside image"):
        read_her2st(root)
    # non-integer counts
    root = _small_copy(tmp_path / "d", image=False)
    file = root / "counts" / "C5.tsv.gz"
    lines = gzip.open(file, "rt").read().splitlines()
    head, first = lines[0], lines[1].split("\t")
    first[1] = "0.5"
    gzip.open(file, "wt").write("\n".join([head, "\t".join(first), *lines[2:]]) + "\n")
    with pytest.raises(InputError, match=r"'C5'.*C5\.tsv\.gz.*integer"):
        read_her2st(root)
    # duplicate spot names
    gzip.open(file, "wt").write("\n".join([head, lines[1], lines[1], *lines[2:]]) + "\n")
    with pytest.raises(InputError, match=r"duplicate spot"):
        read_her2st(root)
    # counts and coordinates that do not join
    gzip.open(file, "wt").write("\n".join([head] + ["99x99" + l[l.index("\t"):] for l in lines[1:2]]) + "\n")
    with pytest.raises(InputError, match=r"'C5'.*does not join|no spot"):
        read_her2st(root)


def test_download_error_names_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(InputError, match="path="):
        her2st(sections=["C5"], cache_dir=tmp_path)
    assert her2st(path=_small_copy(tmp_path / "x", image=False)).n_obs == 12  # local path: no download
