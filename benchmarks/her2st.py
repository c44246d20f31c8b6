"""her2st benchmark: histology -> expression on held-out sections, poster-style table.

Methods: ``spartha`` (SPARTHA), ``spatialdiva`` (SPARTHA without Z_r), ``histogene``,
``ridge``, ``mean``. Each is trained on the training sections and scored on each held-out
section in log1p-normalised space (10,000 per spot over the genes shared by the sections
read) on the ``all`` and ``hvg`` (top 2,500 of the training sections) panels, plus QCPR for
the generative models. ``--loso`` holds out every section in turn instead.

Example::

    python benchmarks/her2st.py --methods mean ridge --seeds 0 --out results_her2st.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData, read_h5ad

import spartha_pyro as sp
from spartha_pyro.baselines import HisToGene, MeanPredictor, RidgePredictor
from spartha_pyro.datasets.her2st import read_her2st
from spartha_pyro.metrics import format_table, hvg_panel, normalize_log1p, qcpr, regression_metrics
from spartha_pyro.pp.patches import iter_patches

METHODS = ("spartha", "spatialdiva", "histogene", "ridge", "mean")
NEEDS_FEATURES = {"spartha", "spatialdiva", "ridge"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/her2st", help="her2st folder")
    p.add_argument("--train-sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    p.add_argument("--test-sections", nargs="+", default=["C5"])
    p.add_argument("--loso", action="store_true", help="hold out each section in turn (train on the others)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--panel", choices=["all", "hvg", "both"], default="both")
    p.add_argument("--n-hvg", type=int, default=2500)
    p.add_argument("--epochs", type=int, default=100, help="max epochs of SPARTHA/SpatialDIVA")
    p.add_argument("--histogene-epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=20, help="posterior predictive draws per spot")
    p.add_argument("--histology-key", default="histology")
    p.add_argument("--patch-size", type=int, default=112, help="HisToGene patch side, full-resolution px")
    p.add_argument("--cache", default="benchmarks/cache", help="folder for the prepared .h5ad")
    p.add_argument("--out", default="results_her2st.json")
    return p.parse_args(argv)


def crop_patches(adata: AnnData, size: int) -> np.ndarray:
    """uint8 patches ``(n_spots, size, size, 3)`` centred on each spot (full-resolution pixels)."""
    out = np.zeros((adata.n_obs, size, size, 3), dtype=np.uint8)
    seen = np.zeros(adata.n_obs, dtype=bool)
    for idx, batch in iter_patches(adata, patch_size=size):
        out[idx], seen[idx] = batch, True
    if not seen.all():
        missing = adata.obs["slide"][~seen].astype(str).unique().tolist()
        raise sp.InputError(f"sections {missing} have no image: HisToGene needs patches")
    return out


def prepare(args: argparse.Namespace, sections: list[str]) -> AnnData:
    """Read the sections (inner gene join), annotate QC, add features/patches; cached as .h5ad."""
    cache = Path(args.cache) / f"her2st_{'-'.join(sorted(sections))}_{args.histology_key}_p{args.patch_size}.h5ad"
    if cache.is_file():
        return read_h5ad(cache)
    adata = read_her2st(args.data, sections=sections, join="inner")
    sp.pp.annotate_qc(adata, batch_key="slide")
    if NEEDS_FEATURES & set(args.methods):
        sp.pp.histology_features(adata)
        if args.histology_key not in adata.obsm:
            raise sp.InputError(f"histology_features did not write obsm[{args.histology_key!r}]")
    if "histogene" in args.methods:
        adata.obsm["patches"] = crop_patches(adata, args.patch_size)
    adata.uns.pop("spatial", None)  # images are not needed after preparation
    cache.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(cache)
    return adata


def predict(method: str, train: AnnData, test: AnnData, args, seed: int, val_section: str | None):
    """Point prediction (log1p-normalised, test spots × training genes) and, for generative
    methods, the sampled counts ``(sample, spot, gene)``."""
    if method == "mean":
        return MeanPredictor().fit(train).predict(test), None
    if method == "ridge":
        return RidgePredictor(args.histology_key, group_key="slide").fit(train).predict(test), None
    if method == "histogene":
        model = HisToGene(seed=seed).fit(train, coord_key=("array_x", "array_y"), epochs=args.histogene_epochs)
        return model.predict(test, coord_key=("array_x", "array_y")), None
    model = sp.SPARTHA(
        train,
        histology_key=args.histology_key,
        label_keys=["cluster"],
        batch_key="slide",
        qc_key="qc_pass",
        artifact_latent=method == "spartha",
    )
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        validation=[val_section] if val_section else None,
        seed=seed,
        progress=False,
    )
    histology_only = AnnData(obs=test.obs[[]].copy(), obsm={args.histology_key: test.obsm[args.histology_key]})
    counts = model.predict_expression(
        histology_only, num_samples=args.num_samples, artifact="pass" if method == "spartha" else "posterior", seed=seed
    )
    counts = counts.sel(gene=list(train.var_names))
    return normalize_log1p(counts.values, dtype=np.float32).mean(0), counts.values


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sections = list(dict.fromkeys(args.train_sections + args.test_sections))
    adata = prepare(args, sections)
    splits = (
        [([s for s in sections if s != t], t) for t in sections]
        if args.loso
        else [(args.train_sections, t) for t in args.test_sections]
    )
    records: list[dict] = []
    for train_sections, test_section in splits:
        train = adata[adata.obs["slide"].isin(train_sections)].copy()
        test = adata[adata.obs["slide"] == test_section].copy()
        obs = normalize_log1p(test.X).toarray()
        panels = {}
        if args.panel in ("all", "both"):
            panels["all"] = None
        if args.panel in ("hvg", "both"):
            panels["hvg"] = hvg_panel(train, n_top=args.n_hvg)
        val_section = train_sections[-1] if len(train_sections) > 1 else None
        for method in args.methods:
            for seed in args.seeds:
                start = time.perf_counter()
                pred, counts = predict(method, train, test, args, seed, val_section)
                seconds = time.perf_counter() - start
                scores = regression_metrics(pred, obs, panels=panels, var_names=test.var_names)
                rows = scores.to_dict("records")
                if counts is not None:
                    rows += [
                        {"panel": "all", "metric": k, "value": v}
                        for k, v in qcpr(counts, test.X, test.var_names).items()
                    ]
                records += [{"method": method, "section": test_section, "seed": seed, **r} for r in rows]
                pcc = scores.query("metric == 'pcc_gene'").set_index("panel")["value"].round(4).to_dict()
                print(f"{method:12s} test={test_section} seed={seed} {seconds:7.1f}s pcc_gene={pcc}", flush=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    print(format_table(records, methods=[m for m in METHODS if m in args.methods]))
    return records


if __name__ == "__main__":
    main()
