"""Issue 18, item 5: on simulated data with known artifact-free truth, SPARTHA's artifact-free
generation (``artifact="pass"``) is closer to the truth than SpatialDIVA's prediction on the
held-out slide's artifact spots — the reason ``Z_r`` exists.

Measured when written (seed 3, 2 threads): MSE to the clean truth on the 71 artifact spots 0.62
(SPARTHA, pass) vs 3.92 (SpatialDIVA); on the 229 clean spots the order flips, 0.57 vs 0.20 —
an open question of issue 18, not asserted here."""
import numpy as np
import pytest

import spartha_pyro as sp
from spartha_pyro.metrics import mse


@pytest.fixture(scope="module")
def split():
    adata = sp.datasets.simulate(n_spots=900, n_genes=120, artifact_rate=0.3, seed=3)
    sp.pp.annotate_qc(adata, batch_key="slide")
    held = adata.obs["slide"].astype(str).to_numpy() == "slide2"
    train, test = adata[~held].copy(), adata[held].copy()
    histology = test.copy()
    histology.X = None
    truth = np.log1p(test.layers["clean"])  # artifact-free log1p(counts per 10,000)
    return train, histology, truth, test.obs["true_artifact"].to_numpy()


def fit_predict(train, histology, artifact_latent: bool) -> np.ndarray:
    model = sp.SPARTHA(train, label_keys=["cell_type"], batch_key="slide", artifact_latent=artifact_latent)
    model.train(max_epochs=40, validation=None, progress=False, seed=0)
    return model.predict_mean(histology, num_samples=30, artifact="pass").values


def test_pass_generation_is_closer_to_clean_truth_than_spatialdiva(split):
    train, histology, truth, artifact = split
    assert artifact.sum() >= 30
    spartha = fit_predict(train, histology, artifact_latent=True)
    spatialdiva = fit_predict(train, histology, artifact_latent=False)
    err_spartha = mse(spartha[artifact], truth[artifact])
    err_spatialdiva = mse(spatialdiva[artifact], truth[artifact])
    assert err_spartha < err_spatialdiva, (err_spartha, err_spatialdiva)
