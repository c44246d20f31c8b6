"""Which point statistic of SPARTHA's posterior predictive should be scored? Chosen on a
training section, reported on the held-out one.

Trains SPARTHA with the library defaults (automatic labels, early stopping on the PCC of the
inner validation section) on her2st C2 C3 C4, validating on C5 (no refit), B4 held out, and
scores three histology-only point predictions, per-gene PCC against log1p(counts per 10k):

- ``expected``: ``predict_mean`` (the library default), the mean over 100 latent draws of
  E[log1p(10,000 x / l)] with the NB count noise integrated out exactly, l the spot's library;
- ``sampled``: ``predict_mean(counts="sampled")``, the mean over the same number of draws of
  log1p(10,000 x / sum x) of sampled counts, and ``sampled_x4`` the same with 4x the draws;
- ``mean_log_rate``: the mean over the same draws' NB means of log1p(10,000 rho), rho = mu / sum mu
  (a Rao-Blackwellised estimate without count noise, but also without the depth term);
- ``log_mean_rate``: log1p(10,000 mean rho).

Usage::

    python benchmarks/point_statistic.py --data ../shared/data/her2st --out benchmarks/results/her2st-point-statistic.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import her2st as bench  # noqa: E402

import spartha_pyro as sp  # noqa: E402
from spartha_pyro.metrics import normalize_log1p, pcc_gene  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/her2st")
    p.add_argument("--train", nargs="+", default=["C2", "C3", "C4"])
    p.add_argument("--inner", default="C5", help="training section held out to choose (validation)")
    p.add_argument("--outer", default="B4", help="held-out section, reported only")
    p.add_argument("--num-samples", type=int, default=100)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    bargs = bench.parse_args(["--data", args.data])
    sections = [*args.train, args.inner, args.outer]
    adata = bench.prepare(bargs, sorted(sections))
    adata.obsm["histology"] = bench.select_features(adata, bargs.features)
    adata = adata[:, bench.training_genes(adata, [*args.train, args.inner])].copy()
    train = adata[adata.obs["slide"].isin([*args.train, args.inner]).to_numpy()].copy()
    panels = bench.gene_panels(train, bargs)
    t0 = time.time()
    model = sp.SPARTHA(bench.modelled_genes(train, panels, "panels"), histology_key="histology",
                       label_keys="auto", batch_key="slide", qc_key="qc_pass")
    model.train(max_epochs=100, seed=0, validation=[args.inner], refit=False, progress=False)
    out = {"what": __doc__.split("\n\n")[0], "made_by": "python benchmarks/point_statistic.py " + " ".join(argv or sys.argv[1:]),
           "selection": {k: v for k, v in model.selection.items() if k != "message"},
           "seconds_train": round(time.time() - t0, 1), "scores": {}}
    for role, section in (("inner", args.inner), ("outer", args.outer)):
        spots = adata[(adata.obs["slide"] == section).to_numpy()].copy()
        observed = normalize_log1p(spots.X).toarray()
        histology = spots.copy()
        histology.X = None
        expected = model.predict_mean(histology, num_samples=args.num_samples).values
        sampled = model.predict_mean(histology, num_samples=args.num_samples, counts="sampled").values
        sampled_x4 = model.predict_mean(histology, num_samples=4 * args.num_samples, counts="sampled").values
        mu = model.predict_expression(histology, num_samples=args.num_samples, artifact="posterior", value="mean")
        rho = mu.values.astype(np.float64) / mu.values.sum(-1, keepdims=True)
        stats = {"expected": expected, "sampled": sampled, "sampled_x4": sampled_x4, "mean_log_rate": np.log1p(1e4 * rho).mean(0),
                 "log_mean_rate": np.log1p(1e4 * rho.mean(0))}
        modelled = list(mu["gene"].values)
        for panel, genes in panels.items():
            if genes is None:
                continue
            cols, obs_cols = [modelled.index(g) for g in genes], spots.var_names.get_indexer(genes)
            for name, pred in stats.items():
                out["scores"][f"{role}_{section}/{panel}/{name}"] = float(pcc_gene(np.asarray(pred)[:, cols], observed[:, obs_cols]))
        print(role, section, {k: round(v, 4) for k, v in out["scores"].items() if k.startswith(role)}, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
