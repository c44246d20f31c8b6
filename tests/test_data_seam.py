"""The data seam: a training AnnData is validated once, and one batch schema feeds the program."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import spartha_pyro as sp
from spartha_pyro import data
from spartha_pyro.loaders import Batch, DeviceLoader, HostLoader, minibatch
from spartha_pyro.models import SparthaModel


TINY = dict(hidden=8, y_dim=2, d_dim=2, r_dim=2, x_dim=0)


def test_training_anndata_is_validated_once(sim, monkeypatch):
    """Counts (a pass over a possibly backed file), histology and QC are read and checked once."""
    calls = {name: 0 for name in ("_counts_matrix", "_histology", "_qc_codes")}
    for name in calls:
        def counted(*args, _name=name, _original=getattr(data, name), **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(data, name, counted)
    model = sp.SPARTHA(sim, label_keys="auto", batch_key="slide", **TINY)
    assert calls == dict.fromkeys(calls, 1)
    assert model._data.labels.shape == (sim.n_obs, 1)  # the auto label set, encoded after validation
    np.testing.assert_array_equal(model._data.labels, data.encode_adata(sim, model.registry).labels)


def test_batch_is_the_programs_signature():
    assert Batch._fields == tuple(inspect.signature(SparthaModel.forward).parameters)[1:]


def test_every_loader_builds_the_same_batch(sim):
    arrays = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **TINY)._data
    idx = np.array([0, 5, 7, 300])
    cpu = torch.device("cpu")
    built = [minibatch(arrays, idx, cpu, sim.n_vars),
             next(DeviceLoader(arrays, cpu, sim.n_vars).batches(iter([idx]))),
             next(HostLoader(arrays, cpu, sim.n_vars).batches(iter([idx])))]
    for batch in built:
        assert isinstance(batch, Batch)
        for name, a, b in zip(Batch._fields, batch, built[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(built[0].index.numpy(), idx)
