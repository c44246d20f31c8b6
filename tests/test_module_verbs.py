"""SparthaModule owns every Pyro verb; model.py and train.py only move data in and out."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

import spartha_pyro as sp
from spartha_pyro.loaders import minibatch

PACKAGE = Path(sp.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
            names.update(f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_model_and_train_leave_the_pyro_verbs_to_the_module():
    train, model = _imports("train"), _imports("model")
    assert not [name for name in train if "guides" in name]
    assert not [name for name in train | model if name.startswith(("pyro.poutine", "pyro.infer"))]


@pytest.fixture(scope="module")
def tiny(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", hidden=8, y_dim=2, d_dim=2, r_dim=2, x_dim=0)
    model.module.eval()
    return model


def test_artifact_free_draws_take_z_r_from_the_pass_prior(tiny, sim):
    module = tiny.module
    batch = minibatch(tiny._data, np.arange(40), torch.device("cpu"), sim.n_vars)
    pass_loc = module.model.prior_r.loc.clone()
    with torch.no_grad(), pyro.settings.context(module_local_params=True):
        module.model.prior_r.loc[1] = 100.0  # class 1 = pass: far from anything the guide proposes
        try:
            free = module.posterior_predictive(batch, 3, ["z_r"], artifact_free=True)["z_r"]
            measured = module.posterior_predictive(batch, 3, ["z_r"], artifact_free=False)["z_r"]
            x_t = module.posterior_predictive(batch, 2, ["x_t"], artifact_free=True)["x_t"]
        finally:
            module.model.prior_r.loc.copy_(pass_loc)
    assert free.shape == measured.shape == (3, 40, 2) and x_t.shape == (2, 40, sim.n_vars)
    assert free.mean() > 90 and measured.abs().mean() < 10


def test_nonfinite_diagnosis_names_the_parameter(tiny, sim):
    module = tiny.module
    batch = minibatch(tiny._data, np.arange(16), torch.device("cpu"), sim.n_vars)
    saved = module.model.log_theta.detach().clone()
    with pyro.settings.context(module_local_params=True):
        try:
            with torch.no_grad():
                module.model.log_theta[3] = float("nan")
            with pytest.warns(UserWarning, match="NaN"):
                message = module.diagnose_nonfinite(batch)
        finally:
            with torch.no_grad():
                module.model.log_theta.copy_(saved)
    assert "model site 'x_t'" in message and "parameters ['model.log_theta']" in message


def test_latent_means_and_accuracy(tiny, sim):
    batch = minibatch(tiny._data, np.arange(50), torch.device("cpu"), sim.n_vars)
    with torch.no_grad(), pyro.settings.context(module_local_params=True):
        z = tiny.module.latent_means(batch, ["z_y0", "z_d"], "histology")
        loc = tiny.module.guide_hist.encode(batch.x_t, batch.x_h, batch.has_counts, batch.has_histology)["z_d"][0]
        acc = tiny.module.classifier_accuracy(batch)
    assert z.shape == (50, 4)
    torch.testing.assert_close(z[:, 2:], loc)
    assert set(acc) == {"acc_z_y0", "acc_z_d", "acc_z_r"} and all(0.0 <= a <= 1.0 for a in acc.values())
