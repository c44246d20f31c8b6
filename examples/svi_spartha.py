"""SPARTHA written out in plain Pyro: model, guides, the SVI loop and ``Predictive``.

No ``SPARTHA`` class here: the generative model (:class:`spartha_pyro.models.SparthaModel`),
the two amortized guides and the auxiliary classifiers (:mod:`spartha_pyro.guides`) are
built by hand, trained with a hand-written SVI loop, and expression is predicted for a
held-out section from its histology alone with :class:`pyro.infer.Predictive`.

**Why not ``pyro.infer.SVI``?** Like the library, this script runs its Pyro programs under
``pyro.settings.context(module_local_params=True)`` (here around ``main``), so two models in
one process never share weights through Pyro's global param store, and a user's own store and
settings are left alone (never ``pyro.settings.set`` at import). With
module-local parameters ``SVI.step`` cannot collect them: it traces ``pyro.param`` sites and
expects unconstrained store entries, and fails with ``AttributeError: 'Parameter' object has
no attribute 'unconstrained'``. Pyro's documented idiom for ``PyroModule``s is to treat the
ELBO as a ``torch.nn.Module``: ``Trace_ELBO()(model, guide)`` returns a module whose
``forward`` is the differentiable loss and whose ``parameters()`` are the model's and guide's,
and any torch optimizer (here Pyro's ``ClippedAdam``, which is a ``torch.optim.Optimizer``)
steps them. That is what this script does.

The objective is the library's (:mod:`spartha_pyro.guides`):
``loss = -ELBO(model, full guide) - histology_weight * ELBO(model, histology guide)``, the
second masked to spots with histology; the classifier terms ``-alpha log q(L | Z)`` are
``pyro.factor`` sites inside each guide.

Examples::

    python examples/svi_spartha.py                                   # simulated, < 60 s on CPU
    python examples/svi_spartha.py --data ../shared/data/her2st --num-epochs 40
    python examples/svi_spartha.py --h5ad her2st.h5ad --test-section C5 --cuda
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam

import spartha_pyro as sp
from spartha_pyro.config import ModelConfig
from spartha_pyro.data import QC_CODES, class_counts, encode_adata, setup_anndata
from spartha_pyro.demo import example_data, holdout_split
from spartha_pyro.guides import AuxClassifiers, FullGuide, HistologyEncoder, HistologyGuide
from spartha_pyro.loaders import minibatch
from spartha_pyro.models import SparthaModel


@pyro.settings.context(module_local_params=True)  # build and run the modules with their own parameters
def main(argv: list[str] | None = None) -> None:
    """Build, train and use SPARTHA with plain Pyro; prints the ELBO and held-out accuracy."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="her2st folder (reads the 5 imaged sections, 'stats' features)")
    parser.add_argument("--h5ad", type=Path, help="an .h5ad prepared by examples/prepare_her2st.py")
    parser.add_argument("--test-section", help="section held out (default: the last one)")
    parser.add_argument("--n-spots", type=int, default=600, help="simulated spots")
    parser.add_argument("--n-genes", type=int, default=200, help="simulated genes")
    parser.add_argument("--num-epochs", type=int, default=30, help="passes over the training spots")
    parser.add_argument("--batch-size", type=int, default=128, help="spots per minibatch")
    parser.add_argument("--lr", type=float, default=3e-3, help="ClippedAdam learning rate")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width")
    parser.add_argument("--num-samples", type=int, default=10, help="posterior predictive draws")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and draws")
    parser.add_argument("--cuda", action="store_true", help="train on CUDA")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    pyro.set_rng_seed(args.seed)

    # ---- data: AnnData -> arrays (registry = genes, categories, histology scaling)
    adata, label_key = example_data(args.h5ad, args.data, args.n_spots, args.n_genes, args.seed)
    train, test, histology_only = holdout_split(adata, "slide", args.test_section)
    registry, data = setup_anndata(train, "histology", [label_key], "slide", "qc_pass")
    n_spots, n_genes, hist_dim = data.n, len(registry.genes), registry.histology_dim
    print(f"training on {n_spots} spots × {n_genes} genes, histology {hist_dim}-d; test section "
          f"{test.obs['slide'].iloc[0]} ({test.n_obs} spots)")

    # ---- the generative model p(X_t, X_h | Z) p(Z | L); the architecture's other settings at their defaults
    config = ModelConfig(y_dim=8, d_dim=4, r_dim=4, x_dim=4, hidden=args.hidden)
    model = SparthaModel(
        n_spots, n_genes, hist_dim,
        label_class_counts=[class_counts(data.labels[:, 0], len(registry.label_categories[0]))],
        batch_class_counts=class_counts(data.batch, len(registry.batch_categories)),
        qc_class_counts=class_counts(data.qc, len(QC_CODES)),
        config=config,
    )
    dims = model.dims  # {"z_y0": 8, "z_d": 4, "z_r": 4, "z_x": 4}

    # ---- q_psi(L | Z): one classifier per labelled latent, shared by both guides
    classified = {s: d for s, d in dims.items() if s != "z_x"}
    n_classes = {"z_y0": len(registry.label_categories[0]), "z_d": len(registry.batch_categories), "z_r": 2}
    classifiers = AuxClassifiers(classified, n_classes)
    aux_weights = {s: config.aux_weights["y" if s.startswith("z_y") else s[-1]] for s in classified}

    # ---- the two guides: q(Z | X_h) (prediction path) and q(Z | X_t, X_h), sharing the histology encoder
    hist_encoder = HistologyEncoder(hist_dim, dims, config.hidden, config.histology_dropout, config.histology_encoder)
    guide_hist = HistologyGuide(hist_encoder, n_spots, dims, classifiers, aux_weights)
    guide_full = FullGuide(n_genes, hist_dim, hist_encoder, n_spots, dims, classifiers, aux_weights, config.hidden)

    # ---- the ELBOs as nn.Modules (see the module docstring: SVI does not see module-local params)
    elbo_full = Trace_ELBO()(model, guide_full)
    elbo_hist = Trace_ELBO()(model, guide_hist)
    params = {id(p): p for elbo in (elbo_full, elbo_hist) for p in elbo.parameters()}  # shared modules once
    optim = ClippedAdam(list(params.values()), lr=args.lr, clip_norm=10.0)
    print(f"{sum(p.numel() for p in params.values()):,} parameters")
    for module in (model, guide_full, guide_hist):
        module.to(device).train()

    # ---- the SVI loop, by hand
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for epoch in range(args.num_epochs):
        total, order = 0.0, rng.permutation(n_spots)
        for start in range(0, n_spots, args.batch_size):
            idx = np.sort(order[start:start + args.batch_size])  # the plate's subsample indices
            batch = minibatch(data, idx, device, n_genes)  # the model's arguments, in order
            loss = elbo_full(*batch)  # -ELBO per spot of the full path
            with poutine.mask(mask=batch.has_histology):
                loss = loss + elbo_hist(*batch)  # histology path, only where there is histology
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += loss.item() * len(idx)
        if epoch % max(1, args.num_epochs // 10) == 0 or epoch == args.num_epochs - 1:
            print(f"epoch {epoch:3d}  loss (-ELBO per spot, both paths) {total / n_spots:10.3f}")
    print(f"trained in {time.perf_counter() - t0:.1f} s")

    # ---- prediction from histology alone: Z from q(Z | X_h), Z_r from p(Z_r | pass)
    for module in (model, guide_full, guide_hist):
        module.eval()
    new = encode_adata(histology_only, registry)
    batch = minibatch(new, np.arange(new.n), device, n_genes)
    qc_pass = torch.full_like(batch.qc, QC_CODES["pass"])  # artifact-free generation
    guide = poutine.block(guide_hist, hide=["z_r"])  # z_r not in the guide: Predictive draws it from the prior
    predictive = Predictive(model, guide=guide, num_samples=args.num_samples, return_sites=["x_t"])
    with torch.no_grad():
        draws = predictive(*batch._replace(x_t=None, qc=qc_pass, index=torch.arange(new.n, device=device)))["x_t"]
    draws = draws.reshape(args.num_samples, new.n, n_genes).cpu().numpy()
    pred = sp.metrics.normalize_log1p(draws).mean(0)  # posterior mean in the metric's space
    observed = sp.metrics.normalize_log1p(test[:, registry.genes].X)
    print(f"held-out section: PCC per gene {sp.metrics.pcc_gene(pred, observed):.3f}, "
          f"per spot {sp.metrics.pcc_spot(pred, observed):.3f}, MSE {sp.metrics.mse(pred, observed):.3f}")


if __name__ == "__main__":
    main()
