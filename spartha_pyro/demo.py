"""The main job on the embedded default: simulate, annotate QC, train, predict, score.

Trains SPARTHA and the SpatialDIVA ablation on two simulated slides with their default
settings (epochs chosen on the training slides alone), predicts the third slide from
histology alone, and prints two tables beside the ridge (same per-section standardised
features) and training-mean baselines:

1. against the held-out slide's **measured** counts (artifacts and all): every method's
   point prediction of log1p(counts per 10,000); SPARTHA and SpatialDIVA with their
   posterior-predictive mean (``artifact="posterior"``) blended with their linear histology
   path, and the same models alone (``*_model_only``);
2. against the simulator's **artifact-free truth** (``layers["clean"]``): the same, plus
   SPARTHA's artifact-free generation (``artifact="pass"``), the prediction it is built for.

Per-gene PCC is the headline (per-spot PCC is high even for the training mean); QCPR at
3/4/5 MADs of artifact-free generated counts follows. Run ``python -m spartha_pyro.demo --help``.

The pieces (:func:`holdout_split`, :func:`fit_predict`, :func:`score`) are reused by
``examples/ablation.py`` and the notebooks on real data.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import xarray as xr

from . import SPARTHA, baselines, datasets, metrics, pp
from ._errors import InputError

#: the methods of the ablation: name -> ``artifact_latent``
ABLATION = {"spartha": True, "spatialdiva": False}
#: rows of the table against measured counts (``*_model_only``: the VAE without its linear path)
MEASURED_ROWS = ("spartha", "spartha_model_only", "spatialdiva", "spatialdiva_model_only", "ridge", "mean")


def example_data(h5ad=None, data=None, n_spots: int = 450, n_genes: int = 150, seed: int = 0) -> tuple[ad.AnnData, str]:
    """``(adata, label key)`` for the examples: simulated by default, her2st otherwise.

    Parameters
    ----------
    h5ad
        An ``.h5ad`` prepared by ``examples/prepare_her2st.py`` (label key ``"cluster"``).
    data
        A her2st folder: its five imaged sections are read, QC-annotated and given the fast
        ``"stats"`` histology features (66 colour/texture statistics).
    n_spots, n_genes, seed
        Size and seed of the simulated data (label key ``"cell_type"``).
    """
    if h5ad is not None:
        return datasets.load(h5ad, kind="h5ad"), "cluster"
    if data is not None:
        adata = datasets.read_her2st(data, sections=list(datasets.her2st.HER2ST_IMAGED))
        pp.annotate_qc(adata, batch_key="slide")
        pp.histology_features(adata, extractor="stats", progress=False)
        return adata, "cluster"
    adata = datasets.simulate(n_spots=n_spots, n_genes=n_genes, histology_dim=32, seed=seed)
    pp.annotate_qc(adata, batch_key="slide")
    return adata, "cell_type"


def holdout_split(adata: ad.AnnData, batch_key: str = "slide", test: str | None = None) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """Hold out one whole section: ``(train, test, test with histology only)``.

    Parameters
    ----------
    adata
        All spots, with ``obs[batch_key]`` and ``obsm["histology"]``.
    batch_key
        ``obs`` column of the section.
    test
        Section to hold out (default: the last category).

    Returns
    -------
    Copies of the training spots, the test spots, and the test spots stripped to
    ``obs`` + ``obsm["histology"]`` (what a new slide without counts looks like).
    """
    sections = adata.obs[batch_key].astype("category").cat.categories
    test = str(sections[-1]) if test is None else str(test)
    is_test = (adata.obs[batch_key].astype(str) == test).to_numpy()
    if not is_test.any() or is_test.all():
        raise InputError(f"test section {test!r} must hold some, not all, spots of obs[{batch_key!r}] ({list(sections)})")
    train, held = adata[~is_test].copy(), adata[is_test].copy()
    histology_only = ad.AnnData(obs=held.obs[[]].copy(), obsm={"histology": held.obsm["histology"]})
    return train, held, histology_only


def fit_predict(
    train: ad.AnnData,
    histology_only: ad.AnnData,
    artifact_latent: bool = True,
    label_keys: Sequence[str] = ("cell_type",),
    batch_key: str = "slide",
    epochs: int = 60,
    num_samples: int = 10,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    model_kwargs: Mapping | None = None,
    train_kwargs: Mapping | None = None,
) -> tuple[SPARTHA, xr.DataArray]:
    """Train one SPARTHA (or SpatialDIVA with ``artifact_latent=False``) and predict from histology.

    Parameters
    ----------
    train
        Training spots (raw counts, ``obsm["histology"]``, ``obs["qc_pass"]``).
    histology_only
        Spots to predict (histology only).
    artifact_latent
        ``False`` is the SpatialDIVA ablation.
    label_keys, batch_key
        Label sets and batch column (see :class:`~spartha_pyro.SPARTHA`).
    epochs, num_samples, seed, device, progress
        Training epochs, posterior predictive draws, seed, device, progress bar.
    model_kwargs, train_kwargs
        Extra arguments of :class:`~spartha_pyro.SPARTHA` and :meth:`~spartha_pyro.SPARTHA.train`.

    Returns
    -------
    The trained model and the sampled counts ``(sample, spot, gene)`` with ``artifact="pass"``.
    """
    model = SPARTHA(train, label_keys=list(label_keys), batch_key=batch_key, artifact_latent=artifact_latent,
                    **dict(model_kwargs or {}))
    model.train(**{"max_epochs": epochs, "batch_size": 256, "seed": seed, "device": device, "progress": progress,
                   **dict(train_kwargs or {})})
    counts = model.predict_expression(histology_only, num_samples=num_samples, artifact="pass", seed=seed)
    return model, counts


def score(
    method: str,
    pred_log1p: np.ndarray,
    test: ad.AnnData,
    panels: Mapping[str, object],
    generated_counts=None,
    seed: int = 0,
    truth: np.ndarray | None = None,
) -> list[dict]:
    """Metric records of one method on a held-out section.

    Parameters
    ----------
    method
        Row name in the table.
    pred_log1p
        Predicted log1p-normalised expression ``(n_spots, n_genes)`` in ``test``'s gene order.
    test
        The held-out spots with observed counts (and ``obs["slide"]``).
    panels
        Gene panels for :func:`~spartha_pyro.metrics.regression_metrics`.
    generated_counts
        Sampled counts ``(sample, spot, gene)`` for QCPR; ``None`` skips QCPR.
    seed
        Recorded with each value.
    truth
        Log1p-normalised expression to score against instead of ``test``'s counts (e.g. the
        simulator's artifact-free truth); records then carry ``truth="clean"``.

    Returns
    -------
    Records ``{"method", "seed", "section", "truth", "panel", "metric", "value"}`` for
    :func:`~spartha_pyro.metrics.format_table`.
    """
    section = ",".join(map(str, test.obs["slide"].astype(str).unique())) if "slide" in test.obs else "test"
    observed = metrics.normalize_log1p(test.X) if truth is None else truth
    df = metrics.regression_metrics(np.asarray(pred_log1p), observed, panels=panels, var_names=list(test.var_names))
    base = {"method": method, "seed": seed, "section": section, "truth": "measured" if truth is None else "clean"}
    records = [{**base, **r} for r in df.to_dict("records")]
    if generated_counts is not None:
        for name, value in metrics.qcpr(generated_counts, test.X, list(test.var_names)).items():
            records.append({**base, "panel": "all", "metric": name, "value": value})
    return records


def run(n_spots: int = 2000, n_genes: int = 1000, num_samples: int = 100, seed: int = 0,
        device: str = "auto", progress: bool = True, max_epochs: int = 100) -> list[dict]:
    """Train and score every method on the simulated default; returns the metric records."""
    adata = datasets.simulate(n_spots=n_spots, n_genes=n_genes, seed=seed)
    pp.annotate_qc(adata, batch_key="slide")
    train, test, histology_only = holdout_split(adata)
    panels = {"all": None, "hvg": metrics.hvg_panel(train, n_top=min(2500, n_genes // 2))}
    clean = np.log1p(test.layers["clean"])
    records = []
    for method, artifact_latent in ABLATION.items():
        t = time.time()
        model = SPARTHA(train, label_keys=["cell_type"], batch_key="slide", artifact_latent=artifact_latent)
        model.train(max_epochs=max_epochs, seed=seed, device=device, progress=progress)  # epochs chosen on the training slides
        posterior = model.predict_mean(histology_only, num_samples, artifact="posterior", seed=seed).values
        records += score(method, posterior, test, panels, seed=seed)
        records += score(method, posterior, test, panels, seed=seed, truth=clean)
        if model.linear_path is not None:  # the VAE alone, without the linear histology path blended in
            alone = model.predict_mean(histology_only, num_samples, artifact="posterior", seed=seed, linear_path=False)
            records += score(f"{method}_model_only", alone.values, test, panels, seed=seed)
        if artifact_latent:
            free = model.predict_mean(histology_only, num_samples, artifact="pass", seed=seed).values
            generated = model.predict_expression(histology_only, num_samples=10, artifact="pass", seed=seed).values
            records += score(f"{method}_pass", free, test, panels, generated, seed=seed, truth=clean)
        print(f"{method}: {model.selection['message']}; trained and predicted in {time.time() - t:.0f} s")
    ridge = baselines.RidgePredictor(section_key="slide")
    for method, predictor in (("ridge", ridge), ("mean", baselines.MeanPredictor())):
        pred = predictor.fit(train).predict(test)
        records += score(method, pred, test, panels, seed=seed)
        records += score(method, pred, test, panels, seed=seed, truth=clean)
    return records


def main(argv: list[str] | None = None) -> None:
    """Command line of the demo (``python -m spartha_pyro.demo``; ``spartha demo`` is the same)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    report(parser.parse_args(argv))


def verdict(records: list[dict], truth: str, methods: Sequence[str], panel: str = "hvg") -> str:
    """One sentence naming the best method by per-gene PCC on ``panel`` against ``truth``."""
    df = pd.DataFrame(records)
    df = df[(df["truth"] == truth) & (df["panel"] == panel) & (df["metric"] == "pcc_gene") & df["method"].isin(methods)]
    scores = df.groupby("method")["value"].mean().sort_values(ascending=False)
    ranking = ", ".join(f"{m} {v:.3f}" for m, v in scores.items())
    return f"per-gene PCC on {panel.upper()} against the {truth} expression: {ranking} (best: {scores.index[0]})"


def report(args: argparse.Namespace) -> list[dict]:
    """Run the demo with parsed :func:`add_arguments` options and print the tables; returns the records."""
    records = run(args.n_spots, args.n_genes, args.num_samples, args.seed, args.device,
                  progress=getattr(args, "progress", True), max_epochs=args.max_epochs)
    measured = [r for r in records if r["truth"] == "measured"]
    clean = [r for r in records if r["truth"] == "clean"]
    print("\n1. Against the held-out slide's measured counts (point predictions; VAEs: artifact='posterior')")
    rows = [m for m in MEASURED_ROWS if any(r["method"] == m for r in measured)]
    print(metrics.format_table(measured, methods=rows))
    print("\n2. Against the simulator's artifact-free truth (spartha_pass: artifact='pass'; QCPR of its draws)")
    print(metrics.format_table(clean, methods=["spartha_pass", "spartha", "spatialdiva", "ridge", "mean"]))
    print()
    print(verdict(records, "measured", rows))
    print(verdict(records, "clean", ["spartha_pass", "spartha", "spatialdiva", "ridge", "mean"]))
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser`` (shared with ``spartha demo``)."""
    parser.add_argument("--n-spots", type=int, default=2000, help="simulated spots over 3 slides (default 2000)")
    parser.add_argument("--n-genes", type=int, default=1000, help="simulated genes (default 1000)")
    parser.add_argument("--max-epochs", type=int, default=100,
                        help="most epochs per model; early stopping on a training slide chooses how many (default 100)")
    parser.add_argument("--num-samples", type=int, default=100,
                        help="posterior predictive draws averaged per spot (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and sampling (default 0)")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda")


if __name__ == "__main__":
    main()
