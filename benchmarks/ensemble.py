"""Seed ensembles from saved her2st predictions: is the average of several seeds' point
predictions better than one seed?

Reads the ``.npz`` files that ``her2st.py --save-predictions`` writes beside its records,
averages ``--row``'s point predictions (log1p counts per 10,000) over the seeds found for each
held-out section, and scores the average as ``her2st.py`` scores one run (per-gene and per-spot
PCC on each panel, :func:`spartha_pyro.metrics.regression_metrics`) against the section's
measured counts, normalised over the split's gene universe as ``her2st.py`` does. Each single
seed is rescored the same way, as a check against its record (the predictions are stored as
float16). Records: method ``<row>_ensemble`` (seed = number of members) and ``<row>`` per seed.

Usage::

    python benchmarks/ensemble.py runs/*.npz --row spartha --out benchmarks/results/ensemble.json
    python benchmarks/paired.py benchmarks/results/ensemble.json benchmarks/results/her2st-loso-expected.json:ridge,mean \\
        --a spartha_ensemble --b spartha ridge mean
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import her2st as bench  # noqa: E402

from spartha_pyro.metrics import normalize_log1p, regression_metrics  # noqa: E402

SECTIONS = ("B4", "C2", "C3", "C4", "C5")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scores", nargs="+", help=".npz files of her2st.py --save-predictions")
    p.add_argument("--row", default="spartha", help="the row whose seeds are averaged")
    p.add_argument("--data", default="../shared/data/her2st", help="her2st folder (as her2st.py)")
    p.add_argument("--cache", default="benchmarks/cache", help="folder of the prepared .h5ad (as her2st.py)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), help="every section of the leave-one-out")
    p.add_argument("--out", required=True, help="records (JSON)")
    return p.parse_args(argv)


def collect(files: list[str], row: str) -> dict[str, dict[int, tuple[np.ndarray, np.ndarray, dict]]]:
    """``{section: {seed: (prediction (spots × genes) float32, its genes, panels)}}`` of ``row``."""
    out: dict[str, dict] = defaultdict(dict)
    key = re.compile(rf"^pred/{re.escape(row)}/(?P<section>[^/]+)/(?P<seed>-?\d+)$")
    for f in files:
        z = np.load(f, allow_pickle=False)
        for name in z.files:
            m = key.match(name)
            if m is None:
                continue
            sec, seed = m["section"], int(m["seed"])
            panels = {k.rsplit("/", 1)[1]: z[k] for k in z.files if k.startswith(f"panel/{sec}/")}
            if seed in out[sec]:
                raise SystemExit(f"{row} {sec} seed {seed} appears in more than one file")
            out[sec][seed] = (z[name].astype(np.float32), z[f"pred_genes/{row}/{sec}/{seed}"], panels, z[f"spots/{sec}"])
    if not out:
        raise SystemExit(f"no predictions of row {row!r} in {files} (run her2st.py with --save-predictions)")
    return out


def truth(adata, sections: list[str], test: str) -> pd.DataFrame:
    """The held-out section's log1p(counts per 10,000) over the split's gene universe."""
    train = [s for s in sections if s != test]
    genes = bench.training_genes(adata, train)
    spots = adata[(adata.obs["slide"] == test).to_numpy(), genes]
    return pd.DataFrame(normalize_log1p(spots.X).toarray(), index=spots.obs_names, columns=genes)


def records(method: str, section: str, seed: int, pred: np.ndarray, genes, panels: dict, obs: pd.DataFrame) -> list[dict]:
    """Per-gene and per-spot PCC of ``pred`` on each panel its genes cover."""
    genes = pd.Index(genes.astype(str))
    named = {k: [str(g) for g in v] for k, v in panels.items() if set(v.astype(str)) <= set(genes)}
    rows = regression_metrics(pred, obs[genes].to_numpy(), panels=named, var_names=genes).to_dict("records")
    return [{"method": method, "section": section, "seed": seed, **r} for r in rows if r["metric"] in ("pcc_gene", "pcc_spot")]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    found = collect(args.scores, args.row)
    bargs = bench.parse_args(["--data", args.data, "--cache", args.cache, "--loso"])
    adata = bench.prepare(bargs, args.sections)
    out = []
    for sec, by_seed in sorted(found.items()):
        obs = truth(adata, args.sections, sec)
        seeds = sorted(by_seed)
        _, genes, panels, spots = by_seed[seeds[0]]
        obs = obs.loc[spots.astype(str)]
        for seed in seeds:
            pred, g, _, s = by_seed[seed]
            if not (np.array_equal(g, genes) and np.array_equal(s, spots)):
                raise SystemExit(f"{sec}: seed {seed} predicts other genes or spots than seed {seeds[0]}")
            out += records(args.row, sec, seed, pred, genes, panels, obs)
        mean = np.mean([by_seed[s][0] for s in seeds], axis=0)
        out += records(f"{args.row}_ensemble", sec, len(seeds), mean, genes, panels, obs)
        got = {r["panel"]: round(r["value"], 4) for r in out if r["method"].endswith("_ensemble") and r["section"] == sec
               and r["metric"] == "pcc_gene"}
        print(f"{sec}: {len(seeds)} seeds {seeds}; ensemble pcc_gene {got}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    df = pd.DataFrame(out)
    table = df[df["metric"] == "pcc_gene"].assign(member=lambda d: np.where(d["method"].str.endswith("_ensemble"),
                                                                               "ensemble", "single seeds (mean)"))
    print(table.pivot_table(index=["panel", "member"], columns="section", values="value", aggfunc="mean").round(4))
    return out


if __name__ == "__main__":
    main()
