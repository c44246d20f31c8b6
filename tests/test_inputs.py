"""Bad input gets a clear InputError naming the key or spots; nothing silently wrong."""
import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sps

import spartha_pyro as sp
from conftest import SMALL

KW = dict(label_keys=["cell_type"], batch_key="slide", **SMALL)


def with_X(adata, fn):
    out = adata.copy()
    X = out.X.toarray().astype(np.float32)
    fn(X)
    out.X = sps.csr_matrix(X)
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda X: X.__setitem__((3, 2), -1), "negative"),
        (lambda X: X.__setitem__((4, 1), 0.5), "non-integer"),
        (lambda X: X.__setitem__((5, 0), np.nan), "NaN/inf"),
        (lambda X: X.__setitem__((6, 0), np.inf), "NaN/inf"),
    ],
)
def test_bad_counts(sim, edit, message):
    bad = with_X(sim, edit)
    with pytest.raises(sp.InputError, match=message) as err:
        sp.SPARTHA(bad, **KW)
    assert repr(str(bad.obs_names[[3, 4, 5, 6][["negative", "non-integer", "NaN/inf", "NaN/inf"].index(message)]])) in str(err.value) or message == "NaN/inf"


def test_dense_counts_work(sim):
    dense = sim.copy()
    dense.X = sim.X.toarray()
    assert sp.SPARTHA(dense, **KW).module.model.n_genes == sim.n_vars


def test_partial_nan_histology_names_spots(sim):
    bad = sim.copy()
    bad.obsm["histology"] = bad.obsm["histology"].copy()
    bad.obsm["histology"][7, 3] = np.nan
    with pytest.raises(sp.InputError, match=str(bad.obs_names[7])):
        sp.SPARTHA(bad, **KW)


def test_all_nan_row_means_missing_histology(sim):
    adata = sim.copy()
    adata.obsm["histology"] = adata.obsm["histology"].copy()
    adata.obsm["histology"][:50] = np.nan
    model = sp.SPARTHA(adata, **KW)
    assert not model._data.has_histology[:50].any() and model._data.has_histology[50:].all()
    assert np.isfinite(model.train(max_epochs=1, batch_size=300, progress=False, validation=None)[-1]["loss"])


def test_duplicate_obs_names(sim):
    bad = sim.copy()
    bad.obs_names = ["same"] * 2 + list(bad.obs_names[2:])
    with pytest.raises(sp.InputError, match="unique"):
        sp.SPARTHA(bad, **KW)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(histology_key="nope"), "nope"),
        (dict(label_keys=["nope"]), "nope"),
        (dict(batch_key="nope"), "nope"),
        (dict(qc_key="nope"), "annotate_qc"),
        (dict(layer="nope"), "nope"),
    ],
)
def test_missing_keys(sim, kwargs, message):
    with pytest.raises(sp.InputError, match=message):
        sp.SPARTHA(sim, **{**KW, **kwargs})


def test_single_class_label(sim):
    bad = sim.copy()
    bad.obs["one"] = "only"
    with pytest.raises(sp.InputError, match="one"):
        sp.SPARTHA(bad, **{**KW, "label_keys": ["one"]})


def test_bad_qc_values(sim):
    bad = sim.copy()
    bad.obs["qc_pass"] = bad.obs["qc_pass"].astype(str).replace({"fail": "maybe"})
    with pytest.raises(sp.InputError, match="maybe"):
        sp.SPARTHA(bad, **KW)


def test_boolean_qc_column(sim):
    adata = sim.copy()
    adata.obs["qc_bool"] = adata.obs["qc_pass"] == "pass"
    model = sp.SPARTHA(adata, qc_key="qc_bool", **KW)
    np.testing.assert_array_equal(model._data.qc, (adata.obs["qc_bool"]).to_numpy().astype(int))


def test_wrong_histology_width_at_prediction(trained, sim):
    new = ad.AnnData(obs=sim.obs[[]].iloc[:5].copy(), obsm={"histology": np.zeros((5, 7), np.float32)})
    with pytest.raises(sp.InputError, match="width 7"):
        trained.predict_expression(new, num_samples=1)


def test_prediction_needs_histology(trained, sim):
    with pytest.raises(sp.InputError, match="histology"):
        trained.predict_expression(ad.AnnData(obs=sim.obs[[]].iloc[:5].copy()), num_samples=1)


def test_missing_training_genes(trained, sim):
    with pytest.raises(sp.InputError, match="training genes"):
        trained.get_latent(sim[:, :10].copy(), latent="d")


@pytest.mark.parametrize("kwargs", [dict(artifact="maybe"), dict(value="median"), dict(num_samples=0)])
def test_bad_prediction_arguments(trained, sim, kwargs):
    new = ad.AnnData(obs=sim.obs[[]].iloc[:5].copy(), obsm={"histology": sim.obsm["histology"][:5]})
    with pytest.raises(sp.InputError):
        trained.predict_expression(new, **kwargs)


def test_zero_spots_get_a_clear_error(trained, sim):
    """Not a label or QC error for training, not an empty success for prediction/latents."""
    empty = sim[:0].copy()
    for kwargs in (KW, {}):
        with pytest.raises(sp.InputError, match="0 spots"):
            sp.SPARTHA(empty, **kwargs)
    with pytest.raises(sp.InputError, match="0 spots"):
        trained.predict_expression(empty)
    with pytest.raises(sp.InputError, match="0 spots"):
        trained.get_latent(empty, latent="d")
