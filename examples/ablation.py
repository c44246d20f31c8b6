"""SPARTHA vs SpatialDIVA (no artifact latent) on the same data and the same held-out section.

Both models are trained with the same settings and seed on the training sections and
predict the held-out section from histology alone (artifact-free generation,
``artifact="pass"``); the table reports per-gene / per-spot PCC, R², MAE and MSE on
log1p(counts per 10,000) on all genes and on the training HVGs, and QCPR (the share of
generated spots that pass the real section's 3/4/5-MAD QC). Ridge and the training mean
are printed as the floor to beat. Training, scoring and the split reuse
:mod:`spartha_pyro.demo` (``holdout_split``, ``fit_predict``, ``score``).

Examples::

    python examples/ablation.py                                     # simulated, small and fast
    python examples/ablation.py --data ../shared/data/her2st --num-epochs 40 --validation C4
    python examples/ablation.py --h5ad her2st.h5ad --test-section C5 --cuda
"""
from __future__ import annotations

import argparse
from pathlib import Path

import spartha_pyro as sp
from spartha_pyro import baselines
from spartha_pyro.demo import ABLATION, example_data, fit_predict, holdout_split, score


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the ablation; prints the table and returns the metric records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="her2st folder (5 imaged sections, 'stats' features)")
    parser.add_argument("--h5ad", type=Path, help="an .h5ad prepared by examples/prepare_her2st.py")
    parser.add_argument("--test-section", help="held-out section (default: the last)")
    parser.add_argument("--validation", nargs="+", help="training sections for early stopping (e.g. C4)")
    parser.add_argument("--n-spots", type=int, default=450, help="simulated spots")
    parser.add_argument("--n-genes", type=int, default=150, help="simulated genes")
    parser.add_argument("--num-epochs", type=int, default=20, help="epochs per model")
    parser.add_argument("--num-samples", type=int, default=10, help="posterior predictive draws")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of both models")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and draws")
    parser.add_argument("--cuda", action="store_true", help="train on CUDA")
    args = parser.parse_args(argv)

    adata, label_key = example_data(args.h5ad, args.data, args.n_spots, args.n_genes, args.seed)
    train, test, histology_only = holdout_split(adata, "slide", args.test_section)
    panels = {"all": None, "hvg": sp.metrics.hvg_panel(train, n_top=min(2500, train.n_vars // 2))}
    test = test[:, train.var_names].copy()
    records = []
    for method, artifact_latent in ABLATION.items():
        _, counts = fit_predict(
            train, histology_only, artifact_latent, label_keys=[label_key], epochs=args.num_epochs,
            num_samples=args.num_samples, seed=args.seed, device="cuda" if args.cuda else "cpu", progress=False,
            model_kwargs={"hidden": args.hidden},
            train_kwargs={"validation": args.validation, "lr": 3e-3, "batch_size": 128},
        )
        pred = sp.metrics.normalize_log1p(counts.values).mean(0)
        records += score(method, pred, test, panels, counts.values, args.seed)
        print(f"{method}: done")
    for method, predictor in (("ridge", baselines.RidgePredictor()), ("mean", baselines.MeanPredictor())):
        records += score(method, predictor.fit(train).predict(test), test, panels, seed=args.seed)
    print()
    print(sp.metrics.format_table(records, methods=[*ABLATION, "ridge", "mean"]))
    return records


if __name__ == "__main__":
    main()
