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
# # 01 — SPARTHA as a Pyro program
#
# SPARTHA is a generative story: every spot has a few latent variables, each drawn from a
# prior that depends on a label we know, and the spot's counts and histology are decoded
# from them. In Pyro the story *is* the code (`spartha_pyro.models.SparthaModel.forward`):
#
# | site | meaning | prior |
# |---|---|---|
# | `z_y0` … `z_y{m-1}` | biology: one latent per label set (cell type, region…) | $\mathcal N(\mu_{L^k}, \sigma_{L^k})$, learned per class |
# | `z_d` | batch / slide | $\mathcal N(\mu_{L_d}, \sigma_{L_d})$ |
# | `z_r` | **artifact**: what QC-failing spots have in common | $\mathcal N(\mu_{L_r}, \sigma_{L_r})$, $L_r$ = QC pass/fail |
# | `z_x` | free residual (SpatialDIVA's $z_x$) | $\mathcal N(0, I)$ |
# | `log_library` | log1p library size | $\mathcal N(a(h), s)$ |
# | `x_t` | counts of every gene | NB($l\,\mathrm{softmax}(W_t h)$, $\theta$) |
# | `x_h` | standardised histology vector | $\mathcal N(W_h h, \sigma_h)$ |
#
# with $h = f_\theta(z_{y}, z_d, z_r, z_x)$. This notebook runs the program forward (from the
# prior), looks at its trace, and draws its graph.

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

CI = bool(os.environ.get("CI"))  # the test suite sets CI=1: smaller data
pyro.set_rng_seed(0)


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
# ## Data and an (untrained) model
# The simulator knows the truth: cell type, slide and artifact per spot. `annotate_qc` labels
# spots pass/fail with the usual MAD rules — it never drops a spot.

# %%
adata = sp.datasets.simulate(n_spots=300 if CI else 1500, n_genes=80 if CI else 500, histology_dim=16, seed=0)
sp.pp.annotate_qc(adata, batch_key="slide")
model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide", hidden=64)
print(model)
pd.crosstab(adata.obs["true_artifact"], adata.obs["qc_pass"])

# %% [markdown]
# ## Running the model forward: `poutine.trace`
# With `x_t=None` and `x_h=None` the program *generates* counts and histology. The trace
# records every `pyro.sample` site: its distribution, value and shapes. `index` is the
# plate's subsample (which spots of the training set these are).

# %%
program = model.module.model
batch = minibatch(model._data, np.arange(200), torch.device("cpu"), program.n_genes)  # a loaders.Batch
batch = batch._replace(x_t=None, x_h=None)
# module_local_params: the model's weights stay in the module, out of Pyro's global param store
with torch.no_grad(), pyro.settings.context(module_local_params=True):
    trace = poutine.trace(program).get_trace(*batch)


def site_table(tr: pyro.poutine.Trace) -> pd.DataFrame:
    """One row per sample site: distribution, batch and event shapes, observed or not."""
    rows = []
    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):  # skip the plate's index site
            fn = base = site["fn"]
            while hasattr(base, "base_dist"):  # unwrap .mask() / .to_event()
                base = base.base_dist
            rows.append({"site": name, "distribution": type(base).__name__,
                         "batch_shape": tuple(fn.batch_shape), "event_shape": tuple(fn.event_shape),
                         "observed": site["is_observed"]})
    return pd.DataFrame(rows).set_index("site")


site_table(trace)

# %% [markdown]
# ## Priors conditioned on labels
# Each class of each label set has its own prior location and scale. Drawing `z_y0` and
# `z_r` from the prior (not yet trained: locations are random) already separates spots by
# their label — that is the inductive bias the posterior is pulled towards.

# %%
labels = adata.obs["cell_type"].iloc[:200].astype(str).to_numpy()
qc = adata.obs["qc_pass"].iloc[:200].astype(str).to_numpy()
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, site, colour, title in ((axes[0], "z_y0", labels, "z_y0 | cell type"), (axes[1], "z_r", qc, "z_r | QC label")):
    z = trace.nodes[site]["value"].numpy()
    for value in np.unique(colour):
        sel = colour == value
        ax.scatter(z[sel, 0], z[sel, 1], s=8, label=value)
    ax.set(title=f"prior draws of {title}", xlabel="dim 0", ylabel="dim 1")
    ax.legend(frameon=False, fontsize=8)
plt.tight_layout()
show("prior_draws")

# %% [markdown]
# A spot with a **missing** label (code `-1`) gets the class mixture as its prior, weighted
# by class frequencies — unlabelled spots are still used.

# %%
prior = program.prior_y[0]
print("class locations (first 3 dims):\n", prior.loc.detach()[:, :3].numpy().round(2))
print("mixture weights for an unlabelled spot:", torch.softmax(prior.class_logits, 0).numpy().round(3))

# %% [markdown]
# ## What the program generates
# Counts generated from the prior: library sizes and a few genes. An untrained decoder makes
# noise, but with the right shapes and the NB's mean–variance relation.

# %%
x_t = trace.nodes["x_t"]["value"].numpy()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
axes[0].hist(np.log1p(x_t.sum(1)), bins=30, color="grey")
axes[0].set(title="log1p library size of generated spots", xlabel="log1p(total counts)")
mean, var = x_t.mean(0), x_t.var(0)
axes[1].loglog(mean + 1e-3, var + 1e-3, ".", alpha=0.5)
axes[1].loglog([1e-3, mean.max()], [1e-3, mean.max()], "k--", lw=0.8, label="Poisson")
axes[1].set(title="generated genes: variance vs mean", xlabel="mean", ylabel="variance")
axes[1].legend(frameon=False)
plt.tight_layout()
show("generated_counts")

# %% [markdown]
# ## The graph: `pyro.render_model`
# Rendering needs the `graphviz` Python package and its `dot` binary; without them we fall
# back to the trace's site table above, which holds the same information.

# %%
import shutil  # noqa: E402

try:
    import graphviz  # noqa: F401

    have_graphviz = shutil.which("dot") is not None
except ImportError:
    have_graphviz = False
if have_graphviz:
    with pyro.settings.context(module_local_params=True):
        graph = pyro.render_model(program, model_args=tuple(batch), render_distributions=True)
    try:
        from IPython.display import display
    except ImportError:  # run as a plain script
        display = print
    display(graph)
else:
    print("graphviz is not installed: the site table stands in for the graph")
    print(site_table(trace).to_string())

# %% [markdown]
# ## What each latent is for
# - **`z_y`** carries biology that should transfer to a new slide (it is the part of the
#   histology that predicts expression).
# - **`z_d`** soaks up slide effects (staining, depth) so that `z_y` does not have to.
# - **`z_r`** soaks up what QC-failing spots share (low capture, leaked mitochondrial RNA,
#   tissue folds). At prediction time we can set it to the *pass* prior and generate
#   artifact-free expression (notebook 03) — the spots are kept, not filtered.
# - **`z_x`** is everything else.
#
# Next: notebook 02 fits the model and checks whether each latent is used.
