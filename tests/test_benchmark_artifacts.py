"""``benchmarks/artifacts.py`` (issue 18) on a tiny fake legacy-ST folder: the corruption keeps
the clean truth and touches only the chosen spots, its patches are spatially coherent, and a
run scores every row against the clean counts with paired statistics and plots."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from _legacy_st import legacy_st_folder

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def arte():
    sys.path.insert(0, str(BENCH))
    import artifacts

    yield artifacts
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return legacy_st_folder(tmp_path_factory.mktemp("legacy_st"), grid=(6, 5))


def _argv(folder, out, *extra):
    return ["--data", str(folder), "--cache", str(out.parent / "cache"), "--out", str(out),
            "--train-sections", "S1", "S2", "S4", "--test-sections", "S3", "--features", "stats+nbr",
            "--seeds", "0", "--jobs", "1", "--device", "cpu", "--n-hvg", "10", "--n-top-mean", "5",
            "--n-boot", "50", "--block-size", "2", *extra]


def test_patches_are_coherent_and_every_kind_is_drawn(arte):
    xy = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2).astype(float)

    def corrupted_neighbour_share(patch_share):
        kind, partner = arte.choose_spots(xy, 0.2, patch_share, np.random.default_rng(0))
        hit = kind != ""
        assert hit.sum() == 180 and set(kind[hit]) <= set(arte.KINDS)
        assert (partner[kind == "fold"] >= 0).all() and (partner[kind != "fold"] == -1).all()
        grid = hit.reshape(30, 30)
        return np.mean([grid[max(i - 1, 0): i + 2, max(j - 1, 0): j + 2].mean() for i, j in zip(*np.nonzero(grid))])

    assert corrupted_neighbour_share(1.0) > 2 * corrupted_neighbour_share(0.0)
    rng = np.random.default_rng(1)
    patch = rng.integers(60, 200, (224, 224, 3), dtype=np.uint8)
    for kind in arte.KINDS:
        out = arte.corrupt_patch(patch, kind, rng, other=patch[::-1])
        assert out.shape == patch.shape and out.dtype == np.uint8 and not np.array_equal(out, patch), kind


def test_corruption_keeps_the_clean_truth_and_touches_only_the_chosen_spots(arte, folder, tmp_path):
    args = arte.parse_args(_argv(folder, tmp_path / "r.json"))
    bargs = arte.bench_args(args)
    sections = ["S1", "S2", "S3", "S4"]
    clean = arte.bench.prepare(bargs, sections)
    images = arte.read_her2st(args.data, sections=sections).uns["spatial"]
    extractors = arte.make_extractors(arte.bench.needed_extractors(bargs), device="cpu")
    examples = []
    out = arte.corrupt(clean, images, 0.3, 0, extractors, 0.7, args.features, examples)
    hit = out.obs["corrupted"].to_numpy(bool)
    for s in sections:  # the rate holds in every section
        on = (out.obs["slide"] == s).to_numpy()
        assert hit[on].sum() == round(0.3 * on.sum())
    assert (out.layers["clean"] != clean.X).nnz == 0
    changed = np.asarray((out.X != clean.X).sum(1)).ravel() > 0
    assert not changed[~hit].any() and changed[hit].mean() > 0.9
    a, b = clean.uns["features"]["columns"]["stats"]
    moved = ~np.isclose(out.obsm["features"][:, a:b], clean.obsm["features"][:, a:b]).all(1)
    assert (moved == hit).all()
    assert {"qc_pass", "histology"} <= set(out.obs) | set(out.obsm) and examples
    assert (out.obs.loc[hit, "artifact"] != "").all() and (out.obs.loc[~hit, "artifact"] == "").all()


def test_image_qc_judges_the_corrupted_patches(arte, folder, tmp_path):
    """With ``--image-qc`` the QC reads each spot's patch metrics, the corrupted spots' from their
    corrupted patches: white-outs (bubble, detachment) always fail."""
    args = arte.parse_args(_argv(folder, tmp_path / "r.json", "--image-qc"))
    bargs = arte.bench_args(args)
    sections = ["S1", "S2", "S3", "S4"]
    clean = arte.bench.prepare(bargs, sections)
    images = arte.read_her2st(args.data, sections=sections).uns["spatial"]
    extractors = arte.make_extractors(arte.bench.needed_extractors(bargs), device="cpu")
    patch_qc = arte.clean_patch_qc(clean, images)
    out = arte.corrupt(clean, images, 0.3, 0, extractors, 0.7, args.features, None, patch_qc)
    plain = arte.corrupt(clean, images, 0.3, 0, extractors, 0.7, args.features)
    assert (out.obs["artifact"] == plain.obs["artifact"]).all()  # the same corruption
    whiteout = out.obs["artifact"].isin(["bubble", "detachment"]).to_numpy()
    assert whiteout.any() and out.obs["qc_pass_image"].to_numpy(bool)[whiteout].all()
    assert (out.obs.loc[whiteout, "qc_pass"] == "fail").all()
    assert out.uns["qc"]["image"] and not plain.uns["qc"]["image"]
    np.testing.assert_array_equal(out.obs.loc[~out.obs["corrupted"], "patch_od_mean"],
                                  patch_qc["od_mean"][~out.obs["corrupted"].to_numpy(bool)])


def test_a_run_scores_against_the_clean_truth(arte, folder, tmp_path):
    out = tmp_path / "r.json"
    plots = tmp_path / "plots"
    records = arte.main(_argv(folder, out, "--rates", "0", "0.3", "--methods", "spartha", "ridge", "mean",
                              "--validation", "none", "--epochs", "2", "--num-samples", "4", "--sample-chunk", "2",
                              "--plot-dir", str(plots)))
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    got = {(r["method"], r["rate"], r["panel"], r["metric"]): r["value"] for r in records if r["section"] == "S3"}
    for row in ("spartha", "spartha_pass", "ridge", "mean"):
        assert np.isfinite(got[(row, 0.3, "hvg", "mse_clean_corrupted")])
        assert (row, 0.0, "hvg", "mse_clean_corrupted") not in got  # nothing corrupted at rate 0
    assert got[("mean", 0.3, "hvg", "pcc_gene_clean")] == 0
    for row in ("spartha", "spartha_pass", "clean", "observed", "constant"):
        assert 0 <= got[(row, 0.3, "qc", "qcpr3")] <= 1 and np.isfinite(got[(row, 0.3, "qc", "qc_energy_distance")])
    assert got[("clean", 0.3, "qc", "qc_energy_distance")] == pytest.approx(0, abs=1e-9)  # the clean spots are the reference
    low, high = got[("spartha_vs_ridge", 0.3, "hvg", "pcc_gene_clean_diff_ci_low")], got[("spartha_vs_ridge", 0.3, "hvg", "pcc_gene_clean_diff_ci_high")]
    assert low <= got[("spartha_vs_ridge", 0.3, "hvg", "pcc_gene_clean_diff")] <= high
    assert {"qc_flagged_corrupted", "qc_flagged_clean"} <= {r["metric"] for r in records if r["method"] == "qc"}
    for name in ("artifacts_hvg.png", "artifacts_top250.png", "artifact_examples.png", "artifacts_probe.csv"):
        assert (plots / name).is_file(), name
    assert "pcc_gene_clean/spartha_pass/S3/0.3/0/hvg" in np.load(out.with_suffix(".npz"))
    # runs made separately merge into tests over all their sections (a copy of S3 as "S9": 2 sections)
    (tmp_path / "s9.json").write_text(json.dumps([dict(r, section="S9") for r in records if r["section"] == "S3"]))
    merged = arte.main(["--merge", str(out), str(tmp_path / "s9.json"), "--out", str(tmp_path / "m.json")])
    got = {(r["method"], r["rate"], r["panel"], r["metric"]): r["value"] for r in merged if r["section"] == "all"}
    assert got[("spartha_vs_ridge", 0.3, "hvg", "n_sections")] == 2
    assert got[("spartha_vs_ridge", 0.3, "hvg", "pcc_gene_clean_diff_p_value")] == pytest.approx(0.5)  # 2 equal signs of 4
    with pytest.raises(arte.sp.InputError, match="both hold the run"):  # the same run twice would be averaged
        arte.main(["--merge", str(out), str(out), "--out", str(tmp_path / "twice.json")])


def test_no_pair_of_rows_gives_no_tests(arte):
    """A run of the baselines alone has nothing to pair (it raised a KeyError before)."""
    base = {"section": "S3", "seed": 0, "rate": 0.3, "panel": "hvg", "metric": "pcc_gene_clean"}
    assert arte.section_tests([{**base, "method": "ridge", "value": 0.1}, {**base, "method": "mean", "value": 0.0}]) == []
