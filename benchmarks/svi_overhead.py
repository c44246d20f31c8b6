"""Pyro's SVI overhead: SPARTHA's training step against a plain-torch step with the same ELBO.

The plain-torch loss (:func:`torch_loss`) uses the same networks and the same Monte Carlo
estimator as ``SparthaModule.loss``: it calls the guides' encoders (same dropout draws), draws
``z`` with ``rsample`` in the guides' site order (same random numbers), and computes
``log p - log q`` by hand with ``torch.distributions`` — priors ``p(Z | L)``, library,
NB counts, histology, the auxiliary classifier terms, the histology mask on the second path
and the ``1 / B`` per-spot scaling. The script first checks that both losses agree on a fixed
seed and batch, then times ``--max-steps`` steps of each after ``--warmup`` (forward,
backward, ClippedAdam step; data from the same device loader), alternating repeats, and
prints ``ratio = pyro / torch`` for ``Trace_ELBO`` and ``JitTrace_ELBO``. Distribution
validation is off in both loops.

Usage::

    python benchmarks/svi_overhead.py --device cpu --n-spots 4096 --n-genes 1000
    python benchmarks/svi_overhead.py --device cuda --n-genes 2000 --batch-size 2048 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch.distributions import Categorical, Normal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import build_model, device_name, synthetic_adata, timed_steps  # noqa: E402

from spartha_pyro.config import ModelConfig  # noqa: E402
from spartha_pyro.guides.spartha import classifier_targets  # noqa: E402
from spartha_pyro.loaders import Batch, iterate_minibatches, make_loader  # noqa: E402
from spartha_pyro.models.likelihoods import count_likelihood  # noqa: E402
from spartha_pyro.module import SparthaModule  # noqa: E402


def _negative_elbo(module: SparthaModule, guide, batch: Batch, mask: torch.Tensor | None) -> torch.Tensor:
    """``-ELBO`` per spot of one path, by hand: ``-(1/B) sum_n mask_n (log p - log q)_n``."""
    model = module.model
    x_t, x_h, has_counts, has_histology = batch.x_t, batch.x_h, batch.has_counts, batch.has_histology
    params = guide.encode(x_t, x_h, has_counts, has_histology)
    z = {s: Normal(*params[s]).rsample() for s in guide.dims}
    log_q = sum(Normal(*params[s]).log_prob(z[s]).sum(-1) for s in guide.dims)
    targets = classifier_targets(batch.labels, batch.batch, batch.qc, guide.dims)
    for site, head in guide.classifiers.heads.items():
        t = targets[site]
        log_q = log_q - guide.aux_weights[site] * Categorical(logits=head(z[site])).log_prob(t.clamp(min=0)) * (t >= 0)
    priors = model.latent_priors(batch.labels, batch.batch, batch.qc)
    log_p = sum(prior.log_prob(z[s]) for s, prior in priors.items())
    rho, gate, lib_loc, lib_scale, hist_loc, hist_scale = model.decode(torch.cat([z[s] for s in priors], -1))
    log_lib = torch.log1p(x_t.sum(-1))
    mu = torch.expm1(log_lib).clamp(min=0.0).unsqueeze(-1) * rho
    log_p = log_p + has_counts * (
        Normal(lib_loc, lib_scale).log_prob(log_lib) + count_likelihood(mu, model.log_theta.exp(), gate).log_prob(x_t)
    )
    log_p = log_p + has_histology * Normal(hist_loc, hist_scale).log_prob(x_h).sum(-1)
    elbo = log_p - log_q
    if mask is not None:
        elbo = elbo * mask
    return -elbo.sum() / len(x_t)


def torch_loss(module: SparthaModule, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_full, loss_hist)`` as ``SparthaModule.loss``, in plain torch."""
    full = _negative_elbo(module, module.guide_full, batch, None)
    hist = _negative_elbo(module, module.guide_hist, batch, batch.has_histology)
    return full, hist


def check_agreement(module: SparthaModule, batch: Batch, seed: int = 0) -> tuple[float, float]:
    """Both losses on one batch with the same seed; raises if they differ (rtol 1e-4)."""
    module.configure(module.model.n_spots, jit=False)
    pyro.set_rng_seed(seed)
    a = torch.stack(module.loss(batch)).detach()
    pyro.set_rng_seed(seed)
    b = torch.stack(torch_loss(module, batch)).detach()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return float(a.sum()), float(b.sum())


def measure(module, data, device, batch_size: int, max_steps: int, warmup: int, repeats: int, seed: int = 0) -> dict:
    """Seconds per step of Pyro (Trace_ELBO, JitTrace_ELBO) and plain torch; ratios pyro / torch."""
    loader = make_loader(data, device, module.model.n_genes, "device")
    optim = ClippedAdam(module.parameters(), lr=1e-4)
    rng = np.random.default_rng(seed)

    def step_with(loss_fn):
        def step(batch):
            loss_full, loss_hist = loss_fn(batch)
            optim.zero_grad(set_to_none=True)
            (loss_full + module.histology_weight * loss_hist).backward()
            optim.step()

        return step

    def order():
        while True:  # epochs until warmup + max_steps minibatches
            yield from iterate_minibatches(data.n, batch_size, rng, drop_last=True)

    def epoch(loss_fn):
        spots, seconds = timed_steps(step_with(loss_fn), loader.batches(order()), device, warmup, max_steps)
        return seconds / max(spots // batch_size, 1)

    per_step = {"torch": [], "trace": [], "jit": []}
    with pyro.validation_enabled(False), pyro.settings.context(module_local_params=False):
        pyro.clear_param_store()
        for _ in range(repeats):
            per_step["torch"].append(epoch(lambda b: torch_loss(module, b)))
            module.configure(module.model.n_spots, jit=False)
            per_step["trace"].append(epoch(module.loss))
            module.configure(module.model.n_spots, jit=True)
            per_step["jit"].append(epoch(module.loss))
        module.configure(module.model.n_spots, jit=False)
        pyro.clear_param_store()
    best = {k: min(v) for k, v in per_step.items()}
    return {
        "step_s_torch": best["torch"],
        "step_s_trace": best["trace"],
        "step_s_jit": best["jit"],
        "ratio_trace": best["trace"] / best["torch"],
        "ratio_jit": best["jit"] / best["torch"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-spots", type=int, default=4096)
    ap.add_argument("--n-genes", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-steps", type=int, default=12, help="timed steps per epoch")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per epoch (JIT traces and TorchScript optimises here)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats; the fastest counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    adata = synthetic_adata(args.n_spots, args.n_genes)
    model = build_model(adata, hidden=args.hidden)
    module, data = model.module.to(device).train(), model._data
    batch = next(make_loader(data, device, module.model.n_genes, "device").batches([np.arange(args.batch_size)]))
    with pyro.validation_enabled(False):
        pyro_loss, torch_loss_value = check_agreement(module, batch)
    result = {
        "device": device_name(device),
        "n_spots": args.n_spots,
        "n_genes": args.n_genes,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "loss_pyro": pyro_loss,
        "loss_torch": torch_loss_value,
        "torch_threads": torch.get_num_threads(),
        **measure(module, data, device, args.batch_size, args.max_steps, args.warmup, args.repeats),
    }
    print(f"losses agree on a fixed seed: pyro {pyro_loss:.5f}  torch {torch_loss_value:.5f}")
    print(f"{'loop':<22}{'s/step':>10}{'spots/s':>12}{'ratio':>8}")
    for name, key in (("plain torch", "torch"), ("Pyro Trace_ELBO", "trace"), ("Pyro JitTrace_ELBO", "jit")):
        s = result[f"step_s_{key}"]
        ratio = 1.0 if key == "torch" else result[f"ratio_{key}"]
        print(f"{name:<22}{s:>10.4f}{args.batch_size / s:>12.0f}{ratio:>8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
