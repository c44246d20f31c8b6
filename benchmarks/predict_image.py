"""`spartha predict-image` benchmarks: image grid vs real spots on her2st, and a 40k × 40k slide.

(a) ``her2st``: train on the imaged training sections (features by ``histology_features``,
    so the model records its recipe), then predict the held-out section twice: from its real
    spots' features, and from its image alone (:func:`spartha_pyro.image.predict_image`),
    reading the grid at each real spot's nearest pseudo-spot. Reports grid coverage (real
    spots with a pseudo-spot within 0.75 spacings) and per-gene PCC against the measured
    counts for both (target: within 0.02), on the training grid and on refinements of it
    (``--subdivide 1 2``: pseudo-spots every spacing and every half spacing).
(b) ``big``: writes a synthetic 40,000 × 40,000 px pyramidal JPEG TIFF (tiles generated on
    the fly, never in memory) and runs predict-image on it in a subprocess, reporting its peak
    host memory (the child's own VmHWM) and spots/s (target: < 2 GB).

Usage::

    python benchmarks/predict_image.py her2st --data ../shared/data/her2st
    python benchmarks/predict_image.py big --size 40000
    python benchmarks/predict_image.py all --data ../shared/data/her2st --json benchmarks/results/predict_image.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- (a) her2st
def run_her2st(args: argparse.Namespace) -> dict:
    import spartha_pyro as sp
    from scipy.spatial import cKDTree
    from spartha_pyro.datasets import read_her2st
    from spartha_pyro.image import predict_image
    from spartha_pyro.metrics import normalize_log1p, pcc_gene

    t0 = time.perf_counter()
    sections = [*args.train_sections, args.test_section]
    adata = read_her2st(args.data, sections=sections, join="inner")
    panel = [g for g in Path(args.data, "genes", "hist2st_785.txt").read_text().split() if g in set(adata.var_names)]
    adata = adata[:, panel].copy()
    sp.pp.annotate_qc(adata, batch_key="slide")
    sp.pp.histology_features(adata, extractor=args.extractor, neighbors=args.neighbors, progress=False)
    recipe = adata.uns["histology"]["recipe"]
    t_features = time.perf_counter() - t0
    train = adata[adata.obs["slide"].isin(args.train_sections)].copy()
    test = adata[adata.obs["slide"] == args.test_section].copy()
    model = sp.SPARTHA(train, batch_key="slide", seed=args.seed)
    t1 = time.perf_counter()
    max_epochs = args.epochs or inspect.signature(sp.SPARTHA.train).parameters["max_epochs"].default
    model.train(max_epochs=max_epochs, progress=False, seed=args.seed)  # otherwise the library's defaults
    t_train = time.perf_counter() - t1
    if args.model_out:
        model.save(args.model_out, overwrite=True)

    observed = normalize_log1p(test.X.toarray() if hasattr(test.X, "toarray") else test.X)
    from anndata import AnnData

    real = AnnData(obs=test.obs[[]], obsm={"histology": test.obsm["histology"]}, uns={"histology": test.uns["histology"]})
    # like predict_image's X: the predictive mean, artifact-free, count noise integrated out
    pred_real = model.predict_mean(real, num_samples=args.num_samples, artifact="pass", seed=args.seed).values
    image_path = Path(test.uns["spatial"][args.test_section]["metadata"]["source_image_path"])
    per_gene_real = pcc_gene(pred_real, observed, reduce=False)
    grids = []
    for k in args.subdivide:
        t2 = time.perf_counter()
        grid = predict_image(model, image_path, num_samples=args.num_samples, seed=args.seed, progress=False,
                             min_tissue=args.min_tissue, subdivide=k)
        t_image = time.perf_counter() - t2
        g = grid.uns["image_grid"]
        spacing_px = g["spacing_um"] / g["um_per_px"]  # the training spacing, whatever the subdivision
        dist, nearest = cKDTree(grid.obsm["spatial"]).query(np.asarray(test.obsm["spatial"]))
        covered = dist <= 0.75 * spacing_px
        pred_grid = np.asarray(grid.X)[nearest]
        per_gene_grid = pcc_gene(pred_grid, observed, reduce=False)
        ok = np.isfinite(per_gene_real) & np.isfinite(per_gene_grid)
        grids.append({
            "subdivide": int(k),
            "grid_spots": int(grid.n_obs),
            "grid": g["grid"],
            "spacing_um": g["spacing_um"],
            "pseudo_spot_spacing_um": g["pseudo_spot_spacing_um"],
            "um_per_px": g["um_per_px"],
            "um_per_px_source": g["um_per_px_source"],
            "coverage_0.75_spacing": float(covered.mean()),
            "median_distance_spacings": float(np.median(dist) / spacing_px),
            "pcc_gene_real_spots": float(np.mean(per_gene_real[ok])),
            "pcc_gene_image_grid": float(np.mean(per_gene_grid[ok])),
            "pcc_gene_image_grid_covered_only": float(np.nanmean(pcc_gene(pred_grid[covered], observed[covered], reduce=False))),
            "pcc_gene_difference": float(np.mean(per_gene_grid[ok]) - np.mean(per_gene_real[ok])),
            "agreement_grid_vs_real_pcc": float(np.nanmean(pcc_gene(pred_grid, pred_real, reduce=False))),
            "seconds_predict_image": round(t_image, 1),
        })
    record = {
        "section": args.test_section,
        "train_sections": list(args.train_sections),
        "extractor": list(recipe["extractors"]),
        "neighbors": bool(args.neighbors),
        "genes": len(panel),
        "max_epochs": max_epochs,
        "num_samples": args.num_samples,
        "real_spots": int(test.n_obs),
        "chosen_epochs": model.selection.get("epochs") if model.selection else None,
        "seconds_features_all_sections": round(t_features, 1),
        "seconds_train": round(t_train, 1),
        "grids": grids,
    }
    return record


# ---------------------------------------------------------------------------- (b) a big synthetic slide
_NOISE: dict[int, np.ndarray] = {}


def _tile(y0: int, x0: int, th: int, tw: int, scale: int, size: int, seed: int) -> np.ndarray:
    """Tile of the synthetic slide at downsample ``scale`` (full-res coordinates × ``scale``): an
    elliptic tissue with a lumen, stained in two colours in 2,000 px stripes, with pixel noise
    (drawn from a bank of 8 noise tiles: cheap)."""
    ys = (np.arange(y0, y0 + th, dtype=np.float32) * scale)[:, None]
    xs = (np.arange(x0, x0 + tw, dtype=np.float32) * scale)[None, :]
    c = size / 2
    tissue = ((xs - c) / (0.42 * size)) ** 2 + ((ys - c) / (0.36 * size)) ** 2 < 1
    tissue &= ((xs - 0.3 * size) ** 2 + (ys - 0.45 * size) ** 2) > (0.06 * size) ** 2  # a big hole (a lumen)
    stripe = np.broadcast_to((xs // 2000 % 2 == 0), tissue.shape)[..., None]
    stain = np.where(stripe, np.array([200, 110, 170], np.int16), np.array([150, 60, 140], np.int16))
    key = (th, tw)
    if key not in _NOISE:
        _NOISE[key] = np.random.default_rng(seed).integers(-25, 25, (8, th, tw, 3)).astype(np.int16)
    noise = _NOISE[key][(y0 // max(th, 1) * 7 + x0 // max(tw, 1) + scale) % 8]
    out = np.full((th, tw, 3), 240, np.uint8)
    out[tissue] = np.clip(stain + noise, 0, 255).astype(np.uint8)[tissue]
    return out


def write_big_tiff(path: Path, size: int, um_per_px: float, tile: int = 512, seed: int = 0) -> dict:
    """A size × size JPEG-compressed pyramidal TIFF (levels /2 … until < 2048 px), tiles generated lazily."""
    import tifffile

    t0 = time.perf_counter()
    levels = []
    s = 1
    while size // s >= 2048 or s == 1:
        levels.append(s)
        s *= 2

    def tiles(scale: int):
        n = size // scale
        for y0 in range(0, n, tile):
            for x0 in range(0, n, tile):
                th, tw = min(tile, n - y0), min(tile, n - x0)
                t = np.full((tile, tile, 3), 240, np.uint8)
                t[:th, :tw] = _tile(y0, x0, th, tw, scale, size, seed)
                yield t

    res = 1e4 / um_per_px
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, scale in enumerate(levels):
            n = size // scale
            kwargs = dict(subifds=len(levels) - 1, resolution=(res, res), resolutionunit="CENTIMETER") if k == 0 else \
                dict(subfiletype=1)
            tw.write(tiles(scale), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90}, **kwargs)
    return {"levels": levels, "seconds_write": round(time.perf_counter() - t0, 1),
            "file_mb": round(path.stat().st_size / 2**20, 1)}


def tiny_model(folder: Path, um_per_px: float, spacing_um: float, spot_um: float, n_genes: int, seed: int = 0) -> None:
    """A model trained briefly on a small synthetic slide of the same look (stats features)."""
    import anndata as ad
    import pandas as pd
    from PIL import Image

    import spartha_pyro as sp
    from spartha_pyro.image import spot_grid

    img = _tile(0, 0, 4096, 4096, 4, 16384, seed)  # the big slide's pattern, at its resolution
    path = folder / "train.png"
    Image.fromarray(img).save(path)
    spacing_px = spacing_um / um_per_px
    xy, _ = spot_grid(4096, 4096, spacing_px, "square")
    on = img[xy[:, 1].astype(int), xy[:, 0].astype(int)].astype(int).sum(1) < 700
    xy = xy[on]
    rng = np.random.default_rng(seed)
    stripe = (xy[:, 0] * 4 // 2000 % 2 == 0)
    rate = np.where(stripe[:, None], 3.0, 1.0) * rng.gamma(2, 1, n_genes)[None] + 0.5
    adata = ad.AnnData(rng.poisson(10 * rate).astype(np.float32),
                       obs=pd.DataFrame({"slide": "train"}, index=[f"s{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"train": {"scalefactors": {"spot_diameter_fullres": spot_um / um_per_px},
                                      "metadata": {"source_image_path": str(path), "microns_per_pixel": um_per_px,
                                                   "spot_diameter_um": spot_um}}}
    sp.pp.annotate_qc(adata, batch_key="slide")
    sp.pp.histology_features(adata, extractor="stats", progress=False)
    model = sp.SPARTHA(adata, hidden=32, y_dim=4, d_dim=2, r_dim=2, x_dim=2)
    model.train(max_epochs=5, batch_size=128, progress=False)
    model.save(folder / "model", overwrite=True)


#: a child's own peak resident memory. Not ``getrusage``: Linux carries the parent's high-water
#: mark across fork + exec into the child's ``ru_maxrss``, so a child of this (large) process
#: would report the parent's peak; ``VmHWM`` belongs to the child's own address space.
_PEAK = ("import sys\n{}\nprint('VmHWM_kB', next(int(l.split()[1]) for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')))")


def _peak_kb(stdout: str) -> int:
    """The ``VmHWM`` a :data:`_PEAK` child printed."""
    return int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("VmHWM_kB")))


def run_big(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else None
        if model is None:
            tiny_model(tmp, args.um_per_px, args.spacing_um, args.spot_um, args.n_genes)
            model = tmp / "model"
        info = write_big_tiff(tmp / "big.tif", args.size, args.um_per_px)
        imports = subprocess.run([sys.executable, "-c", _PEAK.format(
            "import torch, spartha_pyro.cli, spartha_pyro.image, spartha_pyro.predictions, spartha_pyro.model, "
            "spartha_pyro.pp.features")], capture_output=True, text=True, check=True)
        imports_kb = _peak_kb(imports.stdout)  # the fixed cost: libraries
        t0 = time.perf_counter()
        argv = ["predict-image", str(model), str(tmp / "big.tif"), "-o", str(tmp / "big.h5ad"),
                "--num-samples", str(args.num_samples), "--quiet", "--device", "cpu"]
        run = f"from spartha_pyro.cli import main; rc = main({argv!r})"
        proc = subprocess.run([sys.executable, "-c", _PEAK.format(run) + "; sys.exit(rc)"], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_kb = _peak_kb(proc.stdout)
        if proc.returncode != 0:
            raise RuntimeError(f"predict-image failed ({proc.returncode}): {proc.stderr[-2000:]}")
        import anndata as ad

        out = ad.read_h5ad(tmp / "big.h5ad", backed="r")
        n_spots = out.n_obs
        grid = dict(out.uns["image_grid"])
        return {
            "size_px": args.size, "um_per_px": args.um_per_px, **info, "spots": int(n_spots),
            "genes": int(out.n_vars), "grid": grid["grid"], "spacing_um": grid["spacing_um"],
            "level_used": int(grid["level"]), "tissue_area_fraction": round(float(grid["tissue_area_fraction"]), 3),
            "seconds_predict_image": round(seconds, 1), "spots_per_s": round(n_spots / seconds, 1),
            "seconds_features": grid["seconds_features"], "seconds_prediction": float(out.uns["prediction"]["seconds"]),
            "feature_spots_per_s": round(n_spots / grid["seconds_features"], 1),
            "peak_host_memory_mb": round(peak_kb / 1024, 1), "imports_only_memory_mb": round(imports_kb / 1024, 1),
            "stdout": [line for line in proc.stdout.strip().splitlines() if not line.startswith("VmHWM_kB")],
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["her2st", "big", "all"])
    p.add_argument("--data", default=str(HERE.parents[1] / "shared" / "data" / "her2st"))
    p.add_argument("--train-sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    p.add_argument("--test-section", default="C5")
    p.add_argument("--extractor", nargs="+", default=["efficientnet_lite0", "stats"])
    p.add_argument("--neighbors", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the library's, SPARTHA.train())")
    p.add_argument("--num-samples", type=int, default=20)
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--subdivide", type=int, nargs="+", default=[1, 2],
                   help="grid refinements to score (1: the training grid; 2: pseudo-spots every half spacing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-out", help="also save the her2st model there")
    p.add_argument("--size", type=int, default=40000, help="side of the synthetic slide in px")
    p.add_argument("--um-per-px", type=float, default=0.5, help="resolution of the synthetic slide")
    p.add_argument("--spacing-um", type=float, default=200.0)
    p.add_argument("--spot-um", type=float, default=100.0)
    p.add_argument("--n-genes", type=int, default=785)
    p.add_argument("--model", help="model for 'big' (default: a tiny one trained on a synthetic slide)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic TIFF (needs ~1 GB at 40k)")
    p.add_argument("--json", help="append the records to this JSON file")
    args = p.parse_args(argv)
    records = {}
    if args.which in ("her2st", "all"):
        records["her2st"] = run_her2st(args)
        print(json.dumps(records["her2st"], indent=1))
    if args.which in ("big", "all"):
        records["big"] = run_big(args)
        print(json.dumps(records["big"], indent=1))
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(old + [records], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
