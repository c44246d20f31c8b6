"""Artifact benchmark: real spots corrupted with their clean truth kept (issue 18).

For every corruption rate (``--rates``) and seed, a share of the spots of EVERY section
(training and held-out alike) is corrupted, counts and image together. The QC annotation then
runs on the corrupted data as a user's would (:func:`spartha_pyro.pp.annotate_qc`, 5 MADs per
section; it never sees the truth). Each method is trained on the corrupted training sections
and predicts the held-out section from its corrupted histology alone; it is scored against the
held-out section's CLEAN counts.

Corruption (:func:`choose_spots`, :func:`corrupt_patch`, :func:`corrupt_counts`): a share
``--patch-share`` of the corrupted spots lie in spatially coherent patches (a disc of 1.5-3
grid units around a seed spot). A patch seeded at the tissue edge is a detachment; any other
patch draws one kind. The rest are scattered spots, each with its own kind. Images are
corrupted on the pixels of the 224-px patch before the features are extracted.

=========== ====================================================== ==========================================
kind        image                                                  counts
=========== ====================================================== ==========================================
fold        a nearby spot's patch overlaid, shifted and darkened   + 30-70 % of that nearby spot's counts
bubble      a white-out ellipse over 30-60 % of the patch          capture loss (keep 10-30 %)
detachment  white-out over most of the patch, blurred              capture loss (keep 10-30 %) + ambient RNA
blur        Gaussian blur (out of focus)                           ambient RNA (diffusion) + mild loss
pen         a marker stroke (green, blue or black)                 mild capture loss (keep 40-70 %)
overstain   darker, more haematoxylin                              degradation: loss + mitochondrial share up
=========== ====================================================== ==========================================

Capture loss is binomial thinning. Ambient RNA adds Poisson counts with 20-50 % of the spot's
clean library drawn from the section's average profile. Degradation multiplies the ``MT-``
genes by 2-4 where the data have any; her2st's tables have none, and the run says so.

Methods, all on the same corrupted data:

- ``spartha``: posterior predictive mean, ``artifact="posterior"``;
- ``spartha_pass``: the same model generating artifact-free spots, ``artifact="pass"``;
- ``spatialdiva``: no ``Z_r``, trained on every spot;
- ``spatialdiva_filtered``: no ``Z_r``, trained on the QC-passing spots only (the strict
  preprocessing the poster argues against);
- ``ridge``: on every spot, the same per-section standardised features;
- ``mean``: the training mean;
- optional ``spartha_oracle`` (and ``spartha_oracle_pass``): SPARTHA given the TRUE
  corruption flags as its QC labels.

The VAEs use the library defaults (labels ``"auto"``, epochs chosen on the last training
section, then a refit). They are trained on the gene panels plus ``__rest__``, as in
``benchmarks/her2st.py`` ``--train-genes panels``. Panels are chosen on the corrupted
training spots.

Metrics, per panel, against the held-out section's clean log1p(counts per 10,000):

- ``pcc_gene_clean``: per-gene PCC over all its spots;
- ``mse_clean_corrupted``: MSE over its corrupted spots;
- ``mse_clean_clean``: MSE over its uncorrupted spots;
- ``pcc_gene_measured``: per-gene PCC against the corrupted counts, for contrast;
- panel ``qc``: ``qcpr3|4|5`` and ``qc_energy_distance`` (the fidelity score), comparing the
  generated spots' QC metrics with the clean spots'. Beside them are three references:
  ``clean`` (the clean spots themselves), ``observed`` (the corrupted measured spots) and
  ``constant`` (the training-mean profile with Poisson noise).

Also recorded: ``qc`` rows, the share of corrupted and of clean spots that the QC flagged; and
for each VAE (panel ``train``) what early stopping chose on the inner training section:
``chosen_epochs`` and ``chosen_val_pcc_gene``.

Paired statistics, method ``"<a>_vs_<b>"``:

- for each held-out section, seed and rate, a spatial block-bootstrap CI of the per-gene PCC
  difference against the clean truth (``pcc_gene_clean_diff[_ci_low|_ci_high]``) and the
  ``mse_clean_corrupted_diff``;
- with two or more held-out sections (``--loso``), sign-flip tests over sections
  (``..._diff_mean``, ``..._p_value``, and ``..._p_value_greater``, where "greater" means
  that ``a`` is better).

Records go to ``--out`` (JSON); ``--merge A.json B.json ... --out M.json`` joins runs made
separately (e.g. one held-out section each) and recomputes the tests over all their sections. The per-gene PCCs go beside it (``.npz``). With
``--plot-dir``, the plots go there: every metric against the rate (``artifacts_<panel>.png``),
examples of corrupted patches (``artifact_examples.png``) and SPARTHA's probe matrix per rate
(``artifacts_probe.csv``: can its latents, ``Z_r`` among them, read the labels, slide and QC?).

Example::

    python benchmarks/artifacts.py --data ../shared/data/her2st --loso --rates 0 0.15 0.3 \\
        --seeds 0 --out benchmarks/results/her2st-artifacts.json --plot-dir benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sparse  # noqa: E402
import xarray as xr  # noqa: E402
from anndata import AnnData  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import her2st as bench  # noqa: E402

import spartha_pyro as sp  # noqa: E402
from spartha_pyro.baselines import MeanPredictor, RidgePredictor  # noqa: E402
from spartha_pyro.datasets.her2st import read_her2st  # noqa: E402
from spartha_pyro.metrics import (  # noqa: E402
    block_bootstrap_ci,
    constant_profile_counts,
    normalize_log1p,
    paired_sign_flip_test,
    pcc_gene,
    qc_fidelity,
    qcpr,
)
from spartha_pyro.pp.features import make_extractors, neighbor_mean  # noqa: E402
from spartha_pyro.pp.patches import PATCH_QC_COLUMNS, iter_patches, patch_qc_metrics, read_patch_qc  # noqa: E402
from spartha_pyro.pp.qc import mito_mask  # noqa: E402

METHODS = ("spartha", "spatialdiva", "spatialdiva_filtered", "ridge", "mean", "spartha_oracle")
#: QC reference rows: the clean held-out spots, the corrupted measured ones, a bland generator
REFERENCES = ("clean", "observed", "constant")
ROWS = ("spartha", "spartha_pass", "spartha_oracle", "spartha_oracle_pass", "spatialdiva",
        "spatialdiva_filtered", "ridge", "mean", *REFERENCES)
#: the paired comparisons: each SPARTHA row (QC flags or, oracle, the true ones) against each SpatialDIVA
#: variant and ridge, and artifact-free generation with the true flags against it with QC's
PAIRS = [(a, b) for a in ("spartha", "spartha_pass", "spartha_oracle", "spartha_oracle_pass")
         for b in ("spatialdiva", "spatialdiva_filtered", "ridge")] + [("spartha_oracle_pass", "spartha_pass")]
PATCH_KINDS = ("fold", "bubble", "blur", "pen", "overstain")
KINDS = ("fold", "bubble", "detachment", "blur", "pen", "overstain")
SCORED_PANELS = ("hvg", "top250", "hist2st_785")
PLOTTED = ("pcc_gene_clean", "mse_clean_corrupted", "mse_clean_clean", "qc_energy_distance", "qcpr3")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data/her2st", help="legacy-ST folder (as benchmarks/her2st.py)")
    p.add_argument("--train-sections", nargs="+", default=["B4", "C2", "C3", "C4"])
    p.add_argument("--test-sections", nargs="+", default=["C5"])
    p.add_argument("--loso", action="store_true", help="hold out each section in turn (train on the others)")
    p.add_argument("--rates", nargs="+", type=float, default=[0.0, 0.15, 0.3], help="shares of spots corrupted")
    p.add_argument("--patch-share", type=float, default=0.7, help="share of the corrupted spots in coherent patches")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if m != "spartha_oracle"])
    p.add_argument("--validation", choices=["auto", "none"], default="auto",
                   help="'auto': the library default (epochs chosen on the last training section, then a refit); "
                   "'none': --epochs on all training sections")
    p.add_argument("--epochs", type=int, default=100, help="(most) epochs of the VAEs")
    p.add_argument("--label-keys", nargs="*", default=["auto"], help="label sets of the VAEs (default: the library's 'auto')")
    p.add_argument("--features", default="lite0+stats+nbr", help="as benchmarks/her2st.py")
    p.add_argument("--image-qc", action="store_true",
                   help="QC also judges each spot's (corrupted) H&E patch (sp.pp.annotate_qc(image=True))")
    p.add_argument("--n-hvg", type=int, default=2500)
    p.add_argument("--n-top-mean", type=int, default=250)
    p.add_argument("--num-samples", type=int, default=100, help="posterior predictive draws per spot")
    p.add_argument("--sample-chunk", type=int, default=25, help="draws generated at a time; the first chunk gives QCPR")
    p.add_argument("--block-size", type=float, default=4.0, help="side of the block-bootstrap tiles, in array grid units")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=0, help="runs in parallel processes; 0: one per CPU core on CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default="benchmarks/cache", help="folder of the clean prepared .h5ad (shared with her2st.py)")
    p.add_argument("--out", default="results_artifacts.json")
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only merge these result files: paired tests over all their sections, tables, plots")
    args = p.parse_args(argv)
    if not all(0 <= r < 1 for r in args.rates):
        raise sp.InputError(f"--rates must lie in [0, 1), got {args.rates}")
    if not 0 <= args.patch_share <= 1:
        raise sp.InputError(f"--patch-share must lie in [0, 1], got {args.patch_share}")
    return args


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``benchmarks/her2st.py`` settings that its reused steps read (preparation, panels,
    training and sampling of the VAEs), from this run's flags."""
    b = bench.parse_args([
        "--data", args.data, "--cache", args.cache, "--features", args.features, "--device", args.device,
        "--n-hvg", str(args.n_hvg), "--n-top-mean", str(args.n_top_mean), "--epochs", str(args.epochs),
        "--num-samples", str(args.num_samples), "--sample-chunk", str(args.sample_chunk), "--calib-samples", "0",
        "--label-keys", *args.label_keys,
    ])
    b.validation = None if args.validation == "none" else "auto"
    return b


# ---------------------------------------------------------------------------- corruption
def choose_spots(coords: np.ndarray, rate: float, patch_share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which spots of one section are corrupted, and how.

    Parameters
    ----------
    coords
        ``(n, 2)`` array-grid positions (legacy ST: unit spacing).
    rate
        Share of the spots corrupted (rounded to whole spots).
    patch_share
        Share of the corrupted spots placed in coherent patches (discs of radius 1.5-3 grid
        units around a random seed spot; half the patches are seeded at the tissue edge,
        where a patch is a detachment); the rest are scattered.

    Returns
    -------
    ``(kind, partner)``: ``kind`` is a ``str`` array of :data:`KINDS` or ``""`` (clean), and
    ``partner`` is the index of a nearby spot (the tissue a fold overlays; -1 elsewhere).
    """
    n = coords.shape[0]
    kind = np.full(n, "", dtype=object)
    target = int(round(rate * n))
    tree = cKDTree(coords)
    spacing = np.median(tree.query(coords, k=2)[0][:, 1]) if n > 1 else 1.0
    edge = np.array([len(nb) - 1 < 4 for nb in tree.query_ball_point(coords, r=1.2 * spacing)])
    n_patch = int(round(patch_share * target))
    while (kind != "").sum() < n_patch:
        free = np.flatnonzero(kind == "")
        free_edge = free[edge[free]]
        seed = rng.choice(free_edge if free_edge.size and rng.random() < 0.5 else free)
        radius = rng.uniform(1.5, 3.0) * spacing
        members = [i for i in sorted(tree.query_ball_point(coords[seed], r=radius),
                                     key=lambda i: np.hypot(*(coords[i] - coords[seed]))) if kind[i] == ""]
        members = members[: n_patch - int((kind != "").sum())]
        kind[members] = "detachment" if edge[seed] else rng.choice(PATCH_KINDS)
    free = np.flatnonzero(kind == "")
    scattered = rng.choice(free, size=min(target - int((kind != "").sum()), free.size), replace=False)
    kind[scattered] = rng.choice(KINDS, size=scattered.size)
    partner = np.full(n, -1)
    for i in np.flatnonzero(kind == "fold"):
        near = [j for j in tree.query_ball_point(coords[i], r=2.5 * spacing) if j != i]
        partner[i] = rng.choice(near) if near else i
    return kind.astype(str), partner


def _whiteout(patch: np.ndarray, rng: np.random.Generator, cover: tuple[float, float]) -> np.ndarray:
    """An off-white ellipse (bubble, tear, detached tissue) over a share ``cover`` of the patch."""
    size = patch.shape[0]
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = rng.uniform(0.25, 0.75, 2)
    area = rng.uniform(*cover)
    ry = np.sqrt(area / np.pi) * rng.uniform(0.8, 1.25)
    rx = area / (np.pi * ry)
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    out = patch.astype(np.float32)
    out[inside] = 0.15 * out[inside] + 0.85 * np.array([242.0, 240.0, 244.0])
    return out


def corrupt_patch(patch: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray | None = None) -> np.ndarray:
    """The ``uint8`` patch ``(h, w, 3)`` with an artifact of ``kind`` drawn on its pixels
    (``other``: the nearby spot's clean patch that a fold overlays)."""
    if kind == "blur":
        return np.asarray(Image.fromarray(patch).filter(ImageFilter.GaussianBlur(rng.uniform(3, 6))))
    if kind == "bubble":
        out = _whiteout(patch, rng, (0.3, 0.6))
    elif kind == "detachment":
        out = _whiteout(patch, rng, (0.6, 0.9))
        out = np.asarray(Image.fromarray(out.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(1, 3))), np.float32)
    elif kind == "fold":
        shifted = np.roll(other if other is not None else patch, tuple(rng.integers(-40, 41, 2)), axis=(0, 1))
        out = 0.5 * patch + 0.5 * shifted * rng.uniform(0.55, 0.75)
    elif kind == "pen":
        colour = [(40, 120, 60), (40, 60, 150), (30, 30, 35)][rng.integers(3)]
        layer = Image.new("L", patch.shape[1::-1], 0)
        size = patch.shape[0]
        ends = rng.uniform(-0.2, 1.2, (2, 2)) * size
        ImageDraw.Draw(layer).line([tuple(ends[0]), tuple(ends[1])], fill=255, width=int(rng.uniform(0.1, 0.3) * size))
        alpha = 0.7 * np.asarray(layer, np.float32)[..., None] / 255
        out = (1 - alpha) * patch + alpha * np.array(colour, np.float32)
    elif kind == "overstain":
        out = patch * rng.uniform(0.55, 0.75) * np.array([0.85, 0.75, 1.0])
    else:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return np.clip(out, 0, 255).astype(np.uint8)


def corrupt_counts(clean: np.ndarray, kind: str, rng: np.random.Generator, profile: np.ndarray,
                   mito: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """One spot's corrupted counts ``(n_genes,)`` from its clean counts (see the module table).

    ``profile``: the section's mean gene proportions (ambient RNA); ``mito``: boolean mask of
    the mitochondrial genes; ``other``: the clean counts of the nearby spot a fold overlays.
    """
    library = clean.sum()
    keep = {"bubble": (0.1, 0.3), "detachment": (0.1, 0.3), "blur": (0.5, 0.8), "pen": (0.4, 0.7),
            "overstain": (0.3, 0.6), "fold": (0.7, 1.0)}[kind]
    out = rng.binomial(clean.astype(np.int64), rng.uniform(*keep))
    if kind in ("detachment", "blur"):
        out = out + rng.poisson(rng.uniform(0.2, 0.5) * library * profile)
    if kind == "fold" and other is not None:
        out = out + rng.binomial(other.astype(np.int64), rng.uniform(0.3, 0.7))
    if kind == "overstain" and mito.any():
        out[mito] = rng.poisson(out[mito] * rng.uniform(2, 4))
    return out


def clean_patches(adata: AnnData, images: dict, index: np.ndarray) -> np.ndarray:
    """The clean 224-px (default patch size) patches of the spots at positions ``index``."""
    out = None
    for idx, batch in iter_patches(bench.with_images(adata[index], images)):
        out = np.zeros((index.size, *batch.shape[1:]), np.uint8) if out is None else out
        out[idx] = batch
    return out


def clean_patch_qc(adata: AnnData, images: dict) -> dict[str, np.ndarray]:
    """:func:`~spartha_pyro.pp.patches.patch_qc_metrics` of every spot's clean patch."""
    return read_patch_qc(bench.with_images(adata, images))


def corrupt(clean: AnnData, images: dict, rate: float, seed: int, extractors: dict, patch_share: float = 0.7,
            features: str = "lite0+stats+nbr", examples: list | None = None,
            patch_qc: dict[str, np.ndarray] | None = None) -> AnnData:
    """A corrupted copy of ``clean`` (every section; see the module docstring).

    ``X`` holds the corrupted counts, ``layers["clean"]`` the clean ones, ``obs["artifact"]``
    the kind (``""`` for clean spots) and ``obs["corrupted"]`` the true flag. ``obsm["features"]``
    is recomputed from the corrupted patches, grid-neighbour means included, and
    ``obs["qc_pass"]`` is re-annotated on the corrupted counts; ``obsm["histology"]`` holds
    the ``features`` blocks (as ``benchmarks/her2st.py --features``). ``extractors``:
    :func:`~spartha_pyro.pp.features.make_extractors` of the raw blocks; ``patch_share``: see
    :func:`choose_spots`. ``examples`` (if given) receives ``(kind, clean patch, corrupted
    patch)`` of the first spot of each kind. ``patch_qc`` (:func:`clean_patch_qc`, if given):
    the QC also judges the patches (``annotate_qc(image=True)``), the corrupted spots'
    metrics taken from their corrupted patches.
    """
    rng = np.random.default_rng([seed, int(round(rate * 1000))])
    out = clean.copy()
    X = clean.X.tocsr() if sparse.issparse(clean.X) else sparse.csr_matrix(clean.X)
    kind = np.full(clean.n_obs, "", dtype=object)
    partner = np.full(clean.n_obs, -1)
    libs = clean.obs["slide"].astype(str).to_numpy()
    grid = clean.obs[["array_x", "array_y"]].to_numpy(float)
    for lib in np.unique(libs):
        sel = np.flatnonzero(libs == lib)
        k, p = choose_spots(grid[sel], rate, patch_share, rng)
        kind[sel], partner[sel] = k, np.where(p >= 0, sel[np.maximum(p, 0)], -1)
    hit = np.flatnonzero(kind != "")
    dense = X[hit].toarray()
    mito = mito_mask(clean.var_names)
    rows = X.tolil()
    for lib in np.unique(libs):
        sel = libs == lib
        profile = np.asarray(X[sel].sum(0)).ravel()
        profile = profile / max(profile.sum(), 1)
        for j, i in enumerate(hit):
            if libs[i] == lib:
                other = X[partner[i]].toarray().ravel() if partner[i] >= 0 else None
                rows[i] = corrupt_counts(dense[j], kind[i], rng, profile, mito, other)
    out.X = rows.tocsr().astype(np.float32)
    out.layers["clean"] = X.astype(np.float32)
    out.obs["artifact"] = pd.Categorical(kind.astype(str))
    out.obs["corrupted"] = kind != ""
    if hit.size:
        need = np.unique(np.concatenate([hit, partner[partner >= 0]]))
        patches = clean_patches(clean, images, need)
        pos = {s: j for j, s in enumerate(need)}
        columns = clean.uns["features"]["columns"]
        raw = np.array(clean.obsm["features"], dtype=np.float32, copy=True)
        seen = set()
        corrupted = np.stack([
            corrupt_patch(patches[pos[i]], kind[i], rng, patches[pos[partner[i]]] if partner[i] >= 0 else None) for i in hit
        ])
        if patch_qc is not None:
            patch_qc = {k: v.copy() for k, v in patch_qc.items()}
            for k, v in patch_qc_metrics(corrupted).items():
                patch_qc[k][hit] = v
        for i, c in zip(hit, corrupted):
            if examples is not None and kind[i] not in seen:
                seen.add(kind[i])
                examples.append((kind[i], patches[pos[i]], c))
        for name, run in extractors.items():
            a, b = columns[name]
            raw[hit, a:b] = np.concatenate([run(corrupted[s : s + 64]) for s in range(0, hit.size, 64)])
            if f"{name}_neighbors" in columns:
                na, nb = columns[f"{name}_neighbors"]
                raw[:, na:nb] = neighbor_mean(out, raw[:, a:b])
        out.obsm["features"] = raw
    if patch_qc is not None:
        for k, column in PATCH_QC_COLUMNS.items():
            out.obs[column] = patch_qc[k]
    sp.pp.annotate_qc(out, batch_key="slide", nmads=5, image=patch_qc is not None)
    out.obsm["histology"] = bench.select_features(out, features)
    return out


# ---------------------------------------------------------------------------- methods and scores
def predict_rows(method: str, train: AnnData, test_hist: AnnData, panels: dict, bargs, seed: int):
    """``{row: (log1p-normalised prediction (spots × genes), genes, sampled counts or None)}``
    of one method, SPARTHA's probe matrix (else None) and, for the VAEs, what early stopping
    chose (``{"epochs", "val_pcc_gene"}``, else empty)."""
    if method == "mean":
        return {method: (MeanPredictor().fit(train).predict(test_hist), train.var_names, None)}, None, {}
    if method == "ridge":
        ridge = RidgePredictor("histology", group_key="slide", section_key="slide").fit(train)
        return {method: (ridge.predict(test_hist), train.var_names, None)}, None, {}
    fit_on = train
    if method == "spatialdiva_filtered":
        fit_on = train[(train.obs["qc_pass"] == "pass").to_numpy()].copy()
    elif method == "spartha_oracle":
        fit_on = train.copy()
        fit_on.obs["qc_pass"] = pd.Categorical(np.where(fit_on.obs["corrupted"], "fail", "pass"), categories=["fail", "pass"])
    kind = "spatialdiva" if method.startswith("spatialdiva") else "spartha"
    model = bench.train_spartha(kind, bench.modelled_genes(fit_on, panels, "panels"), bargs, seed, bargs.validation)
    modes = {method: "posterior", f"{method}_pass": "pass"} if kind == "spartha" else {method: "posterior"}
    rows = {}
    for row, artifact in modes.items():
        pred, genes, first, _ = bench.posterior_predictive(model, test_hist, artifact, bargs, seed)
        rows[row] = (pred, genes, first)
    return rows, bench.probe(model, seed) if method == "spartha" else None, bench.chosen(model)


def reference_counts(row: str, train: AnnData, test: AnnData, panels: dict, seed: int, n: int) -> tuple[list[str], np.ndarray]:
    """Counts ``(sample, spot, gene)`` of a QC reference row on the modelled genes."""
    genes = [g for g in bench.modelled_genes(test, panels, "panels").var_names if g != bench.REST]
    cols = test.var_names.get_indexer(genes)
    if row == "constant":
        m = bench.modelled_genes(train, panels, "panels")
        keep = [i for i, g in enumerate(m.var_names) if g != bench.REST]
        library = np.asarray(test.layers["clean"].sum(1)).ravel()
        return genes, constant_profile_counts(m.X, library, n_samples=n, seed=seed)[..., keep]
    counts = test.layers["clean"] if row == "clean" else test.X
    return genes, counts[:, cols].toarray()[None]


def score_row(pred, genes, counts, test: AnnData, clean_obs: np.ndarray, measured_obs: np.ndarray, panels: dict, seed: int):
    """Records of one row against the clean truth (and the measured counts), and its per-gene
    clean PCC per panel."""
    records, pccs = [], {}
    genes = pd.Index(genes)
    corrupted = test.obs["corrupted"].to_numpy(bool)
    if pred is not None:
        pred = np.asarray(pred.toarray() if sparse.issparse(pred) else pred, dtype=np.float64)
        for panel in SCORED_PANELS:
            if panel not in panels:
                continue
            idx, cols = genes.get_indexer(panels[panel]), test.var_names.get_indexer(panels[panel])
            p, c = pred[:, idx], clean_obs[:, cols]
            pccs[panel] = pcc_gene(p, c, reduce=False).astype(np.float32)
            values = {"pcc_gene_clean": float(np.nanmean(pccs[panel])),
                      "pcc_gene_measured": float(pcc_gene(p, measured_obs[:, cols]))}
            for name, mask in (("mse_clean_corrupted", corrupted), ("mse_clean_clean", ~corrupted)):
                if mask.any():
                    values[name] = float(np.mean((p[mask] - c[mask]) ** 2))
            records += [{"panel": panel, "metric": k, "value": v} for k, v in values.items()]
    if counts is not None:
        generated = counts.sel(gene=list(genes)).values if isinstance(counts, xr.DataArray) else counts
        real = test.layers["clean"][:, test.var_names.get_indexer(genes)]
        records += [{"panel": "qc", "metric": k, "value": v} for k, v in qcpr(generated, real, list(genes)).items()]
        records.append({"panel": "qc", "metric": "qc_energy_distance", "value": qc_fidelity(generated, real, list(genes), seed=seed)})
    return records, pccs


_SHARED: tuple | None = None


def run_task(task: tuple) -> dict:
    """One ``(train sections, test section, rate, seed, method)`` run: its records, the
    per-gene clean PCC of each row per panel, and SPARTHA's probe matrix."""
    data, args, bargs = _SHARED
    train_sections, test_section, rate, seed, method = task
    adata = data[(rate, seed)]
    genes = bench.training_genes(adata, train_sections)
    train = adata[adata.obs["slide"].isin(train_sections).to_numpy(), genes].copy()
    test = adata[(adata.obs["slide"] == test_section).to_numpy(), genes].copy()
    panels = bench.gene_panels(train, bargs)
    clean_obs = normalize_log1p(test.layers["clean"]).toarray()
    measured_obs = normalize_log1p(test.X).toarray()
    start = time.perf_counter()
    if method in REFERENCES:
        names, counts = reference_counts(method, train, test, panels, seed, args.sample_chunk)
        rows, probe, chosen = {method: (None, names, counts)}, None, {}
    else:
        test_hist = AnnData(obs=test.obs[["slide", "array_x", "array_y"]].copy(), obsm={"histology": test.obsm["histology"]})
        rows, probe, chosen = predict_rows(method, train, test_hist, panels, bargs, seed)
    seconds = time.perf_counter() - start
    base = {"section": test_section, "seed": seed, "rate": rate, "seconds": seconds, "features": args.features,
            "qc": "counts+image" if args.image_qc else "counts"}
    records = [{"method": method, **base, "panel": "train", "metric": f"chosen_{k}", "value": v} for k, v in chosen.items()]
    pccs = {}
    for row, (pred, names, counts) in rows.items():
        got, pccs[row] = score_row(pred, names, counts, test, clean_obs, measured_obs, panels, seed)
        records += [{"method": row, **base, **r} for r in got]
        show = {r["panel"]: round(r["value"], 4) for r in got if r["metric"] == "pcc_gene_clean"}
        mse = {r["panel"]: round(r["value"], 3) for r in got if r["metric"] == "mse_clean_corrupted"}
        print(f"{row:20s} test={test_section} rate={rate} seed={seed} {seconds:6.0f}s pcc_gene_clean={show} "
              f"mse_clean_corrupted={mse}", flush=True)
    # what the paired statistics need, on the scored panels' genes only (a whole universe per run would not fit)
    keep = pd.Index(sorted({g for k in SCORED_PANELS if k in panels for g in panels[k]}))
    preds = {}
    for row, (pred, names, _) in rows.items():
        if pred is not None:
            pred = pred.toarray() if sparse.issparse(pred) else np.asarray(pred)
            preds[row] = pred[:, pd.Index(names).get_indexer(keep)].astype(np.float32)
    return {"records": records, "pccs": pccs, "probe": probe, "task": task, "preds": preds, "genes": keep,
            "coords": test.obs[["array_x", "array_y"]].to_numpy(float),
            "clean_obs": clean_obs[:, test.var_names.get_indexer(keep)].astype(np.float32),
            "panels": {k: list(panels[k]) for k in SCORED_PANELS if k in panels}}


def _init_worker(shared: tuple, threads: int | None = None) -> None:
    """Keep the data every run reads (and, in a pool process, cap its threads)."""
    global _SHARED
    _SHARED = shared
    if threads is not None:
        bench.limit_threads(threads)


def block_cis(results: list[dict], args) -> list[dict]:
    """Per held-out section, seed and rate, the spatial block-bootstrap CI of each
    :data:`PAIRS` difference in per-gene PCC against the clean truth
    (``pcc_gene_clean_diff_ci_low|high``), from the runs' stored predictions."""
    out, by_key = [], {}
    for r in results:
        _, section, rate, seed, _ = r["task"]
        by_key.setdefault((section, rate, seed), {}).update({row: (r, pred) for row, pred in r["preds"].items()})
    for (section, rate, seed), rows in by_key.items():
        for a, b in PAIRS:
            if a not in rows or b not in rows:
                continue
            (ra, pa), (_, pb) = rows[a], rows[b]
            for panel, g in ra["panels"].items():
                idx = ra["genes"].get_indexer(g)
                ci = block_bootstrap_ci(pa[:, idx], pb[:, idx], ra["clean_obs"][:, idx], ra["coords"],
                                        block_size=args.block_size, n_boot=args.n_boot, seed=seed)
                base = {"method": f"{a}_vs_{b}", "section": section, "seed": seed, "rate": rate, "panel": panel}
                out += [{**base, "metric": m, "value": float(v)} for m, v in (
                    ("pcc_gene_clean_diff_ci_low", ci.ci_low), ("pcc_gene_clean_diff_ci_high", ci.ci_high))]
    return out


def section_tests(records: list[dict]) -> list[dict]:
    """Each :data:`PAIRS` difference per held-out section, seed and rate, from the records
    (``pcc_gene_clean_diff`` = a - b; ``mse_clean_corrupted_diff`` = b - a; positive: ``a``
    better), and with two or more sections the sign-flip tests over sections of their means
    over seeds (``..._mean``, ``..._p_value``, ``..._p_value_greater``, ``n_sections``)."""
    df = pd.DataFrame([r for r in records if r["method"] in ROWS and r["metric"] in ("pcc_gene_clean", "mse_clean_corrupted")])
    if df.empty:
        return []
    wide = df.pivot_table(index=["rate", "panel", "metric", "section", "seed"], columns="method", values="value", aggfunc="mean")
    out = []
    for a, b in PAIRS:
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna()
        for (rate, panel, metric, section, seed), v in diff.items():
            out.append({"method": f"{a}_vs_{b}", "section": section, "seed": int(seed), "rate": rate, "panel": panel,
                        "metric": f"{metric}_diff", "value": float(v if metric == "pcc_gene_clean" else -v)})
    if not out:  # no pair of rows ran (e.g. only ridge and the mean)
        return out
    tests = pd.DataFrame(out).groupby(["method", "rate", "panel", "metric", "section"])["value"].mean()
    for (method, rate, panel, metric), v in tests.groupby(level=[0, 1, 2, 3]):
        if len(v) < 2:
            continue
        base = {"method": method, "section": "all", "seed": None, "rate": rate, "panel": panel}
        p = {alt: paired_sign_flip_test(v.to_numpy(), alt).p_value for alt in ("two-sided", "greater")}
        out += [{**base, "metric": m, "value": float(x)} for m, x in (
            (f"{metric}_mean", v.mean()), (f"{metric}_p_value", p["two-sided"]),
            (f"{metric}_p_value_greater", p["greater"]), ("n_sections", float(len(v))))]
    return out


def plot(records: list[dict], plot_dir: Path) -> None:
    """Each metric of :data:`PLOTTED` against the corruption rate, one line per row (mean over
    sections and seeds), one figure per panel."""
    df = pd.DataFrame([r for r in records if r["method"] in ROWS and r["section"] != "all"])
    for panel in SCORED_PANELS:
        sub = df[df["panel"].isin([panel, "qc"])]
        if sub[sub["panel"] == panel].empty:
            continue
        fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4 * len(PLOTTED), 3.6))
        for ax, metric in zip(axes, PLOTTED):
            m = sub[sub["metric"] == metric].groupby(["method", "rate"])["value"].mean().unstack(0)
            for row in [r for r in ROWS if r in m]:
                ax.plot(m.index, m[row], marker="o", label=row, ls="--" if row in REFERENCES else "-")
            ax.set_xlabel("share of spots corrupted")
            ax.set_title(metric + ("" if metric.startswith("q") else f" ({panel})"), fontsize=10)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / f"artifacts_{panel}.png", dpi=110)
        plt.close(fig)


def plot_examples(examples: list, path: Path) -> None:
    """One clean and one corrupted patch per artifact kind."""
    if not examples:
        return
    fig, axes = plt.subplots(2, len(examples), figsize=(2 * len(examples), 4.2), squeeze=False)
    for j, (kind, before, after) in enumerate(examples):
        for i, (img, what) in enumerate(((before, "clean"), (after, kind))):
            axes[i, j].imshow(img)
            axes[i, j].set_title(what, fontsize=9)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(args) -> list[dict]:
    """``--merge``: the per-run records of several result files (e.g. held-out sections run
    separately) with the paired differences and sign-flip tests recomputed over all their
    sections; tables, and plots with ``--plot-dir``. Block-bootstrap CIs are kept as the
    files have them (they need the predictions)."""
    records, seen = [], {}
    for f in args.merge:
        runs = [r for r in json.loads(Path(f).read_text())
                if not (r["method"].count("_vs_") and not r["metric"].endswith(("_ci_low", "_ci_high")))]
        for r in runs:  # the scores the tests pivot (the references' QC rows repeat harmlessly)
            if r["method"] in ROWS and r["metric"] in ("pcc_gene_clean", "mse_clean_corrupted"):
                key = (r["method"], r["section"], r["seed"], r["rate"], r["panel"], r["metric"])
                if key in seen:
                    raise sp.InputError(f"{f} and {seen[key]} both hold the run {key[:4]} (method, section, seed, "
                                        "rate): the tests would average them as one; drop it from one file")
                seen[key] = f
        records += runs
    records += section_tests(records)
    Path(args.out).write_text(json.dumps(records, indent=1))
    report(records)
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        plot(records, Path(args.plot_dir))
    return records


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    bargs = bench_args(args)
    sections = list(dict.fromkeys(args.train_sections + args.test_sections))
    bench.check_inputs(bargs, sections)
    clean = bench.prepare(bargs, sections)
    images = read_her2st(args.data, sections=sections).uns["spatial"]
    if not mito_mask(clean.var_names).any():
        print("note: no MT-/mt- genes in the data: the degradation signature and QC's mitochondrial criterion are off", flush=True)
    extractors = make_extractors(bench.needed_extractors(bargs), device="cpu")
    data, examples = {}, []
    patch_qc = clean_patch_qc(clean, images) if args.image_qc else None
    for rate in args.rates:
        for seed in args.seeds:
            t = time.perf_counter()
            data[(rate, seed)] = corrupt(clean, images, rate, seed, extractors, args.patch_share, args.features,
                                         examples if not examples else None, patch_qc)
            d = data[(rate, seed)]
            flagged = (d.obs["qc_pass"] == "fail").to_numpy()
            hit = d.obs["corrupted"].to_numpy(bool)
            print(f"rate {rate} seed {seed}: {hit.sum()} of {d.n_obs} spots corrupted, QC flags "
                  f"{flagged[hit].mean() if hit.any() else float('nan'):.2f} of them and {flagged[~hit].mean():.2f} of the clean "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    splits = ([([s for s in sections if s != t], t) for t in sections] if args.loso
              else [(args.train_sections, t) for t in args.test_sections])
    records = []
    for (rate, seed), d in data.items():
        hit, flagged = d.obs["corrupted"].to_numpy(bool), (d.obs["qc_pass"] == "fail").to_numpy()
        for s in sections:
            on = (d.obs["slide"] == s).to_numpy()
            for name, mask in (("qc_flagged_corrupted", on & hit), ("qc_flagged_clean", on & ~hit)):
                if mask.any():
                    records.append({"method": "qc", "section": s, "seed": seed, "rate": rate, "panel": "qc",
                                    "metric": name, "value": float(flagged[mask].mean())})
    tasks = [(tuple(tr), te, rate, seed, m) for tr, te in splits for rate in args.rates for seed in args.seeds
             for m in [*args.methods, *REFERENCES]]
    jobs = bench.n_jobs(args.jobs, args.device, len(tasks))
    print(f"{len(tasks)} runs (method x rate x seed x split) in {jobs} process(es)", flush=True)
    results = []
    start = time.perf_counter()
    for result in bench.run_tasks(tasks, (data, args, bargs), jobs, run_task, _init_worker):
        results.append(result)
        records += result["records"]
        Path(args.out).write_text(json.dumps(records, indent=1))
    print(f"{len(tasks)} runs: {time.perf_counter() - start:.0f} s wall clock", flush=True)
    records += block_cis(results, args) + section_tests(records)
    Path(args.out).write_text(json.dumps(records, indent=1))
    np.savez_compressed(Path(args.out).with_suffix(".npz"), **{
        f"pcc_gene_clean/{row}/{r['task'][1]}/{r['task'][2]}/{r['task'][3]}/{panel}": v
        for r in results for row, by_panel in r["pccs"].items() for panel, v in by_panel.items()})
    report(records)
    if args.plot_dir:
        plot_dir = Path(args.plot_dir)
        plot_dir.mkdir(parents=True, exist_ok=True)
        plot(records, plot_dir)
        plot_examples(examples, plot_dir / "artifact_examples.png")
        probes = [r["probe"].assign_coords(rate=r["task"][2]) for r in results if r["probe"] is not None]
        if probes:
            table = pd.concat({rate: xr.concat([p for p in probes if float(p.rate) == rate], "run").mean("run").to_pandas()
                               for rate in args.rates if any(float(p.rate) == rate for p in probes)}, names=["rate"])
            table.round(3).to_csv(plot_dir / "artifacts_probe.csv")
    return records


def report(records: list[dict]) -> None:
    """Text tables: each metric by row and rate (mean over sections and seeds), and the tests."""
    df = pd.DataFrame(records)
    main_rows = df[df["method"].isin(ROWS) & (df["section"] != "all")]
    for panel in ("hvg", "top250", "qc", "train"):
        t = main_rows[main_rows["panel"] == panel].pivot_table(index=["metric", "method"], columns="rate", values="value", aggfunc="mean")
        if not t.empty:
            print(f"\n{panel}: mean over held-out sections and seeds (columns: share of spots corrupted)")
            print(t.round(4).to_string())
    qc = df[df["method"] == "qc"].pivot_table(index="metric", columns="rate", values="value", aggfunc="mean")
    if not qc.empty:
        print("\nshare of spots the QC flagged (all sections)")
        print(qc.round(3).to_string())
    tests = df[(df["section"] == "all")]
    if not tests.empty:
        print("\npaired over held-out sections (a minus b; for MSE, b minus a: positive = a better)")
        print(tests.pivot_table(index=["method", "panel", "metric"], columns="rate", values="value", aggfunc="first").round(4).to_string())


if __name__ == "__main__":
    main()
