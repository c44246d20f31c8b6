"""Paired comparison over held-out sections from her2st.py record files.

Merges record files (``her2st.py --out``), averages each (method, section, panel) over seeds,
and for method ``--a`` against each ``--b`` reports the per-section differences of
``--metric`` and a sign-flip permutation test over sections
(:func:`spartha_pyro.metrics.stats.paired_sign_flip_test`; exact for up to 16 sections; with 5
sections the smallest two-sided p is 0.0625). Only sections where both methods have records
are paired.

Usage::

    python benchmarks/paired.py results/a.json results/b.json --a spartha --b ridge mean \\
        --rename spartha_autolabels=spartha --out benchmarks/results/paired.json
    python benchmarks/paired.py results/new.json results/old.json:ridge,mean --a spartha --b ridge
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from spartha_pyro.metrics.stats import paired_sign_flip_test


def load(files: list[str], rename: dict[str, str], seeds: list[int] | None = None,
         methods: list[str] | None = None) -> pd.DataFrame:
    """Records of ``files`` as one frame, methods renamed by ``rename``, only ``seeds`` (``None``: all).

    ``FILE:M1,M2`` takes only methods ``M1`` and ``M2`` (before renaming) from ``FILE``. The same
    run (method, section, seed) of one of ``methods`` (default: all) in two files is refused:
    averaging two different runs as if they were seeds of one would go unnoticed."""
    frames = []
    for f in files:
        path, colon, only = ("", "", "") if Path(f).exists() else f.rpartition(":")
        path = path or f
        records = json.loads(Path(path).read_text())
        df = pd.DataFrame(records["records"] if isinstance(records, dict) else records).assign(file=path)
        if colon:
            wanted = only.split(",")
            missing = sorted(set(wanted) - set(df["method"]))
            if missing or not only:
                raise SystemExit(f"{f}: methods {missing or '(none named)'} are not in {path}")
            df = df[df["method"].isin(wanted)]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    df["method"] = df["method"].replace(rename)
    df = df if seeds is None else df[df["seed"].isin(seeds)]
    runs = df.drop_duplicates(["method", "section", "seed", "file"])
    runs = runs if methods is None else runs[runs["method"].isin(methods)]
    clash = runs[runs.duplicated(["method", "section", "seed"], keep=False)]
    if not clash.empty:
        first = clash.iloc[0]
        raise SystemExit(f"{first['method']} {first['section']} seed {first['seed']} is in {sorted(set(clash['file']))}: "
                         "take each method from one file (FILE:M1,M2) or rename one (--rename)")
    return df


def compare(df: pd.DataFrame, a: str, bs: list[str], metric: str) -> list[dict]:
    """One record per (b, panel): per-section differences ``a - b`` (seed means) and the sign-flip test."""
    scores = df[df["metric"] == metric].groupby(["method", "panel", "section"])["value"].mean()
    out = []
    for b in bs:
        for panel in sorted(set(scores.loc[a].index.get_level_values(0))):
            sa, sb = scores.loc[(a, panel)], scores.get(b)
            if sb is None or panel not in sb.index.get_level_values(0):
                continue
            sb = sb.loc[panel]
            sections = sorted(set(sa.index) & set(sb.index))
            diffs = [float(sa[s] - sb[s]) for s in sections]
            two, greater = paired_sign_flip_test(diffs), paired_sign_flip_test(diffs, alternative="greater")
            out.append({
                "a": a, "b": b, "panel": panel, "metric": metric, "sections": sections,
                "a_values": [float(sa[s]) for s in sections], "b_values": [float(sb[s]) for s in sections],
                "diffs": diffs, "mean_diff": two.statistic, "a_better_in": int(sum(d > 0 for d in diffs)),
                "p_value_two_sided": two.p_value, "p_value_a_greater": greater.p_value, "min_p_two_sided": two.min_p_value,
            })
    return out


def plot(rows: list[dict], path: str) -> None:
    """Per-section scores of ``a`` and every ``b``, one panel per gene panel (a PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({r["panel"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        here = [r for r in rows if r["panel"] == panel]
        series = {here[0]["a"]: dict(zip(here[0]["sections"], here[0]["a_values"]))}
        series.update({r["b"]: dict(zip(r["sections"], r["b_values"])) for r in here})
        sections = sorted({s for v in series.values() for s in v})
        for k, (method, values) in enumerate(series.items()):
            x = [sections.index(s) for s in values]
            ax.plot(x, list(values.values()), marker="o", lw=2.5 if k == 0 else 1, label=method, zorder=3 if k == 0 else 2)
        ax.set_xticks(range(len(sections)), sections)
        ax.set_title(panel)
        ax.set_xlabel("held-out section")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(rows[0]["metric"])
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--a", required=True, help="method compared with each --b")
    p.add_argument("--b", nargs="+", required=True)
    p.add_argument("--metric", default="pcc_gene")
    p.add_argument("--rename", nargs="*", default=[], help="OLD=NEW method names (to merge runs)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="only these seeds (default: all), e.g. to pair runs made with the same seeds")
    p.add_argument("--out", help="write the comparison records (JSON) here")
    p.add_argument("--plot", help="write a PNG of every method's per-section scores here")
    args = p.parse_args(argv)
    rename = dict(r.split("=", 1) for r in args.rename)
    rows = compare(load(args.files, rename, args.seeds, [args.a, *args.b]), args.a, args.b, args.metric)
    for r in rows:
        per = " ".join(f"{s} {d:+.3f}" for s, d in zip(r["sections"], r["diffs"]))
        print(f"{r['a']} - {r['b']:12s} {r['panel']:12s} mean {r['mean_diff']:+.4f}  better in {r['a_better_in']}/"
              f"{len(r['sections'])}  p(two-sided) {r['p_value_two_sided']:.4f}  [{per}]")
    if args.out:
        Path(args.out).write_text(json.dumps({"made_by": "python benchmarks/paired.py " + " ".join(argv or sys.argv[1:]),
                                              "comparisons": rows}, indent=1))
    if args.plot and rows:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
