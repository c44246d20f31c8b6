"""The ``spartha`` command line on a tiny simulated data set: outputs and exit codes."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import spartha_pyro as sp
from spartha_pyro import demo, predictions
from spartha_pyro.cli import main

TINY_TRAIN = ["--max-epochs", "2", "--hidden", "16", "--y-dim", "4", "--d-dim", "2", "--r-dim", "2", "--x-dim", "2",
              "--batch-size", "64", "--quiet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with ``sim.h5ad``: 180 simulated spots, 40 genes, 3 slides, no QC yet."""
    path = tmp_path_factory.mktemp("cli")
    sp.datasets.simulate(n_spots=180, n_genes=40, histology_dim=8, seed=0).write_h5ad(path / "sim.h5ad")
    return path


@pytest.fixture(scope="module")
def pipeline(workdir: Path) -> Path:
    """prepare -> train (options partly from a TOML config) -> predict -> evaluate, in process."""
    d = workdir
    assert main(["prepare", str(d / "sim.h5ad"), "-o", str(d / "prep.h5ad"), "--extractor", "none", "--quiet"]) == 0
    (d / "train.toml").write_text('quiet = true\n[train]\nlabel-keys = ["cell_type"]\nsections = ["slide0", "slide1"]\n'
                                  f'out = "{d / "model"}"\n')
    assert main(["train", str(d / "prep.h5ad"), "--config", str(d / "train.toml"), *TINY_TRAIN]) == 0
    assert main(["predict", str(d / "model"), str(d / "prep.h5ad"), "--sections", "slide2", "-o", str(d / "pred.h5ad"),
                 "--samples", str(d / "draws.nc"), "--num-samples", "5", "--quiet"]) == 0
    assert main(["evaluate", str(d / "pred.h5ad"), str(d / "prep.h5ad"), "--samples", str(d / "draws.nc"),
                 "--json", str(d / "metrics.json")]) == 0
    return d


def test_prepare_annotates_qc_without_dropping(pipeline: Path):
    prep = ad.read_h5ad(pipeline / "prep.h5ad")
    assert prep.n_obs == 180
    assert {"qc_pass", "qc_pass_3mad", "qc_pass_4mad"} <= set(prep.obs)
    assert set(prep.obs["qc_pass"].astype(str)) <= {"pass", "fail"}


def test_train_uses_config_and_saves(pipeline: Path):
    model = sp.SPARTHA.load(pipeline / "model")
    assert model.registry.label_keys == ["cell_type"]
    assert model.registry.batch_categories == ["slide0", "slide1"]  # --sections from the config
    assert model.module.model.dims["z_y0"] == 4  # command-line flag
    stages = [h["stage"] for h in model.history]  # default --validation auto: epochs chosen on slide1, then a refit
    assert stages.count("validation") == 2 and model.selection["refit"]
    assert stages.count("refit") == model.selection["epochs"]


def test_predict_writes_layers_and_draws(pipeline: Path, capsys):
    pred = ad.read_h5ad(pipeline / "pred.h5ad")
    assert pred.n_obs == 60 and pred.n_vars == 40
    assert {"sd", "q05", "q50", "q95", "counts_mean"} <= set(pred.layers)
    assert np.all(pred.layers["q05"] <= pred.layers["q95"] + 1e-6)
    assert "spatial" in pred.obsm
    draws = predictions.read_samples(pipeline / "draws.nc")
    assert draws.dims == ("sample", "spot", "gene") and draws.shape == (5, 60, 40)
    np.testing.assert_allclose(pred.layers["draws_mean"], sp.metrics.normalize_log1p(draws.values).mean(0),
                               rtol=1e-4, atol=1e-5)
    # X is the API's point prediction: the count noise integrated out
    adata = sp.datasets.load(pipeline / "prep.h5ad", kind="h5ad", sections=["slide2"])
    point = sp.SPARTHA.load(pipeline / "model").predict_mean(adata, num_samples=5, artifact="pass")
    np.testing.assert_allclose(pred.X, point.values, rtol=1e-5, atol=1e-6)


def test_predict_blends_the_linear_path_unless_told_not_to(pipeline: Path):
    model = sp.SPARTHA.load(pipeline / "model")
    assert model.linear_path is not None and model.linear_path.share > 0  # chosen on slide1 by `train`
    adata = sp.datasets.load(pipeline / "prep.h5ad", kind="h5ad", sections=["slide2"])
    for flags, blended in (([], True), (["--no-linear-path"], False)):
        out = pipeline / f"posterior{len(flags)}.h5ad"
        assert main(["predict", str(pipeline / "model"), str(pipeline / "prep.h5ad"), "--sections", "slide2", "-o", str(out),
                     "--num-samples", "5", "--artifact", "posterior", "--quiet", *flags]) == 0
        pred = ad.read_h5ad(out)
        point = model.predict_mean(adata, num_samples=5, artifact="posterior", linear_path=blended)
        np.testing.assert_allclose(pred.X, point.values, rtol=1e-5, atol=1e-6)
        assert pred.uns["linear_share"] == point.attrs["linear_share"] == (model.linear_path.share if blended else 0.0)


def test_evaluate_writes_metrics(pipeline: Path):
    records = json.loads((pipeline / "metrics.json").read_text())
    metrics = {r["metric"] for r in records}
    assert {"pcc_gene", "pcc_spot", "mae", "mse", "qcpr5"} <= metrics
    assert all(r["section"] == "slide2" for r in records)


def test_yaml_config_and_flags_override(pipeline: Path):
    d = pipeline
    (d / "predict.yaml").write_text(f"predict:\n  num-samples: 7\n  out: {d / 'pred_yaml.h5ad'}\n  quiet: true\n")
    code = main(["predict", str(d / "model"), str(d / "prep.h5ad"), "--config", str(d / "predict.yaml"),
                 "--sections", "slide2", "--num-samples", "3"])
    assert code == 0
    assert ad.read_h5ad(d / "pred_yaml.h5ad").uns["prediction"]["num_samples"] == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "missing.h5ad", "-o", "m"],  # input does not exist
        ["train"],  # usage: no input, no --out
        ["predict", "no-model-here", "{d}/prep.h5ad", "-o", "{d}/x.h5ad"],  # not a model folder
        ["train", "{d}/prep.h5ad", "-o", "{d}/model"],  # model exists, no --overwrite
        ["predict", "{d}/model", "{d}/prep.h5ad", "-o", "{d}/pred.h5ad"],  # output exists, no --overwrite
        ["train", "{d}/prep.h5ad", "-o", "{d}/m2", "--label-keys", "nope"],  # obs key missing
        ["train", "{d}/prep.h5ad", "--config", "{d}/bad.toml"],  # unknown config key
        ["evaluate", "{d}/pred.h5ad", "{d}/sim.h5ad", "--samples", "{d}/missing.nc"],
    ],
)
def test_bad_input_exits_2(pipeline: Path, argv, capsys):
    (pipeline / "bad.toml").write_text("[train]\nmax-epoch = 3\nout = 'x'\n")
    assert main([a.format(d=pipeline) for a in argv]) == 2
    assert "error" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("prepare", "train", "predict", "evaluate", "demo"):
        assert command in out
    assert main(["train", "--help"]) == 0
    assert "--max-epochs" in capsys.readouterr().out


def test_other_failure_exits_1(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(demo, "report", boom)
    assert main(["demo", "--max-epochs", "1"]) == 1
    assert "simulated crash" in capsys.readouterr().err


def test_entry_point_subprocess(workdir: Path):
    exe = Path(sys.executable).with_name("spartha")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "spartha_pyro.cli"]
    out = workdir / "prep_subprocess.h5ad"
    proc = subprocess.run([*cmd, "prepare", str(workdir / "sim.h5ad"), "-o", str(out), "--extractor", "none", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "wrote" in proc.stdout


def test_predict_samples_stream_as_the_api_writes_them(pipeline: Path, monkeypatch):
    """``--samples`` is ``predict_expression(out=...)``: the same file, not a second writer
    that holds every draw in memory first."""
    import xarray as xr

    d = pipeline
    monkeypatch.setattr(predictions, "write_samples", None)  # the in-memory writer is not used
    assert main(["predict", str(d / "model"), str(d / "prep.h5ad"), "--sections", "slide2", "-o", str(d / "p2.h5ad"),
                 "--samples", str(d / "cli.nc"), "--num-samples", "4", "--seed", "3", "--batch-size", "32",
                 "--quiet"]) == 0
    adata = sp.datasets.load(d / "prep.h5ad", kind="h5ad", sections=["slide2"])
    model = sp.SPARTHA.load(d / "model")
    model.predict_expression(adata, num_samples=4, seed=3, batch_size=32, out=d / "api.nc").close()
    with xr.open_dataset(d / "cli.nc") as cli, xr.open_dataset(d / "api.nc") as api:
        xr.testing.assert_identical(cli, api)
    pred = ad.read_h5ad(d / "p2.h5ad")
    with xr.open_dataarray(d / "api.nc") as draws:
        np.testing.assert_allclose(pred.layers["draws_mean"], sp.metrics.normalize_log1p(draws.values).mean(0),
                                   rtol=1e-4, atol=1e-5)
    assert main(["predict", str(d / "model"), str(d / "prep.h5ad"), "-o", str(d / "p3.h5ad"),
                 "--samples", str(d / "draws.zarr")]) == 2


def test_refit_announced_and_refused_before_the_data_load(pipeline: Path, monkeypatch, capsys):
    d = pipeline
    argv = ["train", str(d / "prep.h5ad"), "-o", str(d / "refit"), "--sections", "slide0", "slide1", *TINY_TRAIN,
            "--max-epochs", "4", "--validation", "slide1", "--refit"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    history = sp.SPARTHA.load(d / "refit").history
    chosen = sum(h["stage"] == "refit" for h in history)
    assert (f"early stopping chose {chosen} epochs (of {len(history) - chosen} run with validation); "
            f"refit on all training spots for {chosen} epochs") in out
    assert not re.search(r"trained \d+ epochs", out)

    def no_load(*args, **kwargs):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr(sp.datasets, "load", no_load)
    assert main([*argv, "--overwrite", "--checkpoint-dir", str(d / "ckpt")]) == 2
    assert "--refit needs --validation" in capsys.readouterr().err


def test_zero_spots_are_refused(pipeline: Path, capsys):
    d = pipeline
    ad.read_h5ad(d / "prep.h5ad")[:0].copy().write_h5ad(d / "empty.h5ad")
    assert main(["predict", str(d / "model"), str(d / "empty.h5ad"), "-o", str(d / "p0.h5ad"), "--quiet"]) == 2
    assert "0 spots" in capsys.readouterr().err
    assert main(["evaluate", str(d / "empty.h5ad"), str(d / "prep.h5ad")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
