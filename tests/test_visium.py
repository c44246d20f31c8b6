"""read_visium on a tiny Space Ranger-like folder built by the test."""
import json

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from spartha_pyro import InputError
from spartha_pyro.io import read_visium
from spartha_pyro.pp.patches import iter_patches

N_SPOTS, N_GENES, FULL = 12, 7, 400  # full-resolution image is FULL × FULL px


def _write_10x_h5(file, counts: sp.csr_matrix, barcodes, genes):
    """Minimal Cell Ranger v3 h5: /matrix with CSC genes × barcodes."""
    m = counts.T.tocsc()  # genes × barcodes; columns = barcodes
    with h5py.File(file, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        fg = g.create_group("features")
        fg["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        fg["name"] = np.array(genes, dtype="S")
        fg["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        fg["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        f.attrs["library_ids"] = np.array(["lib1"], dtype="S")


@pytest.fixture
def visium_dir(tmp_path):
    rng = np.random.default_rng(0)
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = [f"AAAC{i:04d}-1" for i in range(N_SPOTS)]
    counts = sp.csr_matrix(rng.poisson(3.0, (N_SPOTS, N_GENES)))
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, [f"G{i}" for i in range(N_GENES)])
    rows, cols = np.divmod(np.arange(N_SPOTS), 4)
    px_x, px_y = 80 + 60 * cols, 80 + 60 * rows
    pd.DataFrame(
        {"barcode": barcodes, "in_tissue": 1, "array_row": rows, "array_col": cols * 2,
         "pxl_row_in_fullres": px_y, "pxl_col_in_fullres": px_x}
    ).to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    scale = {"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 50.0,
             "fiducial_diameter_fullres": 80.0}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scale))
    full = np.full((FULL, FULL, 3), 255, np.uint8)
    full[50:300, 50:300] = (150, 60, 140)  # "tissue" block under the spots
    Image.fromarray(full).save(tmp_path / "he.png")
    Image.fromarray(full[::2, ::2]).save(outs / "spatial" / "tissue_hires_image.png")
    Image.fromarray(full[::10, ::10]).save(outs / "spatial" / "tissue_lowres_image.png")
    return outs, counts


def test_read_visium_records_source_image(visium_dir, tmp_path):
    outs, counts = visium_dir
    adata = read_visium(outs, source_image_path=tmp_path / "he.png")
    assert adata.shape == (N_SPOTS, N_GENES)
    assert np.array_equal(adata.X.toarray(), counts.toarray())
    lib = adata.obs["slide"].iloc[0]
    meta = adata.uns["spatial"][lib]["metadata"]
    assert meta["source_image_path"] == str((tmp_path / "he.png").resolve())
    assert meta["microns_per_pixel"] == pytest.approx(55.0 / 50.0)
    assert adata.uns["spatial"][lib]["images"]["lowres"].shape[:2] == (40, 40)
    assert adata.obs["has_image"].all()
    assert adata.obsm["spatial"][:, 0].min() == 80
    idx, patches = next(iter_patches(adata, patch_size=32, batch_size=N_SPOTS))
    assert patches.shape == (N_SPOTS, 32, 32, 3)
    assert (patches[:, 16, 16] == (150, 60, 140)).all()  # centred on the tissue block


def test_read_visium_without_source_image(visium_dir):
    outs, _ = visium_dir
    adata = read_visium(outs)
    lib = adata.obs["slide"].iloc[0]
    assert "source_image_path" not in adata.uns["spatial"][lib]["metadata"]
    assert not adata.obs["has_image"].any()


def test_read_visium_errors(visium_dir, tmp_path):
    outs, _ = visium_dir
    with pytest.raises(InputError, match="missing.jpg"):
        read_visium(outs, source_image_path=tmp_path / "missing.jpg")
    Image.new("RGB", (100, 100), "white").save(tmp_path / "small.png")
    with pytest.raises(InputError, match="outside source image"):
        read_visium(outs, source_image_path=tmp_path / "small.png")
    (outs / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match="scalefactors_json.json"):
        read_visium(outs)
