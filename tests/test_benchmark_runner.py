"""``benchmarks/her2st.py`` runs its (method × seed) runs in parallel processes with the same
results as one after the other (simulated sections; no files from ``../shared``)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import spartha_pyro as sp

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # spawned workers inherit sys.path, so they can unpickle her2st.run_task
    import her2st

    yield her2st
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    """Four simulated sections shaped like the prepared her2st AnnData, and a data folder
    holding a ``genes/hist2st_785.txt`` panel."""
    adata = sp.datasets.simulate(n_spots=400, n_genes=60, histology_dim=16, n_slides=4, seed=0)
    sp.pp.annotate_qc(adata, batch_key="slide")
    adata.obs["cluster"] = adata.obs["cell_type"]
    adata.obs["array_x"], adata.obs["array_y"] = adata.obsm["spatial"][:, 0], adata.obsm["spatial"][:, 1]
    data = tmp_path_factory.mktemp("her2st")
    (data / "genes").mkdir()
    (data / "genes" / "hist2st_785.txt").write_text("\n".join(adata.var_names[::3]))
    return adata, data


def test_parallel_runs_match_serial(bench, sections, tmp_path):
    adata, data = sections
    slides = sorted(adata.obs["slide"].unique())
    args = bench.parse_args([
        "--data", str(data), "--train-sections", *slides[:3], "--test-sections", slides[3],
        "--epochs", "2", "--n-hvg", "20", "--n-top-mean", "10", "--num-samples", "4",
        "--calib-samples", "4", "--sample-chunk", "2", "--batch-size", "64",
        "--model-kwargs", '{"hidden": 16, "y_dim": 4, "d_dim": 2, "r_dim": 2, "x_dim": 2}',
        "--device", "cpu", "--out", str(tmp_path / "r.json"),
    ])
    methods = ("spartha", "ridge", "observed", "constant")
    tasks = [(tuple(slides[:3]), slides[3], None, method, seed) for method in methods for seed in (0, 1)]
    serial = list(bench.run_tasks(tasks, (adata, None, args), jobs=1))
    parallel = list(bench.run_tasks(tasks, (adata, None, args), jobs=2))

    def values(results):
        return {
            (r["method"], r["seed"], r["panel"], r["metric"]): r["value"] for rows, *_ in results for r in rows
        }

    a, b = values(serial), values(parallel)
    assert a.keys() == b.keys() and {m for m, *_ in a} == {"spartha", "spartha_pass", "ridge", "observed", "constant"}
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=1e-5, atol=1e-6)
    assert sum(p is not None for _, p, _ in parallel) == 2  # SPARTHA's probe matrix, one per seed

    # QC references beside the generators: the real spots scored against their own MADs; the
    # fidelity score is recorded for every generator (not for the real spots themselves), and
    # the simulated MT- genes are kept in the modelled genes, so the MT criterion is on
    assert 0 < a[("observed", 0, "qc", "qcpr5")] <= 1 and ("observed", 0, "qc", "qc_energy_distance") not in a
    for row in ("spartha", "spartha_pass", "constant"):
        assert a[(row, 0, "qc", "qc_energy_distance")] >= 0 and a[(row, 0, "qc", "qc_n_mt_genes")] > 0

    # paired statistics: a block-bootstrap CI per panel around the PCC difference (one section: no test over sections)
    records = [r for rows, *_ in serial for r in rows]
    paired = bench.paired_statistics([s for *_, s in serial], records, adata, [(slides[:3], slides[3])], args)
    got = {(r["method"], r["seed"], r["panel"], r["metric"]): r["value"] for r in paired}
    for panel in ("hvg", "top250", "hist2st_785"):
        key = ("spartha_vs_ridge", 0, panel)
        assert got[(*key, "pcc_gene_diff_ci_low")] <= got[(*key, "pcc_gene_diff")] <= got[(*key, "pcc_gene_diff_ci_high")]
        diff = a[("spartha", 0, panel, "pcc_gene")] - a[("ridge", 0, panel, "pcc_gene")]
        assert got[(*key, "pcc_gene_diff")] == pytest.approx(diff, abs=1e-6)
    assert ("spartha_vs_constant", 1, "qc", "qcpr3_diff") in got
    assert not any(r["section"] == "all" for r in paired)


def test_also_sampled_scores_the_other_point_statistic_of_the_same_model(bench, sections, tmp_path):
    adata, data = sections
    slides = sorted(adata.obs["slide"].unique())
    args = bench.parse_args([
        "--data", str(data), "--train-sections", *slides[:3], "--test-sections", slides[3],
        "--epochs", "2", "--n-hvg", "20", "--n-top-mean", "10", "--num-samples", "4", "--calib-samples", "4",
        "--sample-chunk", "2", "--model-kwargs", '{"hidden": 16, "y_dim": 4, "d_dim": 2, "r_dim": 2, "x_dim": 2}',
        "--device", "cpu", "--also-sampled", "--out", str(tmp_path / "r.json"),
    ])
    (rows, *_), = bench.run_tasks([(tuple(slides[:3]), slides[3], None, "spartha", 0)], (adata, None, args), jobs=1)
    got = {(r["method"], r["panel"], r["metric"]): r["value"] for r in rows}
    assert {m for m, *_ in got} == {"spartha", "spartha_pass", "spartha_sampled"}
    expected, sampled = got[("spartha", "hvg", "pcc_gene")], got[("spartha_sampled", "hvg", "pcc_gene")]
    assert np.isfinite([expected, sampled]).all() and expected != sampled


def test_transductive_training_sees_the_target_histology_and_nothing_else(bench, sections):
    adata, _ = sections
    train, test = adata[adata.obs["slide"] != "slide3"].copy(), adata[adata.obs["slide"] == "slide3"].copy()
    combined = bench.with_target_histology(train, test)
    target = (combined.obs["slide"] == "slide3").to_numpy()
    assert target.sum() == test.n_obs and not combined.obs["has_counts"][target].any()
    assert combined[target].X.sum() == 0 and combined.obs.loc[target, ["qc_pass", "cluster"]].isna().all().all()
    np.testing.assert_array_equal(combined.obsm["histology"][target], test.obsm["histology"])
    assert combined.obs["has_counts"][~target].all() and set(combined.obs.loc[~target, "qc_pass"]) <= {"pass", "fail"}


def test_n_jobs(bench):
    assert bench.n_jobs(0, "cpu", 100) >= 1
    assert bench.n_jobs(0, "cuda", 100) == 1
    assert bench.n_jobs(8, "cpu", 3) == 3
    with pytest.raises(sp.InputError, match="--jobs"):
        bench.n_jobs(-1, "cpu", 3)


def test_chosen_records_what_the_validation_stage_decided(bench):
    """Every choice the library made on training data reaches the records as numbers."""
    from types import SimpleNamespace

    selection = {
        "epochs": 23, "val_pcc_gene": 0.05, "message": "…",
        "unimaged": {"used": False, "scores": {"ignore": 0.055, "use": 0.054}},
        "label_sets": {"used": ["cluster"], "left_out": ["pathology"], "scores": {"cluster+pathology": 0.05, "cluster": 0.06, "pathology": 0.04}},
        "linear_path": {"share": 0.5, "scores": {"0.0": 0.05, "0.5": 0.07, "1.0": 0.06}, "message": "…"},
    }
    out = bench.chosen(SimpleNamespace(selection=selection))
    assert out == {
        "epochs": 23.0, "val_pcc_gene": 0.05, "unimaged_used": 0.0, "unimaged_score_ignore": 0.055,
        "unimaged_score_use": 0.054, "label_sets_left_out": 1.0, "label_sets_score_cluster+pathology": 0.05,
        "label_sets_score_cluster": 0.06, "label_sets_score_pathology": 0.04,
        "linear_share": 0.5, "linear_score_0.0": 0.05, "linear_score_0.5": 0.07, "linear_score_1.0": 0.06,
    }
    assert bench.chosen(SimpleNamespace(selection=None)) == {}


def test_paired_pairs_only_the_seeds_asked_for(tmp_path):
    """``benchmarks/paired.py --seeds``: a method run with more seeds than the other is compared on the shared ones."""
    sys.path.insert(0, str(BENCH))
    try:
        import paired
    finally:
        sys.path.remove(str(BENCH))
    rec = lambda m, s, seed, v: {"method": m, "section": s, "seed": seed, "panel": "hvg", "metric": "pcc_gene", "value": v}
    records = [rec("a", s, 0, 0.2) for s in "PQ"] + [rec("a", s, 1, 0.6) for s in "PQ"] + [rec("b", s, 0, 0.1) for s in "PQ"]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(records))
    assert paired.main([str(f), "--a", "a", "--b", "b"])[0]["diffs"] == pytest.approx([0.3, 0.3])  # a over both seeds
    assert paired.main([str(f), "--a", "a", "--b", "b", "--seeds", "0"])[0]["diffs"] == pytest.approx([0.1, 0.1])
    paired.main([str(f), "--a", "a", "--b", "b", "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 0
    # another file with a run of "a" under the same seed: refused, unless only "b" is taken from it
    g = tmp_path / "other.json"
    g.write_text(json.dumps([rec("a", s, 0, 0.9) for s in "PQ"] + [rec("b", s, 1, 0.3) for s in "PQ"]))
    with pytest.raises(SystemExit, match="a P seed 0 is in"):
        paired.main([str(f), str(g), "--a", "a", "--b", "b"])
    assert paired.main([str(f), f"{g}:b", "--a", "a", "--b", "b"])[0]["diffs"] == pytest.approx([0.2, 0.2])
    with pytest.raises(SystemExit, match=r"\['c'\] are not in"):  # a mistyped method is not an empty selection
        paired.main([str(f), f"{g}:b,c", "--a", "a", "--b", "b"])
