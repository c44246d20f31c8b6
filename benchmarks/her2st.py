"""her2st benchmark: histology -> expression on held-out sections, poster-style table.

Methods: ``spartha`` (SPARTHA, point metrics from ``artifact="posterior"``),
``spartha_pass`` (the same trained model generating artifact-free spots,
``artifact="pass"``), ``spatialdiva`` (SPARTHA without Z_r), ``histogene``, ``ridge``,
``mean``. Each is trained on the training sections and predicts each held-out section from
histology alone (an AnnData with no genes and only ``obsm["histology"]``).

Scoring space: log1p of counts normalised to 10,000 per spot over ALL genes shared by the
sections, then subset to a panel: ``all``, ``hvg`` (top 2,500 of the training sections),
``top250`` (highest mean on the training sections) and ``hist2st_785`` (the field's panel).
The generative models are scored by their posterior predictive mean in that space, the mean
over draws of ``normalize_log1p(sampled counts)``; QCPR (3/4/5 MADs against the real spots
of the section) is computed on the same draws.

With ``--train-genes panels`` (default, fast) the generative models are trained on the union
of the panels plus one ``__rest__`` column holding each spot's remaining counts, so that the
library size, and hence the normalisation, is the full transcriptome's; ``all`` is then scored
for the point predictors only. ``--train-genes all`` trains them on every gene.

By default the generative models train on every training section for ``--epochs 60``, the
epoch count that early stopping chose on a development split (README). ``--validation C4``
(or ``last``) early-stops on the histology-path ELBO of that TRAINING section instead, never a
test section; with ``--refit`` the model is then retrained on all training sections for the
epoch count that early stopping chose.

Calibration (every method with a predictive distribution): ``coverage50|80|90|95``
(randomised-PIT coverage of central intervals of the counts), ``nll`` (the NB mixture over
posterior draws, nats per spot per gene) and ``crps`` (on log1p-normalised values), from
``--calib-samples`` draws, on the named panels of the modelled columns (``__rest__`` takes
part in the normalisation only). Ridge and the mean get an NB around their prediction
(:class:`~spartha_pyro.baselines.NBWrapper`, dispersion fit on cross-fitted training
predictions, library = the median training library).

``--extra-sections A1 A2 ...`` (or ``all``: the 30 count-only sections) adds the methods
``spartha_all_sections`` (SPARTHA trained on the imaged training sections plus those, cluster
labels; their histology rows are NaN) and ``spartha_all_sections_3labels`` (also the
pathology and dominant deconvolved cell-type labels), for ``--extra-epochs`` epochs. Every
method of such a run is scored on the genes shared by ALL sections read (an unmeasured gene
is not a zero). The disentanglement probe matrix of
SPARTHA's latents (full guide, training sections) versus cluster, slide and QC is scored on
held-out spots and drawn with :func:`spartha_pyro.pl.probe_heatmap`. ``--loso`` holds out every
section in turn. The (method × seed × split) runs go to ``--jobs`` processes (default: one
per CPU core on CPU; the models are too small for intra-op threads to pay).

Example::

    python benchmarks/her2st.py --data ../shared/data/her2st --train-sections B4 C2 C3 C4 \\
        --test-sections C5 --seeds 0 1 2 --out results.json --plot-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sparse  # noqa: E402
import xarray as xr  # noqa: E402
from anndata import AnnData, read_h5ad  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

import spartha_pyro as sp  # noqa: E402
from spartha_pyro.baselines import HisToGene, MeanPredictor, NBWrapper, RidgePredictor  # noqa: E402
from spartha_pyro.datasets.her2st import HER2ST_IMAGED, HER2ST_SECTIONS, dominant_cell_type, read_her2st  # noqa: E402
from spartha_pyro.metrics import calibration_records, format_table, hvg_panel, normalize_log1p, probe_matrix, qcpr, regression_metrics  # noqa: E402
from spartha_pyro.pp.patches import iter_patches  # noqa: E402
from spartha_pyro.train import resolve_device  # noqa: E402

#: SPARTHA trained with the count-only ``--extra-sections`` too, with the cluster labels or with
#: cluster + pathology + dominant deconvolved cell type
EXTRA_METHODS = {"spartha_all_sections": ["cluster"], "spartha_all_sections_3labels": ["cluster", "pathology", "cell_type"]}
METHODS = ("spartha", "spatialdiva", "histogene", "ridge", "mean", *EXTRA_METHODS)
#: table rows; ``spartha_pass`` comes from the ``spartha`` model
ROWS = ("spartha", "spartha_pass", *EXTRA_METHODS, "spatialdiva", "histogene", "ridge", "mean")
PANELS = ("all", "hvg", "top250", "hist2st_785")
#: short names of the feature blocks computed once and cached
BLOCKS = {"lite0": "efficientnet_lite0", "stats": "stats"}
REST = "__rest__"
CALIBRATION = ("coverage50", "coverage80", "coverage90", "coverage95", "nll", "crps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/her2st", help="her2st folder")
    p.add_argument("--train-sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    p.add_argument("--test-sections", nargs="+", default=["C5"])
    p.add_argument(
        "--validation", default="auto",
        help="'auto' (default): the library's default, SPARTHA.train(validation='auto'): the epoch count is chosen "
        "by early stopping on the last training section, then the model is refit on every training section; "
        "'none': train --epochs on all training sections; a section name or 'last': early-stop on it (--refit)",
    )
    p.add_argument(
        "--label-keys", nargs="*", default=["cluster"],
        help="label sets of spartha/spatialdiva: obs columns, 'auto' (clusters of the training expression, the "
        "library's default), or nothing (no label set)",
    )
    p.add_argument("--loso", action="store_true", help="hold out each section in turn (train on the others)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if m not in EXTRA_METHODS])
    p.add_argument(
        "--extra-sections", nargs="+", default=[],
        help="count-only sections (or 'all': the 30 without an image) added to the training of the "
        f"{list(EXTRA_METHODS)} methods; every method then scores on the genes shared by all sections read",
    )
    p.add_argument("--extra-epochs", type=int, default=15, help="epochs of the models trained with the extra sections")
    p.add_argument("--features", default="lite0+stats+nbr", help="'+'-joined blocks among lite0, stats; add 'nbr' for grid-neighbour means")
    p.add_argument("--train-genes", choices=["panels", "all"], default="panels", help="genes the generative models are trained on")
    p.add_argument("--n-hvg", type=int, default=2500)
    p.add_argument("--n-top-mean", type=int, default=250)
    p.add_argument("--epochs", type=int, default=100, help="(max) epochs of SPARTHA/SpatialDIVA (library default 100)")
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--refit", action="store_true", help="retrain on all training sections for the early-stopped epoch count")
    p.add_argument("--histogene-epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=200, help="posterior predictive draws per spot")
    p.add_argument("--calib-samples", type=int, default=100, help="draws per spot scored for calibration (coverage, nll, crps)")
    p.add_argument("--sample-chunk", type=int, default=25, help="draws generated at a time (bounds memory)")
    p.add_argument("--pca", type=int, default=0, help="SPARTHA/SpatialDIVA see this many principal components of the features (0: raw)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON of extra SPARTHA(...) arguments")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--jobs", type=int, default=0,
        help="runs (method x seed x split) in parallel processes; 0: one per CPU core on CPU, 1 on a GPU",
    )
    p.add_argument("--patch-size", type=int, default=112, help="HisToGene patch side, full-resolution px")
    p.add_argument("--cache", default="benchmarks/cache", help="folder for the prepared .h5ad")
    p.add_argument("--out", default="results_her2st.json")
    p.add_argument("--plot-dir", default=None, help="folder for the probe heatmap(s) and matrices")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- data
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
    """Read the sections (inner gene join), annotate QC (5 MADs per slide), compute every
    feature block with its grid-neighbour mean and the HisToGene patches; cached as .h5ad."""
    cache = Path(args.cache) / f"her2st_{'-'.join(sorted(sections))}_features_p{args.patch_size}.h5ad"
    if cache.is_file():
        adata = read_h5ad(cache)
        if "cell_type" not in adata.obs:  # caches written before read_her2st added it
            adata.obs["cell_type"] = dominant_cell_type(adata.obsm["deconv_major"])
        return adata
    adata = read_her2st(args.data, sections=sections, join="inner")
    sp.pp.annotate_qc(adata, batch_key="slide", nmads=5)
    sp.pp.histology_features(adata, list(BLOCKS.values()), key_added="features", neighbors=True, progress=False)
    adata.obsm["patches"] = crop_patches(adata, args.patch_size)
    adata.uns.pop("spatial", None)  # images are not needed after preparation
    cache.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(cache)
    return adata


def prepare_extra(args: argparse.Namespace, imaged: AnnData) -> tuple[AnnData, AnnData]:
    """The count-only ``--extra-sections`` (QC-annotated per section, cached) and ``imaged``,
    both restricted to the genes measured in every section (inner join: a gene missing from
    a section's table is unmeasured there, not zero)."""
    extra = [s for s in HER2ST_SECTIONS if s not in HER2ST_IMAGED] if args.extra_sections == ["all"] else args.extra_sections
    cache = Path(args.cache) / f"her2st_extra_{'-'.join(sorted(extra))}.h5ad"
    if cache.is_file():
        counts_only = read_h5ad(cache)
    else:
        counts_only = read_her2st(args.data, sections=extra, join="inner")
        sp.pp.annotate_qc(counts_only, batch_key="slide", nmads=5)
        counts_only.uns.pop("spatial", None)
        cache.parent.mkdir(parents=True, exist_ok=True)
        counts_only.write_h5ad(cache)
    genes = imaged.var_names[imaged.var_names.isin(counts_only.var_names)]
    return imaged[:, genes].copy(), counts_only[:, genes].copy()


def select_features(adata: AnnData, spec: str) -> np.ndarray:
    """Columns of ``obsm["features"]`` named by ``spec``, e.g. ``"lite0+stats+nbr"``."""
    parts = spec.split("+")
    names = [BLOCKS.get(p) for p in parts if p != "nbr"]
    if not names or None in names:
        raise sp.InputError(f"--features must join blocks among {list(BLOCKS)} (and 'nbr') with '+', got {spec!r}")
    if "nbr" in parts:
        names += [f"{n}_neighbors" for n in names]
    columns = adata.uns["features"]["columns"]
    return np.concatenate([adata.obsm["features"][:, slice(*columns[n])] for n in names], axis=1)


def gene_panels(train: AnnData, args: argparse.Namespace) -> dict[str, list[str] | None]:
    """Panels chosen on the training sections (and the published ``hist2st_785`` list)."""
    mean = np.asarray(normalize_log1p(train.X).mean(0)).ravel()
    hist2st = Path(args.data, "genes", "hist2st_785.txt").read_text().split()
    return {
        "all": None,
        "hvg": hvg_panel(train, n_top=args.n_hvg),
        "top250": list(train.var_names[np.argsort(-mean)[: args.n_top_mean]]),
        "hist2st_785": [g for g in hist2st if g in set(train.var_names)],
    }


def modelled_genes(adata: AnnData, panels: dict, train_genes: str) -> AnnData:
    """``adata`` restricted to the genes a generative model is trained on.

    ``"panels"``: the union of the named panels plus a ``__rest__`` column with the
    remaining counts of each spot (so library sizes stay those of the full transcriptome).
    """
    if train_genes == "all":
        return adata
    genes = list(dict.fromkeys(g for p in panels.values() if p is not None for g in p))
    keep = adata.var_names.get_indexer(genes)
    rest = np.asarray(adata.X.sum(1)).ravel() - np.asarray(adata[:, keep].X.sum(1)).ravel()
    X = sparse.hstack([adata.X[:, keep], sparse.csr_matrix(rest[:, None])], format="csr", dtype=np.float32)
    out = AnnData(X=X, obs=adata.obs.copy(), obsm=dict(adata.obsm))
    out.var_names = genes + [REST]
    return out


# ---------------------------------------------------------------------------- methods
def train_spartha(method: str, train: AnnData, args, seed: int, validation: str | None, label_keys=None, epochs=None) -> sp.SPARTHA:
    """SPARTHA (``artifact_latent`` unless ``"spatialdiva"``) with ``label_keys`` (default
    ``--label-keys``). ``validation="auto"``: the library's default (early stopping on the
    last training section, then a refit on all of them); a section: early-stopped on it, with
    ``--refit`` retrained on every training section for the chosen number of epochs;
    ``None``: trained on every training section for ``epochs`` (default ``--epochs``) epochs."""
    if label_keys is None:
        label_keys = "auto" if args.label_keys == ["auto"] else list(args.label_keys)

    def fit(validation_sections, epochs):
        model = sp.SPARTHA(
            train, histology_key="histology", label_keys=label_keys, batch_key="slide",
            qc_key="qc_pass", artifact_latent=method != "spatialdiva", **args.model_kwargs,
        )
        model.train(
            max_epochs=epochs, batch_size=args.batch_size, validation=validation_sections,
            patience=args.patience, seed=seed, progress=False, device=args.device,
        )
        return model

    epochs = epochs or args.epochs
    if validation is None or validation == "auto":
        return fit(validation, epochs)
    model = fit([validation], epochs)
    if not args.refit:
        return model
    return fit(None, model.selection["epochs"])


def posterior_predictive(model: sp.SPARTHA, adata: AnnData, artifact: str, args, seed: int):
    """Posterior predictive mean in the metric's space, QCPR draws and calibration draws.

    The mean over ``args.num_samples`` draws of ``normalize_log1p(counts)`` (normalised over
    every modelled column, ``__rest__`` included, which is then dropped), generated
    ``args.sample_chunk`` draws at a time with seeds ``seed * 1000 + chunk``. The first
    ``args.calib_samples`` draws are kept, with their NB means (same seeds, so the same
    latent and library draws), for the calibration scores.

    Returns
    -------
    ``(prediction (spots × genes), genes, counts of the first chunk (sample × spot × column),
    (count draws, NB-mean draws, theta) over every modelled column)``.
    """
    total, first, kept, means = None, None, None, None
    n_kept = min(args.calib_samples, args.num_samples)
    n_chunks = -(-args.num_samples // args.sample_chunk)
    for chunk in range(n_chunks):
        start = chunk * args.sample_chunk
        n = min(args.sample_chunk, args.num_samples - start)
        counts = model.predict_expression(adata, num_samples=n, artifact=artifact, seed=seed * 1000 + chunk)
        part = normalize_log1p(counts.values, dtype=np.float32).sum(0)
        total = part if total is None else total + part
        first = counts if first is None else first
        if start < n_kept:  # filled in place: a concatenation would need the draws twice
            if kept is None:
                kept, means = (np.empty((n_kept, *counts.shape[1:]), np.float32) for _ in range(2))
            stop = min(start + n, n_kept)
            kept[start:stop] = counts.values[: stop - start]
            means[start:stop] = model.predict_expression(
                adata, num_samples=n, artifact=artifact, value="mean", seed=seed * 1000 + chunk
            ).values[: stop - start]
    genes = list(first["gene"].values)
    keep = [i for i, g in enumerate(genes) if g != REST]
    return total[:, keep] / args.num_samples, [genes[i] for i in keep], first, (kept, means, model.dispersion)


def nb_baseline(predictor, train: AnnData, test_hist: AnnData, args, seed: int):
    """Calibration draws of a point predictor wrapped in an NB (:class:`NBWrapper`; per-gene
    scale and dispersion fit on section-grouped cross-fitted training predictions, library =
    the median training library), over the modelled columns ``train`` holds."""
    nb = NBWrapper(predictor, group_key="slide", seed=seed).fit(train)
    return nb.sample(test_hist, num_samples=args.calib_samples, seed=seed).values, nb.mean(test_hist)[None], nb.theta_


def pca_histology(train: AnnData, test: AnnData, n_components: int) -> tuple[AnnData, AnnData]:
    """Copies of ``train``/``test`` whose ``obsm["histology"]`` is replaced by the first
    principal components of the standardised features, fit on the training spots only."""
    scaler = StandardScaler().fit(train.obsm["histology"])
    pca = PCA(n_components, random_state=0).fit(scaler.transform(train.obsm["histology"]))
    out = []
    for ad in (train, test):
        ad = ad.copy()
        ad.obsm["histology"] = pca.transform(scaler.transform(ad.obsm["histology"])).astype(np.float32)
        out.append(ad)
    return out[0], out[1]


def probe(model: sp.SPARTHA, seed: int) -> xr.DataArray:
    """Balanced accuracy of linear probes from each SPARTHA latent (full guide, the spots of
    the training sections that have a cluster label) to cluster, slide and QC, fit on 70% of
    the spots, scored on the other 30%."""
    adata, dims = model.adata, model.module.model.dims
    labelled = adata.obs["cluster"].notna().to_numpy()
    latents = {
        f"z_{k}": model.get_latent(latent=k)[labelled] for k in ("y", "d", "r", "x") if f"z_{k}" in dims or (k == "y" and "z_y0" in dims)
    }
    obs = adata.obs[labelled]
    factors = {name: obs[col].astype(str).to_numpy() for name, col in (("cluster", "cluster"), ("slide", "slide"), ("qc", "qc_pass"))}
    n = int(labelled.sum())
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(0.7 * n)
    return probe_matrix(latents, factors, np.sort(perm[:cut]), np.sort(perm[cut:]), seed=seed)


def with_extra_sections(train: AnnData, extra: AnnData) -> AnnData:
    """The imaged training spots and the count-only spots as one AnnData (histology NaN where
    there is no image), via :func:`spartha_pyro.pp.combine_sections`."""
    parts = {"imaged": train, "extra": extra}
    combined = sp.pp.combine_sections(parts, histology_key="histology", batch_key="part", counts_key="has_counts")
    combined.obs["slide"] = combined.obs["slide"].astype(str).astype("category")
    return combined


def run_method(method, train, test, panels, args, seed, validation, extra=None):
    """Predictions for ``test`` from its histology alone: ``{row: (log1p-normalised
    prediction (spots × genes), genes, sampled counts or None, calibration draws or None)}``
    and, for SPARTHA, the probe matrix. Ridge and the mean get their calibration draws from
    an NB around them, fit on the modelled columns (as SPARTHA's)."""
    keep = ["histology", "patches"] if method == "histogene" else ["histology"]
    test_hist = AnnData(obs=test.obs[["slide", "array_x", "array_y"]].copy(), obsm={k: test.obsm[k] for k in keep})
    if method in ("mean", "ridge"):
        scaling = args.model_kwargs.get("histology_scaling", "section")  # ridge sees SPARTHA's features
        section_key = "slide" if scaling == "section" else None
        make = (lambda: MeanPredictor()) if method == "mean" else (
            lambda: RidgePredictor("histology", group_key="slide", section_key=section_key))
        calibration = nb_baseline(make(), modelled_genes(train, panels, args.train_genes), test_hist, args, seed)
        return {method: (make().fit(train).predict(test_hist), train.var_names, None, calibration)}, None
    if method == "histogene":
        model = HisToGene(seed=seed).fit(train, coord_key=("array_x", "array_y"), epochs=args.histogene_epochs)
        return {method: (model.predict(test_hist, coord_key=("array_x", "array_y")), train.var_names, None, None)}, None
    if args.pca:
        train, test_hist = pca_histology(train, test_hist, args.pca)
    if method in EXTRA_METHODS:
        if extra is None:
            raise sp.InputError(f"{method} needs --extra-sections")
        combined = modelled_genes(with_extra_sections(train, extra), panels, args.train_genes)
        model = train_spartha(method, combined, args, seed, validation, EXTRA_METHODS[method], args.extra_epochs)
        return {method: posterior_predictive(model, test_hist, "posterior", args, seed)}, None
    model = train_spartha(method, modelled_genes(train, panels, args.train_genes), args, seed, validation)
    modes = {"spartha": "posterior", "spartha_pass": "pass"} if method == "spartha" else {method: "posterior"}
    out = {row: posterior_predictive(model, test_hist, artifact, args, seed) for row, artifact in modes.items()}
    return out, probe(model, seed) if method == "spartha" else None


# ---------------------------------------------------------------------------- main
def score(pred, genes, counts, calibration, test, obs, panels, args, seed) -> list[dict]:
    """Point metrics on every panel the prediction covers, QCPR from the sampled counts and
    calibration scores (coverage, NB-mixture NLL, CRPS on log1p) from the calibration draws."""
    genes = pd.Index(genes)
    cols = test.var_names.get_indexer(genes)
    covered = {k: v for k, v in panels.items() if (v is None and len(genes) == test.n_vars) or (v is not None and genes.isin(v).sum() == len(v))}
    rows = regression_metrics(pred, obs[:, cols], panels=covered, var_names=genes).to_dict("records")
    if counts is not None:  # QC of the modelled genes (``__rest__`` left out) against the real spots
        generated = counts.sel(gene=list(genes)).values
        rows += [{"panel": "qc", "metric": k, "value": v} for k, v in qcpr(generated, test.X[:, cols], genes).items()]
    if calibration is not None:
        observed = modelled_genes(test, panels, args.train_genes)
        named = {k: v for k, v in panels.items() if v is not None}
        rows += calibration_records(*calibration, observed.X, panels=named, var_names=observed.var_names, seed=seed)
    return rows


#: what every run reads: (every spot, the count-only spots or None, args); set once per process
_SHARED: tuple | None = None


def _init_worker(shared: tuple, threads: int) -> None:
    """Process-pool initialiser: keep the data and cap the intra-op threads of torch and BLAS."""
    global _SHARED
    _SHARED = shared
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


@lru_cache(maxsize=1)  # runs are submitted grouped by split, so a process rarely prepares one twice
def split_data(train_sections: tuple[str, ...], test_section: str) -> tuple[AnnData, AnnData, np.ndarray, dict]:
    """Training spots, test spots, the test spots' log1p-normalised counts and the gene panels."""
    adata, _, args = _SHARED
    train = adata[adata.obs["slide"].isin(train_sections)].copy()
    test = adata[adata.obs["slide"] == test_section].copy()
    return train, test, normalize_log1p(test.X).toarray(), gene_panels(train, args)


def run_task(task: tuple) -> tuple[list[dict], xr.DataArray | None]:
    """One ``(train sections, test section, validation, method, seed)`` run: trains, predicts
    the test section from histology, scores it; returns its records and SPARTHA's probe."""
    _, extra, args = _SHARED
    train_sections, test_section, validation, method, seed = task
    train, test, obs, panels = split_data(train_sections, test_section)
    start = time.perf_counter()
    preds, probe_da = run_method(method, train, test, panels, args, seed, validation, extra)
    seconds = time.perf_counter() - start
    records = []
    for row, (pred, genes, counts, calibration) in preds.items():
        rows = score(pred, genes, counts, calibration, test, obs, panels, args, seed)
        records += [
            {"method": row, "section": test_section, "seed": seed, "seconds": seconds,
             "features": args.features, "train_genes": args.train_genes, **r}
            for r in rows
        ]
        pcc = {r["panel"]: round(r["value"], 4) for r in rows if r["metric"] == "pcc_gene"}
        cov = {r["panel"]: round(r["value"], 3) for r in rows if r["metric"] == "coverage90"}
        print(f"{row:12s} test={test_section} seed={seed} {seconds:7.1f}s pcc_gene={pcc} coverage90={cov}", flush=True)
    return records, probe_da


def n_jobs(jobs: int, device: str, n_tasks: int) -> int:
    """``--jobs``; 0 means one process per CPU core on CPU (the models are too small for
    intra-op threads to pay) and one process on a GPU."""
    if jobs < 0:
        raise sp.InputError(f"--jobs must be >= 0, got {jobs}")
    if jobs == 0:
        jobs = 1 if resolve_device(device).type == "cuda" else os.cpu_count() or 1
    return max(1, min(jobs, n_tasks))


def run_tasks(tasks: list[tuple], shared: tuple, jobs: int):
    """Yield :func:`run_task` results, in ``jobs`` spawned processes of ``cpu_count // jobs``
    threads each when ``jobs > 1`` (in completion order), else in this process in order."""
    if jobs == 1:
        global _SHARED
        _SHARED = shared
        split_data.cache_clear()
        yield from map(run_task, tasks)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(shared, threads)) as pool:
        for future in as_completed([pool.submit(run_task, t) for t in tasks]):
            yield future.result()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sections = list(dict.fromkeys(args.train_sections + args.test_sections))
    adata = prepare(args, sections)
    adata.obsm["histology"] = select_features(adata, args.features)
    extra = None
    if args.extra_sections:
        adata, extra = prepare_extra(args, adata)
        print(f"with --extra-sections: {extra.n_obs} count-only spots from {extra.obs['slide'].nunique()} sections; "
              f"every method scores on the {adata.n_vars} genes all sections share", flush=True)
    splits = (
        [([s for s in sections if s != t], t) for t in sections]
        if args.loso
        else [(args.train_sections, t) for t in args.test_sections]
    )
    tasks = []
    for train_sections, test_section in splits:
        validation = (
            None if args.validation == "none" else "auto" if args.validation == "auto"
            else train_sections[-1] if args.validation == "last" else args.validation
        )
        tasks += [(tuple(train_sections), test_section, validation, method, seed) for method in args.methods for seed in args.seeds]
    jobs = n_jobs(args.jobs, args.device, len(tasks))
    print(f"{len(tasks)} runs (method x seed x split) in {jobs} process(es)", flush=True)
    records: list[dict] = []
    probes: list[xr.DataArray] = []
    start = time.perf_counter()
    for rows, probe_da in run_tasks(tasks, (adata, extra, args), jobs):
        records += rows
        if probe_da is not None:
            probes.append(probe_da)
        Path(args.out).write_text(json.dumps(records, indent=1))  # after every run: a run cut short keeps its records
    Path(args.out).write_text(json.dumps(records, indent=1))
    print(f"{len(tasks)} runs: {time.perf_counter() - start:.0f} s wall clock in {jobs} process(es)", flush=True)
    methods = [r for r in ROWS if any(x["method"] == r for x in records)]
    print(format_table(records, panels=PANELS, methods=methods))
    if any(r["metric"] in CALIBRATION for r in records):
        print("\ncalibration of the predictive distributions (ridge and mean: NB around the point prediction)")
        print(format_table(records, panels=PANELS[1:], metrics=CALIBRATION, qc_metrics=(), methods=methods))
    if probes:
        mean_probe = xr.concat(probes, "run", coords="minimal", compat="override").mean("run").rename("balanced_accuracy")
        print("\nprobe matrix (balanced accuracy, held-out spots, mean over seeds/sections)")
        print(mean_probe.to_pandas().round(3).to_string())
        if args.plot_dir:
            plot_dir = Path(args.plot_dir)
            plot_dir.mkdir(parents=True, exist_ok=True)
            ax = sp.pl.probe_heatmap(mean_probe)
            ax.set_title("SPARTHA latents: linear probes")
            ax.figure.savefig(plot_dir / "probe_heatmap.png", dpi=120)
            plt.close(ax.figure)
            mean_probe.to_pandas().to_csv(plot_dir / "probe_matrix.csv")
    return records


if __name__ == "__main__":
    main()
