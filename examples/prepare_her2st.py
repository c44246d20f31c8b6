"""Prepare her2st for SPARTHA: read, annotate QC, extract histology features, write .h5ad.

Example (from the repository root)::

    python examples/prepare_her2st.py --out /tmp/her2st.h5ad --plot-dir /tmp/her2st_plots

Prints the per-section QC table (spots failing at 3/4/5 MADs) and the peak memory.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import spartha_pyro as sp  # noqa: E402
from spartha_pyro.datasets.her2st import HER2ST_IMAGED  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "her2st",
                        help="her2st folder (default ../shared/data/her2st from the repository root)")
    parser.add_argument("--sections", nargs="+", default=list(HER2ST_IMAGED),
                        help="sections to load (default: the five imaged ones)")
    parser.add_argument("--extractor", nargs="+", default=["efficientnet_lite0", "stats"],
                        help="histology extractor(s), concatenated in order")
    parser.add_argument("--neighbors", action="store_true", help="append the grid-neighbour mean features")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("her2st.h5ad"), help="output .h5ad")
    parser.add_argument("--plot-dir", type=Path, default=None, help="folder for the QC/ERBB2 spatial PNGs")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    adata = sp.datasets.read_her2st(args.data, sections=args.sections)
    print(f"read {adata.n_obs} spots × {adata.n_vars} genes from {len(args.sections)} sections")
    # QC at 3/4/5 MADs (obs["qc_pass"] is the 5-MAD standard) and histology features: the
    # same recipe as `spartha prepare`
    sp.pp.prepare(adata, batch_key="slide", nmads=(3, 4, 5), qc_nmads=5, extractor=args.extractor,
                  neighbors=args.neighbors, device=args.device)
    print(sp.pl.qc_summary(adata, batch_key="slide", nmads=(3, 4, 5)).to_string(float_format="%.3f"))
    if "histology" in adata.obsm:
        print(f"histology features: {adata.obsm['histology'].shape}, columns {adata.uns['histology']['columns']}")
        flagged = adata.obs[["patch_outside", "patch_background"]].sum().to_dict()
        print(f"patches flagged: {flagged}")
    sp.io.write_h5ad(adata, args.out)
    print(f"wrote {args.out}")

    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        section = next((s for s in args.sections if s in adata.uns["spatial"]), args.sections[0])
        sp.pl.spatial(adata, section, color="qc_pass", save=args.plot_dir / f"{section}_qc.png")
        if "ERBB2" in adata.var_names:
            sp.pl.spatial(adata, section, color="ERBB2", save=args.plot_dir / f"{section}_ERBB2.png")
        sp.pl.qc_failures(adata, batch_key="slide", save=args.plot_dir / "qc_failures.png")
        print(f"plots in {args.plot_dir}")

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    print(f"wall {time.perf_counter() - t0:.1f} s, peak memory {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
