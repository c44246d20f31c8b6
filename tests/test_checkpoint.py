"""Training checkpoints: a run killed at any moment and resumed ends where an uninterrupted run ends."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import spartha_pyro as sp
from spartha_pyro import InputError
from spartha_pyro.checkpoint import checkpoint_files

EPOCHS = 4

# One training run: python -c SCRIPT CHECKPOINT_DIR MODEL_DIR [resume]. torch's global seed
# is random per process and initialises the module, so the script fixes it.
SCRIPT = textwrap.dedent(
    f"""
    import sys
    import torch
    import spartha_pyro as sp

    torch.manual_seed(0)
    torch.set_num_threads(1)

    adata = sp.datasets.simulate(n_spots=200, n_genes=40, histology_dim=8, seed=0)
    sp.pp.annotate_qc(adata, batch_key="slide")
    model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", hidden=16, y_dim=4, d_dim=2, r_dim=2, x_dim=2)
    model.train(max_epochs={EPOCHS}, batch_size=100, validation=0.2, patience=50, progress=False, seed=3,
                checkpoint_dir=sys.argv[1], checkpoint_every=1, keep_checkpoints=2, resume=len(sys.argv) > 3)
    model.save(sys.argv[2])
    """
)


def _train(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *map(str, args)], stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    whole = _train(tmp_path / "ckpt_whole", tmp_path / "whole")
    killed = _train(tmp_path / "ckpt", tmp_path / "killed")
    deadline = time.monotonic() + 90
    while len(checkpoint_files(tmp_path / "ckpt")) < 2:
        assert killed.poll() is None and time.monotonic() < deadline, "training ended before its second checkpoint"
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed").exists()
    resumed = _train(tmp_path / "ckpt", tmp_path / "resumed", "resume")
    _finish(whole)
    _finish(resumed)

    adata = sp.datasets.simulate(n_spots=200, n_genes=40, histology_dim=8, seed=0)
    a, b = sp.SPARTHA.load(tmp_path / "whole"), sp.SPARTHA.load(tmp_path / "resumed")
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history])
    assert len(b.history) == EPOCHS
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert all(np.allclose(state_a[k], state_b[k]) for k in state_a)
    pred_a = a.predict_expression(adata, num_samples=3, seed=0, value="mean").values
    pred_b = b.predict_expression(adata, num_samples=3, seed=0, value="mean").values
    assert np.isfinite(pred_a).all() and np.allclose(pred_a, pred_b)
    assert [p.name for p in checkpoint_files(tmp_path / "ckpt")] == [f"ckpt-{EPOCHS - 1:06d}.pt", f"ckpt-{EPOCHS - 2:06d}.pt"]


@pytest.fixture(scope="module")
def small():
    adata = sp.datasets.simulate(n_spots=120, n_genes=20, histology_dim=4, seed=1)
    sp.pp.annotate_qc(adata, batch_key="slide")
    return adata


def _model(adata):
    return sp.SPARTHA(adata, hidden=8, y_dim=2, d_dim=2, r_dim=2, x_dim=2)


def test_keep_last_k_and_resume_rules(small, tmp_path):
    model = _model(small)
    model.train(max_epochs=5, batch_size=64, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=1, validation=None)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["ckpt-000003.pt"]
    (tmp_path / ".ckpt-000004.pt.x1y2.pt").write_bytes(b"half a checkpoint")  # a write killed mid-way
    model.train(max_epochs=6, batch_size=64, progress=False, checkpoint_dir=tmp_path, keep_checkpoints=2, resume=True, validation=None)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["ckpt-000005.pt", "ckpt-000004.pt"]
    assert not list(tmp_path.glob(".ckpt-*"))
    with pytest.raises(InputError, match="earlier run"):
        _model(small).train(max_epochs=2, progress=False, checkpoint_dir=tmp_path, validation=None)
    with pytest.raises(InputError, match="other settings: batch_size"):
        _model(small).train(max_epochs=8, batch_size=32, progress=False, checkpoint_dir=tmp_path, resume=True, validation=None)
    with pytest.raises(InputError, match="other training spots"):
        _model(small).train(max_epochs=8, batch_size=64, progress=False, checkpoint_dir=tmp_path, resume=True, validation=0.2)
    with pytest.raises(InputError, match="needs checkpoint_dir"):
        _model(small).train(max_epochs=2, progress=False, resume=True, validation=None)
    with pytest.raises(InputError, match="does not fit this model"):
        sp.SPARTHA(small, hidden=12, y_dim=2, d_dim=2, r_dim=2, x_dim=2).train(
            max_epochs=8, batch_size=64, progress=False, checkpoint_dir=tmp_path, resume=True, validation=None
        )
    # resuming into an empty folder starts afresh
    assert len(_model(small).train(max_epochs=1, progress=False, checkpoint_dir=tmp_path / "new", resume=True, validation=None)) == 1


def test_truncated_files_are_named(small, tmp_path):
    model = _model(small)
    model.train(max_epochs=2, batch_size=64, progress=False, checkpoint_dir=tmp_path / "ckpt", validation=None)
    newest, older = checkpoint_files(tmp_path / "ckpt")
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=newest.name):  # the latest complete one is used
        history = _model(small).train(max_epochs=2, batch_size=64, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True, validation=None)
    assert len(history) == 2
    for path in checkpoint_files(tmp_path / "ckpt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="ckpt-000001.pt.*ckpt-000000.pt"), pytest.warns(UserWarning):
        _model(small).train(max_epochs=3, batch_size=64, progress=False, checkpoint_dir=tmp_path / "ckpt", resume=True, validation=None)

    model.save(tmp_path / "model")
    weights = tmp_path / "model" / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(InputError, match=r"model\.pt"):
        sp.SPARTHA.load(tmp_path / "model")


def test_cli_checkpoint_flags(small, tmp_path):
    from spartha_pyro.cli import main

    data = tmp_path / "data.h5ad"
    sp.io.write_h5ad(small, data)
    common = ["train", str(data), "--quiet", "--batch-size", "64", "--hidden", "8", "--y-dim", "2", "--d-dim", "2",
              "--r-dim", "2", "--x-dim", "2", "--checkpoint-dir", str(tmp_path / "ckpt")]
    main([*common, "-o", str(tmp_path / "m1"), "--max-epochs", "1"])
    main([*common, "-o", str(tmp_path / "m2"), "--max-epochs", "2", "--resume"])
    assert [p.name for p in checkpoint_files(tmp_path / "ckpt")] == ["ckpt-000001.pt", "ckpt-000000.pt"]
    assert len(sp.SPARTHA.load(tmp_path / "m2").history) == 2


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_settings(path, **changes):
    settings = json.loads(path.read_text())
    path.write_text(json.dumps({**settings, **changes}))


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    model = _model(small)
    model.train(max_epochs=1, batch_size=64, progress=False, validation=None)
    folder = tmp_path_factory.mktemp("saved")
    model.save(folder / "model")
    sp.SPARTHA(small, hidden=12, y_dim=2, d_dim=2, r_dim=2, x_dim=2).save(folder / "other")
    return folder


@pytest.mark.parametrize(
    "fault, file, message",
    [
        (lambda d: _truncate(d / "model.pt"), "model.pt", "truncated"),
        (lambda d: (d / "model.pt").write_bytes(b"\0" * 64), "model.pt", "corrupt"),
        (lambda d: (d / "model.pt").unlink(), "model.pt", "does not exist"),
        (lambda d: shutil.copy(d.parent / "other" / "model.pt", d / "model.pt"), "model.pt", "not this model's"),
        (lambda d: _truncate(d / "settings.json"), "settings.json", "corrupt"),
        (lambda d: (d / "settings.json").write_bytes(b"\xff\xfe\0"), "settings.json", "corrupt"),
        (lambda d: (d / "settings.json").write_text("[]"), "settings.json", "not a JSON object"),
        (lambda d: (d / "settings.json").write_text("{}"), "settings.json", "corrupt: KeyError"),
        (lambda d: _edit_settings(d / "settings.json", registry={"genes": 3}), "settings.json", "corrupt"),
        (lambda d: _edit_settings(d / "settings.json", format_version=99), "settings.json", "format 99"),
    ],
)
def test_load_faults_name_the_file(saved, tmp_path, fault, file, message):
    folder = tmp_path / "model"
    shutil.copytree(saved / "model", folder)
    shutil.copytree(saved / "other", tmp_path / "other")
    fault(folder)
    with pytest.raises(InputError, match=rf"{file}.*{message}"):
        sp.SPARTHA.load(folder)


def test_load_with_mismatched_adata(saved, small):
    with pytest.raises(InputError, match="gene"):
        sp.SPARTHA.load(saved / "model", adata=small[:, :10].copy())
    wide = small.copy()
    wide.obsm["histology"] = np.hstack([wide.obsm["histology"], wide.obsm["histology"]])
    with pytest.raises(InputError, match="histology"):
        sp.SPARTHA.load(saved / "model", adata=wide)
    assert sp.SPARTHA.load(saved / "model", adata=small).is_trained


def test_loaded_model_trains_further(saved, small):
    """A model loaded with its training AnnData trains on (it had no setup arguments before)."""
    model = sp.SPARTHA.load(saved / "model", adata=small)
    before = len(model.history)
    model.train(max_epochs=1, validation=None, progress=False)
    assert len(model.history) == before + 1 and np.isfinite(model.history[-1]["loss"])


def test_prediction_file_needs_overwrite(saved, small, tmp_path):
    model = sp.SPARTHA.load(saved / "model")
    out = tmp_path / "pred.nc"
    first = model.predict_expression(small, num_samples=2, out=out).values
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.predict_expression(small, num_samples=2, out=out)
    np.testing.assert_array_equal(model.predict_expression(small, num_samples=2, out=out, overwrite=True).values, first)


def test_progress_bar_keeps_its_total_after_resume(small, tmp_path, monkeypatch):
    import spartha_pyro.train as train

    bars = []

    class Recording(train.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(train, "tqdm", Recording)
    _model(small).train(max_epochs=2, batch_size=64, checkpoint_dir=tmp_path)
    _model(small).train(max_epochs=5, batch_size=64, checkpoint_dir=tmp_path, resume=True)
    assert [(b.n, b.total) for b in bars] == [(2, 2), (5, 5)]
