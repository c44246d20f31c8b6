"""``benchmarks/her2st.py`` on a tiny fake legacy-ST folder that has nothing but counts, spot
files and images: no ``genes/hist2st_785.txt``, no clusters, no deconvolution, mouse gene
names, and one section whose table lacks genes the others have."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import spartha_pyro as sp

from _legacy_st import GENES, NOT_IN_S3, legacy_st_folder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import her2st

    yield her2st
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return legacy_st_folder(tmp_path_factory.mktemp("legacy_st"))


def _argv(folder, out, *extra):
    return [
        "--data", str(folder), "--cache", str(out.parent / "cache"), "--out", str(out),
        "--train-sections", "S1", "S2", "S4", "--test-sections", "S3", "--features", "stats",
        "--methods", "ridge", "mean", "--seeds", "0", "--jobs", "1", "--device", "cpu",
        "--n-hvg", "10", "--n-top-mean", "5", "--calib-samples", "4",
        "--paired-reference", "ridge", "--n-boot", "50", "--block-size", "2", *extra,
    ]


def test_loso_on_a_barelegacy_st_folder(bench, folder, tmp_path):
    out = tmp_path / "r.json"
    records = bench.main(_argv(folder, out, "--loso"))
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    got = {(r["method"], r["section"], r["panel"], r["metric"]): r["value"] for r in records}
    panels = {r["panel"] for r in records if r["metric"] == "pcc_gene"}
    assert panels == {"all", "hvg", "top250"}  # no hist2st_785 file, no such panel
    for s in ("S1", "S2", "S3", "S4"):
        assert np.isfinite(got[("ridge", s, "hvg", "pcc_gene")]) and got[("mean", s, "hvg", "pcc_gene")] == 0
        low, high = got[("ridge_vs_mean", s, "hvg", "pcc_gene_diff_ci_low")], got[("ridge_vs_mean", s, "hvg", "pcc_gene_diff_ci_high")]
        assert low <= got[("ridge_vs_mean", s, "hvg", "pcc_gene_diff")] <= high
    # a sign-flip test over the four held-out sections (p is a multiple of 1/16)
    p = got[("ridge_vs_mean", "all", "hvg", "pcc_gene_diff_p_value")]
    assert round(16 * p, 6) == int(round(16 * p)) and got[("ridge_vs_mean", "all", "hvg", "n_sections")] == 4
    # per-gene scores beside the JSON; the universe of a split is its training tables' genes:
    # held out, S3 is scored on the genes it lacks (zero there); training on S3 drops them
    scores = np.load(out.with_suffix(".npz"))
    assert set(NOT_IN_S3) <= set(scores["genes/ridge/S3/0"]) and len(scores["pcc_gene/ridge/S3/0"]) == len(GENES)
    assert not set(NOT_IN_S3) & set(scores["genes/ridge/S1/0"])
    assert scores["pcc_spot/ridge/S1/0/hvg"].shape == scores["spots/S1"].shape
    assert "pred/ridge/S1/0" not in scores


def test_spartha_runs_without_cluster_labels(bench, folder, tmp_path, capsys):
    """``--label-keys cluster`` on a folder without clusters: a note, and SPARTHA
    trains with no label set and is scored like any other row. ``--image-qc`` re-annotates the
    QC label with the patches judged too."""
    argv = _argv(folder, tmp_path / "r.json", "--epochs", "2", "--validation", "none", "--num-samples", "4",
                 "--sample-chunk", "2", "--image-qc", "--label-keys", "cluster")
    argv[argv.index("--methods") + 1 : argv.index("--seeds")] = ["spartha", "ridge"]
    records = bench.main(argv)
    printed = capsys.readouterr().out
    assert "label columns ['cluster'] are absent" in printed and "for their patch)" in printed
    got = {(r["method"], r["panel"], r["metric"]): r["value"] for r in records if r["section"] == "S3"}
    assert np.isfinite(got[("spartha", "hvg", "pcc_gene")]) and np.isfinite(got[("spartha", "qc", "qc_energy_distance")])


def test_image_qc_reads_the_patch_metrics_a_cache_predates(bench, folder, tmp_path):
    args = bench.parse_args(_argv(folder, tmp_path / "r.json", "--image-qc"))
    sections = ["S1", "S2", "S3", "S4"]
    adata = bench.prepare(args, sections)
    fresh = adata.obs[["patch_log_sharpness", "patch_od_mean"]].copy()
    old = adata.copy()
    old.obs = old.obs.drop(columns=["patch_log_sharpness", "patch_od_mean"])  # as made before image QC
    bench.image_qc(args, old, sections)
    np.testing.assert_allclose(old.obs[fresh.columns].to_numpy(), fresh.to_numpy())
    assert old.uns["qc"]["image"] and "qc_pass_image" in old.obs


def test_missing_inputs_fail_before_feature_extraction(bench, folder, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "images" / "S3.jpg").unlink()
    (bare / "spots" / "S2_selection.tsv").unlink()
    with pytest.raises(sp.InputError, match=r"spots/S2_selection.tsv.*images/S3.jpg"):
        bench.main(_argv(bare, tmp_path / "r.json"))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(sp.InputError, match="--features"):
        bench.main(_argv(folder, tmp_path / "r.json", "--features", "stats+hog"))


def test_a_prepared_h5ad_gives_the_same_records_as_its_folder(bench, folder, tmp_path):
    """``--data x.h5ad`` (e.g. Space Ranger sections read by ``spartha prepare``): histology in
    ``obsm["histology"]``, no QC column; ridge scores exactly as on the folder it came from."""
    from_folder = bench.main(_argv(folder, tmp_path / "a.json"))
    adata = bench.prepare(bench.parse_args(_argv(folder, tmp_path / "a.json")), ["S1", "S2", "S3", "S4"])
    adata.obsm["histology"] = bench.select_features(adata, "stats")
    for key in ("features", "patches"):
        del adata.obsm[key]
    del adata.uns["features"]
    adata.obs = adata.obs.drop(columns=["qc_pass"])
    adata.write_h5ad(tmp_path / "prepared.h5ad")
    from_h5ad = bench.main(_argv(tmp_path / "prepared.h5ad", tmp_path / "b.json"))

    def scores(records):
        return {(r["method"], r["panel"], r["metric"]): r["value"] for r in records if r["section"] == "S3" and r["metric"] == "pcc_gene"}

    assert scores(from_h5ad) == pytest.approx(scores(from_folder)) and scores(from_h5ad)
    with pytest.raises(sp.InputError, match="sections \\['S9'\\]"):
        bench.main(_argv(tmp_path / "prepared.h5ad", tmp_path / "c.json", "--test-sections", "S9"))
    del adata.obsm["histology"]
    adata.write_h5ad(tmp_path / "bare.h5ad")
    with pytest.raises(sp.InputError, match="obsm\\['histology'\\]"):
        bench.main(_argv(tmp_path / "bare.h5ad", tmp_path / "d.json"))
