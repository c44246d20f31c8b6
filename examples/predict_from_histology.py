"""Predict expression for a new slide that has histology only, with a saved SPARTHA model.

Writes

- an ``.h5ad`` with ``X`` = the predictive mean of log1p(counts per 10,000), count noise
  integrated out (:meth:`spartha_pyro.SPARTHA.predict_mean`), and the layers ``sd``, ``q05``,
  ``q50``, ``q95`` (same space) and ``counts_mean`` of the draws
  (:func:`spartha_pyro.predictions.summarize_samples`);
- a NetCDF file with every posterior predictive draw, dims ``(sample, spot, gene)``, for
  uncertainty analysis with xarray (:func:`spartha_pyro.predictions.write_samples`).

With no arguments it first trains a tiny model on two simulated slides, saves it to a
temporary folder, and predicts the third slide from its histology alone. With ``--model``
and ``--h5ad`` it predicts the spots of an existing ``.h5ad`` (optionally only
``--sections``): counts in that file are ignored, only ``obsm["histology"]`` is used.

Examples::

    python examples/predict_from_histology.py
    python examples/predict_from_histology.py --data ../shared/data/her2st --test-section C5
    python examples/predict_from_histology.py --model my_model/ --h5ad her2st.h5ad --sections C5 --out pred.h5ad
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

import spartha_pyro as sp
from spartha_pyro.demo import holdout_split
from spartha_pyro.predictions import summarize_samples, write_samples


def train_tiny(adata: ad.AnnData, label_key: str, model_dir: Path, args: argparse.Namespace) -> None:
    """Train a small SPARTHA on ``adata`` and save it to ``model_dir``."""
    model = sp.SPARTHA(adata, label_keys=[label_key], batch_key="slide", hidden=64, y_dim=8, d_dim=4, r_dim=4, x_dim=4)
    model.train(max_epochs=args.num_epochs, batch_size=128, lr=3e-3, seed=args.seed,
                device="cuda" if args.cuda else "cpu", progress=False)
    model.save(model_dir, overwrite=True)
    print(f"trained {model} and saved it to {model_dir}")


def new_slide(args: argparse.Namespace, model_dir: Path) -> tuple[ad.AnnData, ad.AnnData | None]:
    """The histology-only slide to predict and, when known, its observed counts.

    Trains and saves a model first unless ``--model`` is given.
    """
    if args.model is not None:
        adata = sp.datasets.load(args.h5ad, kind="h5ad", sections=args.sections)
        return ad.AnnData(obs=adata.obs.copy(), obsm={"histology": adata.obsm["histology"]}), adata
    if args.data is not None:
        adata = sp.datasets.read_her2st(args.data, sections=list(sp.datasets.her2st.HER2ST_IMAGED))
        sp.pp.annotate_qc(adata, batch_key="slide")
        sp.pp.histology_features(adata, extractor="stats", progress=False)
        label_key = "cluster"
    else:
        adata = sp.datasets.simulate(n_spots=args.n_spots, n_genes=args.n_genes, histology_dim=32, seed=args.seed)
        sp.pp.annotate_qc(adata, batch_key="slide")
        label_key = "cell_type"
    train, test, histology_only = holdout_split(adata, "slide", args.test_section)
    train_tiny(train, label_key, model_dir, args)
    histology_only.obsm["spatial"] = test.obsm["spatial"]
    return histology_only, test


def main(argv: list[str] | None = None) -> None:
    """Load a saved model, predict a histology-only slide, write ``.h5ad`` + NetCDF."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="saved model folder (default: train a tiny one first)")
    parser.add_argument("--h5ad", type=Path, help="with --model: the .h5ad whose spots to predict")
    parser.add_argument("--sections", nargs="+", help="with --h5ad: predict only these obs['slide'] sections")
    parser.add_argument("--data", type=Path, help="her2st folder: train on 4 imaged sections, predict the held-out one")
    parser.add_argument("--test-section", help="held-out section when training here (default: the last)")
    parser.add_argument("--out", type=Path, default=None, help="output .h5ad (default in a temporary folder)")
    parser.add_argument("--n-spots", type=int, default=450, help="simulated spots (3 slides)")
    parser.add_argument("--n-genes", type=int, default=150, help="simulated genes")
    parser.add_argument("--num-samples", type=int, default=20, help="posterior predictive draws per spot")
    parser.add_argument("--num-epochs", type=int, default=20, help="epochs of the tiny model trained here")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and draws")
    parser.add_argument("--cuda", action="store_true", help="use CUDA")
    args = parser.parse_args(argv)
    if (args.model is None) != (args.h5ad is None):
        parser.error("--model and --h5ad go together")

    workdir = Path(tempfile.mkdtemp(prefix="spartha_predict_"))
    model_dir = args.model or workdir / "model"
    slide, observed = new_slide(args, model_dir)

    # the model is loaded without its training data: prediction needs only the saved state
    model = sp.SPARTHA.load(model_dir, device="cuda" if args.cuda else "cpu")
    samples = model.predict_expression(slide, num_samples=args.num_samples, artifact="pass", seed=args.seed)
    pred = summarize_samples(samples, obs=slide.obs, quantiles=(0.05, 0.5, 0.95))
    pred.X = model.predict_mean(slide, num_samples=args.num_samples, artifact="pass", seed=args.seed).values
    if "spatial" in slide.obsm:
        pred.obsm["spatial"] = np.asarray(slide.obsm["spatial"])

    out = args.out or workdir / "predicted.h5ad"
    sp.io.write_h5ad(pred, out)
    nc = write_samples(samples, out.with_suffix(".nc"))
    print(f"wrote {out} (layers {list(pred.layers)}) and {nc} ({dict(samples.sizes)})")

    width = pred.layers["q95"] - pred.layers["q05"]
    print(f"mean 90% interval width: {width.mean():.3f} log1p units; mean posterior sd {pred.layers['sd'].mean():.3f}")
    if observed is not None and pred.var_names.isin(observed.var_names).all():
        obs = sp.metrics.normalize_log1p(observed[:, list(pred.var_names)].X)
        inside = (obs >= pred.layers["q05"]) & (obs <= pred.layers["q95"])
        print(f"observed values inside the 90% interval: {np.asarray(inside).mean():.1%}; "
              f"PCC per gene {sp.metrics.pcc_gene(pred.X, obs):.3f}")


if __name__ == "__main__":
    main()
