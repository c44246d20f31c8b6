import warnings

import pyro
import pytest

import spartha_pyro as sp


@pytest.fixture(autouse=True)
def _pyro_validation():
    pyro.enable_validation(True)
    yield
    pyro.enable_validation(False)


def pytest_configure(config):
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it); run with `pytest -m gpu`")


@pytest.fixture(scope="session")
def sim():
    """A small simulated data set with QC labels (600 spots, 150 genes, 3 slides)."""
    adata = sp.datasets.simulate(n_spots=600, n_genes=150, histology_dim=32, seed=0)
    sp.pp.annotate_qc(adata, batch_key="slide")
    return adata


SMALL = dict(hidden=64, y_dim=8, d_dim=4, r_dim=4, x_dim=4)


@pytest.fixture(scope="session")
def trained(sim):
    """A SPARTHA model trained briefly on ``sim`` (shared by read-only tests)."""
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", **SMALL)
    model.train(max_epochs=40, batch_size=100, lr=3e-3, progress=False, seed=0, validation=None)
    return model
