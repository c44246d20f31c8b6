"""The library leaves the process as it found it: Pyro's settings and param store, and
what importing it loads (no image stack in the core modules)."""
import subprocess
import sys
import textwrap

import numpy as np
import pyro
import pytest
import torch

import spartha_pyro as sp
from conftest import SMALL


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_changes_no_pyro_setting():
    out = _run(
        """
        import pyro
        before = pyro.settings.get()
        import spartha_pyro, spartha_pyro.model, spartha_pyro.train, spartha_pyro.cli
        from spartha_pyro import models, guides
        print(before == pyro.settings.get(), pyro.settings.get("module_local_params"))
        """
    )
    assert out.split() == ["True", "False"]


@pytest.mark.parametrize("module", ["spartha_pyro", "spartha_pyro.model", "spartha_pyro.train", "spartha_pyro.cli"])
def test_core_modules_do_not_import_the_image_stack(module):
    out = _run(
        f"""
        import sys
        import {module}
        print(sorted(m for m in sys.modules if m == "PIL" or m.startswith("PIL.")))
        """
    )
    assert out.strip() == "[]"


def test_reading_images_does_not_lift_pillow_limit_process_wide(tmp_path):
    from PIL import Image

    from spartha_pyro.io._images import image_size, load_rgb

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    assert image_size(tmp_path / "a.png", "S1") == (8, 8)
    assert load_rgb(tmp_path / "a.png", "S1", max_px=4)[0].shape == (4, 4, 3)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_huge_images_still_open(tmp_path, monkeypatch):
    """The decompression-bomb guard is lifted inside the library's readers (histology is huge)."""
    from PIL import Image

    from spartha_pyro.io._images import image_size, load_rgb

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 px > 2 x 10: DecompressionBombError
    assert image_size(tmp_path / "a.png", "S1") == (8, 8)
    assert load_rgb(tmp_path / "a.png", "S1")[0].shape == (8, 8, 3)
    assert Image.MAX_IMAGE_PIXELS == 10


@pytest.mark.parametrize("global_local_params", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_training_and_prediction_leave_pyro_state_alone(sim, global_local_params, jit):
    """A user's global param store and setting survive training (``jit`` too) and prediction,
    whichever ``module_local_params`` the user chose; the model's weights never enter the store."""
    adata = sim[:200].copy()
    with pyro.settings.context(module_local_params=global_local_params):
        pyro.clear_param_store()
        user = pyro.param("user_weight", torch.ones(3)).unconstrained()
        model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", **SMALL)
        model.train(max_epochs=1, batch_size=50, progress=False, jit=jit)
        model.get_latent(latent="y")
        model.predict_expression(adata, num_samples=2)
        assert pyro.settings.get("module_local_params") is global_local_params
        store = pyro.get_param_store()
        assert list(store.keys()) == ["user_weight"]
        assert store._params["user_weight"] is user
        pyro.clear_param_store()


def test_two_models_do_not_share_weights(sim):
    adata = sim[:200].copy()
    a = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
    a.train(max_epochs=1, batch_size=50, progress=False)
    before = {k: v.clone() for k, v in a.module.state_dict().items()}
    b = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", seed=0, **SMALL)
    b.train(max_epochs=2, batch_size=50, progress=False, lr=1e-2)
    ids_a = {id(p) for p in a.module.parameters()}
    assert not ids_a & {id(p) for p in b.module.parameters()}
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not all(torch.equal(v, before[k]) for k, v in b.module.state_dict().items())


@pytest.mark.parametrize("call", ["sp.pp.expression_clusters(adata)", "hvg_panel(adata, n_top=10)"])
def test_clustering_and_panels_keep_the_torch_thread_count(call):
    """scanpy's first numba kernel used to set torch's (shared OpenMP) thread count to the
    number of cores: automatic labels and panels overrode a user's ``OMP_NUM_THREADS=1``."""
    out = _run(
        f"""
        import os
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        import spartha_pyro as sp
        from spartha_pyro.metrics.panels import hvg_panel
        adata = sp.datasets.simulate(n_spots=120, n_genes=40, seed=0)
        {call}
        print(torch.get_num_threads())
        """
    )
    assert out.split() == ["1"]
