# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 — Training SPARTHA and diagnosing SVI
#
# Training maximises two ELBOs at once — the full posterior $q(Z\mid X_t, X_h)$ and the
# histology-only posterior $q(Z\mid X_h)$ used for prediction — plus the auxiliary classifier
# terms $\alpha\,\log q_\psi(L\mid Z)$ that tie each latent to its label. Here we read the
# training history, compute the KL divergence of each latent from its prior, and see what
# **posterior collapse** looks like when the classifier weights `aux_weights` are zero.

# %%
import os
import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

import spartha_pyro as sp
from spartha_pyro.loaders import minibatch

CI = bool(os.environ.get("CI"))
EPOCHS = 5 if CI else 80
SMALL = dict(hidden=64, y_dim=8, d_dim=4, r_dim=4, x_dim=4)

adata = sp.datasets.simulate(n_spots=240 if CI else 2000, n_genes=80 if CI else 500, histology_dim=16, seed=0)
sp.pp.annotate_qc(adata, batch_key="slide")


FIGURES = Path(os.environ.get("SPARTHA_FIGURES", "figures"))  # where CI runs save their figures
if CI and "IPython" not in sys.modules:
    matplotlib.use("Agg")  # a CI script never opens a window (and has no display to open it on)


def show(name: str) -> None:
    """Show the current figure; under ``CI=1`` also save it as ``FIGURES/<name>.png``
    (a CI run has no display, so a figure only shown would be lost)."""
    if CI:
        FIGURES.mkdir(parents=True, exist_ok=True)
        plt.savefig(FIGURES / f"{name}.png", dpi=72, bbox_inches="tight")
    plt.show()


# %% [markdown]
# ## ELBO curves from `model.history`
# One record per epoch: `loss` (the total), `loss_full` and `loss_histology` (negative
# ELBO per spot of each path) and `acc_z_*` (accuracy of each classifier at the posterior
# means). With `validation=` a held-out set also gives `val_loss_histology`, which drives
# early stopping.

# %%
model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", **SMALL)
model.train(max_epochs=EPOCHS, batch_size=128, lr=3e-3, validation=0.15, patience=None, progress=False, seed=0)
history = pd.DataFrame(model.history).set_index("epoch")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
history[["loss_full", "loss_histology", "val_loss_histology"]].plot(ax=axes[0], logy=True)
axes[0].set(title="negative ELBO per spot", xlabel="epoch")
history.filter(like="acc_").plot(ax=axes[1], ylim=(0, 1.05))
axes[1].set(title="auxiliary classifier accuracy q(L | Z)", xlabel="epoch")
plt.tight_layout()
show("elbo_and_accuracy")
history.tail(3)

# %% [markdown]
# ## KL per latent, from traces of guide and model
# For one batch of spots: run the guide and record its trace, replay the model on the
# guide's values, and average $\log q(z) - \log p(z)$ over spots for each latent site — a
# Monte Carlo estimate of $\mathrm{KL}(q\,\|\,p)$ in nats per spot. A latent whose KL is
# near zero carries no information about the spot: it has **collapsed** onto its prior.


# %%
def kl_per_latent(m: sp.SPARTHA, path: str = "full", n_draws: int = 8) -> pd.Series:
    """Monte Carlo KL(q || p) per latent site, nats per spot, on the training spots."""
    module = m.module.eval()
    guide = module.guide_full if path == "full" else module.guide_hist
    args = tuple(minibatch(m._data, np.arange(m._data.n), torch.device("cpu"), module.model.n_genes))
    totals: dict[str, float] = {}
    with torch.no_grad(), pyro.settings.context(module_local_params=True):  # weights stay in the module
        for _ in range(n_draws):
            guide_tr = poutine.trace(guide).get_trace(*args)
            model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(*args)
            for name, site in guide_tr.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):  # factors, plate
                    continue
                value = site["value"]
                log_q = site["fn"].log_prob(value)  # unscaled: per spot
                log_p = model_tr.nodes[name]["fn"].log_prob(value)
                totals[name] = totals.get(name, 0.0) + float((log_q - log_p).mean()) / n_draws
    return pd.Series(totals, name=f"KL ({path} guide)")


kl = pd.concat([kl_per_latent(model, "full"), kl_per_latent(model, "histology")], axis=1)
kl

# %% [markdown]
# ## Posterior collapse and `aux_weights`
# The KL terms push every latent towards its prior; the likelihood pushes back only where
# a latent helps reconstruct the data, and nothing tells the model *which* latent should
# hold what. The classifier factors do: `aux_weights={"y": a, "d": a, "r": a}` rewards
# `z_y` for predicting the cell type, `z_d` the slide and `z_r` the QC label. Set them to
# zero and the decoder is free to route everything through whichever latent is easiest,
# or through none: the label-specific latents lose their meaning.
#
# We train the same model with weights 0 and 50 (the default) and compare the KL per
# latent and a linear probe of each latent's posterior means for each known factor
# (`sp.metrics.probe_matrix`, balanced accuracy on held-out spots).

# %%
rng = np.random.default_rng(0)
perm = rng.permutation(adata.n_obs)
train_idx, test_idx = perm[: adata.n_obs // 2], perm[adata.n_obs // 2:]
factors = {"cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
           "slide": adata.obs["slide"].astype(str).to_numpy(),
           "artifact": adata.obs["true_artifact"].to_numpy()}
results = {}
for weight in (0.0, 50.0):
    m = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide",
                   aux_weights={"y": weight, "d": weight, "r": weight}, **SMALL)
    m.train(max_epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False, seed=0)
    latents = {f"z_{k}": m.get_latent(latent=k) for k in ("y", "d", "r")}
    results[weight] = (kl_per_latent(m), sp.metrics.probe_matrix(latents, factors, train_idx, test_idx, max_iter=500))

fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
pd.DataFrame({f"aux weight {w:g}": r[0] for w, r in results.items()}).plot.bar(ax=axes[0], rot=0)
axes[0].set(title="KL(q || p) per latent", ylabel="nats per spot")
for ax, (weight, (_, probe)) in zip(axes[1:], results.items()):
    sp.pl.probe_heatmap(probe, ax=ax)
    ax.set_title(f"linear probe accuracy, aux weight {weight:g}")
plt.tight_layout()
show("probe_heatmaps")

# %% [markdown]
# Reading the figure (a run with 600 spots and 30 epochs gave): with weight 50 the KL of
# `z_y`, `z_d` and `z_r` is about 4.5, 4.5 and 1.6 nats per spot and the probe matrix is
# nearly diagonal — `z_y` predicts cell type (1.0) but not the slide (0.44), `z_r` the
# artifact (1.0) but not the cell type (0.5). With weight 0, `z_d` and `z_r` fall to about
# 0.5 and 0.4 nats — heading for collapse — and what they still carry is entangled:
# `z_y` predicts the slide (0.79) and `z_r` the cell type (0.70). `z_x`, which has no
# classifier, collapses in both runs (KL ≈ 0.02–0.1): everything it could carry is already
# claimed by the labelled latents. Too large a weight has the opposite failure: the
# latents become label embeddings that stop explaining the counts (watch `loss_full`
# rise). The histology-only guide is what predicts new slides, so its KL column above is
# the one to watch when tuning.
