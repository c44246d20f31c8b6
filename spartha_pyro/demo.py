"""The main job on the embedded default: simulate, annotate QC, train, predict, score.

Trains SPARTHA and the SpatialDIVA ablation on two simulated slides, predicts the third
slide from histology alone, and prints the poster-style table (per-gene / per-spot PCC, R²,
MAE, MSE on log1p counts per 10,000; QCPR at 3/4/5 MADs) beside the ridge and
training-mean baselines. Run ``python -m spartha_pyro.demo --help``.
"""
from __future__ import annotations

import argparse
import time

import anndata as ad
import numpy as np

from . import SPARTHA, baselines, datasets, metrics, pp


def run(n_spots: int = 2000, n_genes: int = 1000, epochs: int = 60, num_samples: int = 10, seed: int = 0,
        device: str = "auto", progress: bool = True) -> list[dict]:
    """Train and score every method on the simulated default; returns the metric records."""
    adata = datasets.simulate(n_spots=n_spots, n_genes=n_genes, seed=seed)
    pp.annotate_qc(adata, batch_key="slide")
    test_slide = adata.obs["slide"].cat.categories[-1]
    is_test = (adata.obs["slide"] == test_slide).to_numpy()
    train, test = adata[~is_test].copy(), adata[is_test].copy()
    histology_only = ad.AnnData(obs=test.obs[[]].copy(), obsm={"histology": test.obsm["histology"]})
    observed = metrics.normalize_log1p(test.X)
    panels = {"all": None, "hvg": metrics.hvg_panel(train, n_top=min(2500, n_genes // 2))}

    records = []

    def score(method: str, pred_log1p: np.ndarray, counts=None):
        df = metrics.regression_metrics(pred_log1p, observed, panels=panels, var_names=list(adata.var_names))
        records.extend({"method": method, "seed": seed, "section": test_slide, **r} for r in df.to_dict("records"))
        if counts is not None:
            for name, value in metrics.qcpr(counts, test.X, list(adata.var_names)).items():
                records.append({"method": method, "panel": "all", "metric": name, "seed": seed, "section": test_slide, "value": value})

    for method, artifact_latent in (("spartha", True), ("spatialdiva", False)):
        t = time.time()
        model = SPARTHA(train, label_keys=["cell_type"], batch_key="slide", artifact_latent=artifact_latent)
        model.train(max_epochs=epochs, batch_size=256, seed=seed, device=device, progress=progress)
        counts = model.predict_expression(histology_only, num_samples=num_samples, artifact="pass", seed=seed)
        pred = metrics.normalize_log1p(counts.values).mean(0)  # posterior predictive mean in the metric's space
        score(method, pred, counts.values)
        print(f"{method}: trained and predicted in {time.time() - t:.1f} s")
    for method, predictor in (("ridge", baselines.RidgePredictor()), ("mean", baselines.MeanPredictor())):
        score(method, predictor.fit(train).predict(test))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-spots", type=int, default=2000)
    parser.add_argument("--n-genes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    records = run(args.n_spots, args.n_genes, args.epochs, args.num_samples, args.seed, args.device)
    print()
    print(metrics.format_table(records, methods=["spartha", "spatialdiva", "ridge", "mean"]))


if __name__ == "__main__":
    main()
