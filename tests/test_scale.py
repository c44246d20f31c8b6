"""The fast data path, streaming prediction and data-parallel training (CPU; ``gpu`` tests need CUDA).

Small synthetic data built here (no scanpy), so the ``gpu`` tests run on a bare GPU machine.
"""
import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sps
import torch
import torch.multiprocessing as mp
from pyro import poutine

from spartha_pyro.data import BackedCounts
from spartha_pyro.loaders import Batch, DeviceLoader, HostLoader, iterate_minibatches, make_loader
from spartha_pyro.model import SPARTHA

SMALL = dict(hidden=32, y_dim=4, d_dim=2, r_dim=2, x_dim=2)


def tiny(n_spots=240, n_genes=40, seed=0):
    """Random sparse counts (~30 % non-zero), histology, labels, slides and QC."""
    rng = np.random.default_rng(seed)
    X = sps.random(n_spots, n_genes, density=0.3, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.ceil(X.data * 20)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["a", "b", "c"], n_spots)),
            "slide": pd.Categorical(np.where(np.arange(n_spots) % 2, "s1", "s0")),
            "qc_pass": rng.random(n_spots) > 0.2,
        },
        index=[f"spot{i}" for i in range(n_spots)],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]))
    adata.obsm["histology"] = rng.normal(size=(n_spots, 6)).astype(np.float32)
    return adata


def build(adata):
    return SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", **SMALL)


def losses_with(model, loader, device, seed=0):
    """Both path losses on the first two minibatches, fixed Pyro seed, eval mode."""
    module = model.module.to(device).eval()
    out = []
    for batch in loader.batches(iterate_minibatches(model._data.n, 64, np.random.default_rng(1), False)):
        pyro.set_rng_seed(seed)
        out.append(torch.stack(module.loss(batch)).detach().cpu())
        if len(out) == 2:
            return torch.stack(out)


def test_device_and_host_loaders_give_the_same_batches_and_loss():
    model = build(tiny())
    cpu = torch.device("cpu")
    dev, host = DeviceLoader(model._data, cpu, 40), HostLoader(model._data, cpu, 40)
    idx = [np.array([0, 3, 17, 200]), np.array([5, 6])]
    for a, b in zip(dev.batches(iter(idx)), host.batches(iter(idx))):
        assert type(a) is type(b) is Batch
        for name, x, y in zip(Batch._fields, a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(next(dev.batches(iter(idx[:1]))).x_t.numpy(), model._data.counts[idx[0]].toarray())
    torch.testing.assert_close(losses_with(model, dev, cpu), losses_with(model, host, cpu))


def test_device_loader_on_cpu_does_not_copy_the_counts():
    """On CPU the resident CSR is the validated one (no second copy of the data in host memory)."""
    model = build(tiny())
    counts = model._data.counts
    _, col, val = DeviceLoader(model._data, torch.device("cpu"), 40).csr
    assert np.shares_memory(col.numpy(), counts.indices) and np.shares_memory(val.numpy(), counts.data)


def test_host_loader_stops_its_thread_and_reraises():
    model = build(tiny())
    loader = HostLoader(model._data, torch.device("cpu"), 40)
    gen = loader.batches(iter([np.arange(3)] * 10))
    next(gen)
    gen.close()  # leaves early: the prefetch thread must not hang
    with pytest.raises(IndexError):
        list(loader.batches(iter([np.array([10_000])])))


def test_backed_anndata_trains_from_disk(tmp_path):
    adata = tiny()
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    model = build(backed)
    assert isinstance(model._data.counts, BackedCounts)
    assert isinstance(make_loader(model._data, torch.device("cpu"), 40), HostLoader)
    np.testing.assert_array_equal(model._data.counts[np.array([1, 7])].toarray(), adata.X[[1, 7]].toarray())
    hist = model.train(max_epochs=2, batch_size=80, progress=False, validation=None)
    assert np.isfinite([r["loss"] for r in hist]).all()
    # same numbers as the in-memory model on the same seed
    memory = build(adata)
    model2 = build(backed)
    model2.module.load_state_dict(memory.module.state_dict())
    a = memory.train(max_epochs=1, batch_size=80, progress=False, loader="device", validation=None)
    b = model2.train(max_epochs=1, batch_size=80, progress=False, validation=None)
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], rel=1e-5)


def test_streamed_prediction_equals_in_memory(tmp_path):
    adata = tiny()
    model = build(adata)
    model.train(max_epochs=1, batch_size=80, progress=False, validation=None)
    new = ad.AnnData(obs=adata.obs[[]].iloc[:70].copy(), obsm={"histology": adata.obsm["histology"][:70]})
    for value in ("counts", "mean"):
        mem = model.predict_expression(new, num_samples=3, seed=2, batch_size=32, value=value)
        disk = model.predict_expression(new, num_samples=3, seed=2, batch_size=32, value=value, out=tmp_path / f"{value}.nc")
        np.testing.assert_array_equal(mem.values, disk.values)
        assert disk.dtype == mem.dtype and disk.name == mem.name and disk.dims == mem.dims
        assert list(disk.spot.values) == list(new.obs_names) and list(disk.gene.values) == list(adata.var_names)
        disk.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.nc", "mean.nc"]  # no temporary left


# ----------------------------------------------------------------------------- data parallel
def _ddp_worker(rank, world, init_file, adata, state, shards, result_file):
    import torch.distributed as dist

    from spartha_pyro import distributed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = build(adata)
        model.module.load_state_dict(state)
        module = model.module.train()
        batch = next(DeviceLoader(model._data, torch.device("cpu"), 40).batches(iter([shards[rank]])))
        pyro.set_rng_seed(100 + rank)
        sum(module.loss(batch)).backward()
        distributed.allreduce_gradients(module)
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        model.module.load_state_dict(state)
        model.train(max_epochs=1, batch_size=40, progress=False, seed=0, validation=None)
        params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        torch.save({"grads": grads, "params": params, "history": model.history}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_average_the_single_process_gradients(tmp_path):
    adata = tiny()
    model = build(adata)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    shards = [np.arange(0, 60), np.arange(60, 120)]
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), adata, state, shards, str(tmp_path / "out")),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    # one process, the same two minibatches with the same noise: the explicit gradient mean
    module = model.module.train()
    loader = DeviceLoader(model._data, torch.device("cpu"), 40)
    expected = {}
    for rank, batch in enumerate(loader.batches(iter(shards))):
        module.zero_grad(set_to_none=True)
        pyro.set_rng_seed(100 + rank)
        sum(module.loss(batch)).backward()
        for n, p in module.named_parameters():
            if p.grad is not None:
                expected[n] = expected.get(n, 0) + p.grad / 2
    assert ranks[0]["grads"].keys() == expected.keys()
    for n, g in expected.items():
        torch.testing.assert_close(ranks[0]["grads"][n], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ranks[1]["grads"][n], g, rtol=1e-4, atol=1e-6)
    # training: every rank applies the same averaged update, logs the same averaged loss
    for n, p in ranks[0]["params"].items():
        torch.testing.assert_close(ranks[1]["params"][n], p, rtol=0, atol=0)
    assert ranks[0]["history"] == ranks[1]["history"]


# ----------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def encoding_and_log_density(model, loader, idx):
    """Full-guide posterior means of one minibatch, and the model's log-density at them.

    Deterministic (eval mode, latents fixed at their means), so two devices can be compared
    exactly up to float rounding: their random streams differ, their arithmetic should not.
    """
    module = model.module.to(loader.device).eval()
    batch = next(loader.batches(iter([idx])))
    params = module.guide_full.encode(batch.x_t, batch.x_h, batch.has_counts, batch.has_histology)
    z = {site: loc for site, (loc, scale) in params.items()}
    trace = poutine.trace(poutine.condition(module.model, data=z)).get_trace(*batch)
    flat = torch.cat([torch.cat(p, -1) for p in params.values()], -1)
    return flat.detach().cpu(), trace.log_prob_sum().detach().cpu()


@pytest.mark.gpu
@cuda
def test_cuda_matches_cpu():
    model = build(tiny())
    idx = np.arange(0, 240, 3)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    dev_batch = next(DeviceLoader(model._data, gpu, 40).batches(iter([idx])))
    host_batch = next(HostLoader(model._data, gpu, 40).batches(iter([idx])))
    for dev_t, host_t in zip(dev_batch, host_batch):  # both loaders build the same tensors on the device
        torch.testing.assert_close(dev_t, host_t, rtol=0, atol=0)
    enc_cpu, lp_cpu = encoding_and_log_density(model, DeviceLoader(model._data, cpu, 40), idx)
    enc_gpu, lp_gpu = encoding_and_log_density(model, DeviceLoader(model._data, gpu, 40), idx)
    torch.testing.assert_close(enc_gpu, enc_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp_gpu, lp_cpu, rtol=1e-4, atol=1e-2)
    pyro.set_rng_seed(0)
    assert torch.isfinite(torch.stack(model.module.to(gpu).loss(dev_batch))).all()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("jit", [False, True])
def test_cuda_training_and_prediction(jit):
    adata = tiny()
    model = build(adata)
    hist = model.train(max_epochs=3, batch_size=60, progress=False, device="cuda", jit=jit, validation=None)
    assert model.device.type == "cuda" and np.isfinite([r["loss"] for r in hist]).all()
    pred = model.predict_expression(adata[:50], num_samples=2)
    assert pred.shape == (2, 50, 40)
