"""her2st benchmark: histology -> expression on held-out sections, poster-style table.

Methods: ``spartha`` (SPARTHA, point metrics from ``artifact="posterior"``),
``spartha_pass`` (the same trained model generating artifact-free spots,
``artifact="pass"``), ``spatialdiva`` (SPARTHA without Z_r), ``histogene``, ``ridge``,
``mean``. Each is trained on the training sections and predicts each held-out section from
histology alone (an AnnData with no genes and only ``obsm["histology"]``). Opt-in:
``spartha_transductive`` (SPARTHA also trained on the held-out section's histology as
image-only spots: never its counts, QC flags or labels), with ``--also-sampled`` the row
``spartha_sampled`` (the ``spartha`` model's point prediction from sampled counts) and, with
``--also-model-only``, the rows ``spartha_model_only`` / ``spatialdiva_model_only`` (the same
models' point predictions without their linear histology path, ``predict_mean(linear_path=False)``).

Data: any folder in the her2st/legacy-ST layout (``counts/<S>.tsv.gz``,
``spots/<S>_selection.tsv``, ``images/<S>.jpg``; any organism's gene names), or a prepared
``.h5ad`` (e.g. Space Ranger sections read by ``spartha prepare``): raw counts in ``X``,
``obs["slide"]``, ``obs["array_x"|"array_y"]`` and the histology vectors in
``obsm["histology"]`` (used as they are; ``--features`` then does not apply) or in the
benchmark's own ``obsm["features"]`` blocks; QC is annotated when ``obs["qc_pass"]`` is absent. The
VAEs' label sets are by default the library's automatic clusters of the training expression;
label columns (``--label-keys``, e.g. her2st's ``cluster``, used only where present with 2+
classes), deconvolution and
``genes/hist2st_785.txt`` are optional; what a run truly needs is checked before the features
are extracted. Sections are read with an outer gene join and each split's gene universe is the
genes of its TRAINING sections' tables (a gene missing from the test section's table is zero
there); panels are chosen on the training spots.

Scoring space: log1p of counts normalised to 10,000 per spot over every gene of the split's
universe, then subset to a panel: ``all``, ``hvg`` (top 2,500 of the training sections),
``top250`` (highest mean on the training sections) and ``hist2st_785`` (the field's panel,
when its file exists). The generative models are scored by their posterior predictive mean in
that space (:meth:`~spartha_pyro.SPARTHA.predict_mean`: the mean over ``--num-samples`` latent
draws of ``E[normalize_log1p(counts)]``, the count noise integrated out; ``--point-counts
sampled`` averages sampled counts instead); QCPR (3/4/5 MADs
against the real spots of the section) and the QC fidelity ``qc_energy_distance`` (energy
distance between the QC-metric distributions of generated and real spots,
:func:`~spartha_pyro.metrics.qc_fidelity`; lower is better) are computed on the first
``--sample-chunk`` draws. Beside them, always: ``observed`` (the real held-out spots scored
against their own MADs) and ``constant`` (the training-mean profile with Poisson noise at each
real spot's library, a bland generator that QCPR rewards and the fidelity does not).
``qc_n_mt_genes`` records how many ``MT-``/``mt-`` genes the QC saw (her2st's tables have
none, so the mitochondrial criterion is off there; the run says so).

Paired statistics (``"<reference>_vs_<row>"`` records, reference ``--paired-reference``,
default ``spartha``): per held-out section and seed a spatial block-bootstrap CI of the per-gene
PCC difference on each panel (``pcc_gene_diff_ci_low|high``; tiles of ``--block-size`` array
units, ``--n-boot`` replicates) and the QC score differences; with two or more held-out
sections (``--loso``) sign-flip permutation tests over sections (``..._p_value`` two-sided,
``..._p_value_greater`` = the reference is better). With five sections the smallest two-sided
p is 0.0625, one-sided 0.03125. Per-gene and per-spot PCC of every run go to a compressed
``.npz`` beside ``--out`` (``--save-predictions`` adds the point predictions).

With ``--train-genes panels`` (default, fast) the generative models are trained on the union
of the panels plus one ``__rest__`` column holding each spot's remaining counts, so that the
library size, and hence the normalisation, is the full transcriptome's; ``all`` is then scored
for the point predictors only. ``--train-genes all`` trains them on every gene.

By default (``--validation auto``, the library's default) the generative models early-stop,
within at most ``--epochs 100``, on the last TRAINING section, choose their linear path's share
there, and are refit on every training section; a test section is never used.
``--validation none`` trains ``--epochs`` on every training section; ``--validation C4`` (or
``last``) early-stops on that training section, and ``--refit`` then retrains on all training
sections for the epoch count early stopping chose.

Calibration (every method with a predictive distribution): ``coverage50|80|90|95``
(randomised-PIT coverage of central intervals of the counts), ``nll`` (the NB mixture over
posterior draws, nats per spot per gene) and ``crps`` (on log1p-normalised values), from
``--calib-samples`` draws, on the named panels of the modelled columns (``__rest__`` takes
part in the normalisation only). Ridge and the mean get an NB around their prediction
(:class:`~spartha_pyro.baselines.NBWrapper`, dispersion fit on cross-fitted training
predictions; by default, ``--nb-library auto``, each spot's library is predicted from its
histology features by ridge, as SPARTHA predicts it from histology, or is the median training
library, whichever gives the lower NLL of the training counts under the cross-fitted
predictions; ``histology`` or ``train_median`` force one).

``--extra-sections A1 A2 ...`` (or ``all``: the 30 count-only sections) adds the methods
``spartha_all_sections`` (SPARTHA given the imaged training sections plus those, cluster
labels; their histology rows are NaN; with the library default ``unimaged="auto"`` the
count-only spots are kept only if the validation stage scores better with them),
``spartha_all_sections_always`` (the same, always using them) and
``spartha_all_sections_3labels`` (also the pathology and dominant deconvolved cell-type
labels), with the same ``--validation`` and ``--epochs`` as ``spartha`` (``--extra-epochs``
overrides the latter). An epoch is one pass over the imaged spots, the count-only spots
filling at most half of each minibatch (``SPARTHA.train(max_unimaged_share=0.5)``). Every
method of such a run is scored on genes in every count-only section's table and every
training section's table (an unmeasured gene is not a zero). The disentanglement probe matrix of
SPARTHA's latents (full guide, training sections) versus its labels, slide and QC is scored on
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
from spartha_pyro.metrics import (  # noqa: E402
    block_bootstrap_ci,
    calibration_records,
    constant_profile_counts,
    format_table,
    hvg_panel,
    normalize_log1p,
    paired_sign_flip_test,
    pcc_gene,
    pcc_spot,
    probe_matrix,
    qc_fidelity,
    qcpr,
    regression_metrics,
)
from spartha_pyro.pp.qc import missing_patch_metrics, mito_mask  # noqa: E402
from spartha_pyro.pp.patches import PATCH_QC_COLUMNS, iter_patches, read_patch_qc  # noqa: E402
from spartha_pyro.cli import linear_path_setting  # noqa: E402
from spartha_pyro.train import resolve_device  # noqa: E402

#: SPARTHA trained with the count-only ``--extra-sections`` too, with the cluster labels or with
#: cluster + pathology + dominant deconvolved cell type
EXTRA_METHODS = {
    "spartha_all_sections": ["cluster"],
    "spartha_all_sections_always": ["cluster"],
    "spartha_all_sections_3labels": ["cluster", "pathology", "cell_type"],
}
#: ``SPARTHA.train(unimaged=...)`` of each extra method: the library default ``"auto"`` (the
#: count-only spots are used only if the validation stage scores better with them) unless named here
UNIMAGED = {"spartha_all_sections_always": "use"}
#: SPARTHA trained with the held-out section's histology as image-only spots (never its counts,
#: QC flags or labels): the target slide's image is known at prediction time
TRANSDUCTIVE = "spartha_transductive"
METHODS = ("spartha", "spatialdiva", "histogene", "ridge", "mean", TRANSDUCTIVE, *EXTRA_METHODS)
#: methods that generate counts (and so get QCPR and the QC fidelity score)
GENERATIVE = ("spartha", "spatialdiva", TRANSDUCTIVE, *EXTRA_METHODS)
#: QC references added whenever a generative method runs: the real held-out spots scored
#: against their own MADs, and the training-mean profile with Poisson noise at each real spot's library
QC_REFERENCES = ("observed", "constant")
#: table rows; ``spartha_pass`` comes from the ``spartha`` model
ROWS = ("spartha", "spartha_model_only", "spartha_pass", TRANSDUCTIVE, *EXTRA_METHODS, "spatialdiva", "spatialdiva_model_only", "histogene", "ridge", "mean", *QC_REFERENCES)
#: the row every other row is compared with in the paired statistics
PAIRED_REFERENCE = "spartha"
#: metrics compared between methods per section (the per-gene PCC on each panel and these QC scores)
PAIRED_QC = ("qcpr3", "qcpr4", "qcpr5", "qc_energy_distance")
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
        "--label-keys", nargs="*", default=["auto"],
        help="label sets of spartha/spatialdiva: 'auto' (default, the library's: clusters of the training "
        "expression), obs columns (one absent or with fewer than 2 classes on the training spots is left out, "
        "with a note; her2st's 'cluster' was made by the data's authors with every section of a patient, the "
        "held-out one included), or nothing (no label set)",
    )
    p.add_argument("--loso", action="store_true", help="hold out each section in turn (train on the others)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--methods", nargs="+", choices=[*METHODS, *QC_REFERENCES], default=[m for m in METHODS if m not in (*EXTRA_METHODS, TRANSDUCTIVE)],
        help="methods to run; the QC references (observed, constant) come with any generative method and may be asked alone",
    )
    p.add_argument(
        "--extra-sections", nargs="+", default=[],
        help="count-only sections (or 'all': the 30 without an image) added to the training of the "
        f"{list(EXTRA_METHODS)} methods; every method then scores on the genes shared by all sections read",
    )
    p.add_argument(
        "--extra-epochs", type=int, default=None,
        help="(max) epochs of the models trained with the extra sections (default: --epochs; an epoch is a pass over "
        "the imaged spots, the count-only ones filling at most half of each minibatch)",
    )
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
    p.add_argument("--point-counts", choices=("expected", "sampled"), default="expected",
                   help="point prediction: count noise integrated out (expected) or sampled (SPARTHA.predict_mean counts=)")
    p.add_argument("--also-sampled", action="store_true",
                   help="add the row spartha_sampled (or spartha_expected): the other --point-counts statistic of the same model")
    p.add_argument("--also-model-only", action="store_true",
                   help="add the rows spartha_model_only / spatialdiva_model_only: the same models without their linear path")
    p.add_argument("--linear-path", type=linear_path_setting, default="auto",
                   help="SPARTHA.train(linear_path=): auto (library default: share chosen on the validation section), "
                        "none, or a share in [0, 1]")
    p.add_argument(
        "--nb-library", choices=["auto", "histology", "train_median"], default="auto",
        help="library of the NB around ridge and the mean: predicted from histology, the training median, or "
        "whichever fits the training counts better (auto, default)",
    )
    p.add_argument("--pca", type=int, default=0, help="SPARTHA/SpatialDIVA see this many principal components of the features (0: raw)")
    p.add_argument("--label-sets", choices=["auto", "all"], default="auto",
                   help="SPARTHA.train(label_sets=...): with several --label-keys, keep those that help on validation "
                        "(auto, the library default) or all")
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
    p.add_argument(
        "--paired-reference", default=PAIRED_REFERENCE,
        help="row compared with every other row in the paired statistics (block-bootstrap CIs, sign-flip tests)",
    )
    p.add_argument("--block-size", type=float, default=4.0, help="side of the block-bootstrap tiles, in array grid units")
    p.add_argument("--n-boot", type=int, default=1000, help="block-bootstrap replicates per section")
    p.add_argument("--image-qc", action="store_true",
                   help="obs['qc_pass'] (the VAEs' QC label) also judges each spot's H&E patch "
                   "(sp.pp.annotate_qc(image=True), 5 MADs per section)")
    p.add_argument(
        "--save-predictions", action="store_true",
        help="also store every point prediction (float16) in the .npz beside --out (large); per-gene and per-spot "
        "scores are always stored there",
    )
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace, sections: list[str]) -> None:
    """Fail early, before minutes of feature extraction, on what the run truly needs: a
    valid ``--features`` spec and, unless the prepared cache exists, a legacy-ST folder with a
    counts table, a spot file and an image for every section (and counts + spot files for
    ``--extra-sections``). Optional extras (``genes/hist2st_785.txt``, ``clusters/``,
    ``deconvolution/``, ``pathology/``) are used only when present."""
    if is_h5ad(args):
        check_h5ad(args, sections)
        return
    feature_blocks(args.features)
    if args.extra_sections and not any(m in EXTRA_METHODS for m in args.methods):
        print(f"note: --extra-sections given but none of {list(EXTRA_METHODS)} in --methods", flush=True)
    root = Path(args.data)
    problems = []
    if cache_path(args, sections) is None:
        if not (root / "counts").is_dir():
            raise sp.InputError(f"--data {str(root)!r} is not a legacy-ST/her2st folder: it has no counts/ subfolder")
        for s in sections:
            if not (root / "counts" / f"{s}.tsv.gz").is_file():
                problems.append(f"counts/{s}.tsv.gz")
            if not (root / "spots" / f"{s}_selection.tsv").is_file():
                problems.append(f"spots/{s}_selection.tsv")
            if not any((root / "images" / f"{s}{ext}").is_file() for ext in (".jpg", "_lowres.png")):
                problems.append(f"images/{s}.jpg (histology features need an image of every train/test section)")
    if args.extra_sections and args.extra_sections != ["all"]:
        for s in args.extra_sections:
            for f in (f"counts/{s}.tsv.gz", f"spots/{s}_selection.tsv"):
                if not (root / f).is_file():
                    problems.append(f)
    if problems:
        raise sp.InputError(f"missing in {str(root)!r}: " + "; ".join(problems))


# ---------------------------------------------------------------------------- data
def is_h5ad(args: argparse.Namespace) -> bool:
    """Whether ``--data`` is a prepared ``.h5ad`` file rather than a legacy-ST folder."""
    return str(args.data).endswith(".h5ad")


def check_h5ad(args: argparse.Namespace, sections: list[str]) -> None:
    """What a prepared ``.h5ad`` must hold, checked on its ``obs``/``obsm`` keys before any work."""
    path = Path(args.data)
    if not path.is_file():
        raise sp.InputError(f"--data {str(path)!r}: no such .h5ad file")
    adata = read_h5ad(path, backed="r")
    try:
        problems = [f"obs[{k!r}]" for k in ("slide", "array_x", "array_y") if k not in adata.obs]
        if "histology" not in adata.obsm and not ("features" in adata.obsm and "features" in adata.uns):
            problems.append("obsm['histology'] (or the benchmark's obsm['features'] blocks)")
        if "histogene" in args.methods and "patches" not in adata.obsm:
            problems.append("obsm['patches'] (HisToGene's image patches; leave histogene out of --methods)")
        if args.extra_sections:
            problems.append("nothing: --extra-sections needs a legacy-ST folder")
        if problems:
            raise sp.InputError(f"--data {str(path)!r} lacks " + "; ".join(problems))
        missing = sorted(set(sections) - set(adata.obs["slide"].astype(str).unique()))
        if missing:
            raise sp.InputError(f"sections {missing} are not in obs['slide'] of {str(path)!r}")
    finally:
        adata.file.close()


def read_prepared(args: argparse.Namespace, sections: list[str]) -> AnnData:
    """The chosen sections of a prepared ``.h5ad`` (QC-annotated at 5 MADs per section unless
    ``obs["qc_pass"]`` exists)."""
    adata = read_h5ad(args.data)
    adata = adata[adata.obs["slide"].astype(str).isin(sections).to_numpy()].copy()
    adata.obs["slide"] = adata.obs["slide"].astype(str).astype("category")
    if "qc_pass" not in adata.obs:
        sp.pp.annotate_qc(adata, batch_key="slide", nmads=5)
    return adata


def qc_kind(args: argparse.Namespace) -> str:
    """What the VAEs' QC label judged, as the records say it: ``"counts"`` or ``"counts+image"``."""
    return "counts+image" if args.image_qc else "counts"


def with_images(adata: AnnData, images: dict) -> AnnData:
    """A light view of ``adata`` (``obs["slide"]``, ``obsm["spatial"]``) with the image metadata
    ``uns["spatial"] = images``, for :func:`~spartha_pyro.pp.patches.iter_patches` after the
    cache dropped the images."""
    return AnnData(obs=adata.obs[["slide"]].copy(), obsm={"spatial": np.asarray(adata.obsm["spatial"])},
                   uns={"spatial": images})


def image_qc(args: argparse.Namespace, adata: AnnData, sections: list[str]) -> None:
    """Re-annotate ``obs["qc_pass"]`` (5 MADs per section) with the patches judged too, reading
    the patch metrics from the images when the prepared data predate them."""
    if missing_patch_metrics(adata.obs) and not is_h5ad(args):
        view = with_images(adata, read_her2st(args.data, sections=sections).uns["spatial"])
        for name, values in read_patch_qc(view).items():
            adata.obs[PATCH_QC_COLUMNS[name]] = values
    sp.pp.annotate_qc(adata, batch_key="slide", nmads=5, image=True)
    fail = adata.obs["qc_pass"] == "fail"
    print(f"image QC: {int(fail.sum())} of {adata.n_obs} spots fail QC "
          f"({int(adata.obs['qc_pass_image'].sum())} for their patch)", flush=True)


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


def cache_path(args: argparse.Namespace, sections: list[str], extractors=None) -> Path | None:
    """The prepared .h5ad of these sections (outer gene join: each split picks its genes) with
    the feature ``extractors``; without ``extractors``, an existing cache holding every block
    or else the blocks ``--features`` needs (None when neither exists)."""
    def path(names):
        tag = "" if set(names) == set(BLOCKS.values()) else "_" + "+".join(sorted(names))
        return Path(args.cache) / f"her2st_{'-'.join(sorted(sections))}_outer_features{tag}_p{args.patch_size}.h5ad"

    if extractors is not None:
        return path(extractors)
    return next((f for f in (path(BLOCKS.values()), path(needed_extractors(args))) if f.is_file()), None)


def needed_extractors(args: argparse.Namespace) -> list[str]:
    """The feature extractors ``--features`` uses (the neighbour means come with each)."""
    return [n for n in BLOCKS.values() if n in feature_blocks(args.features)]


def prepare(args: argparse.Namespace, sections: list[str]) -> AnnData:
    """Read the sections (OUTER gene join, ``varm["measured"]`` records each table's genes:
    every split then keeps the genes of its training tables only), annotate QC (5 MADs per
    slide), compute the feature blocks ``--features`` needs with their grid-neighbour means
    and the HisToGene patches; cached as .h5ad (a cache holding every block serves any
    ``--features``). A prepared ``.h5ad`` ``--data`` is read as it is (:func:`read_prepared`)."""
    if is_h5ad(args):
        return read_prepared(args, sections)
    cache = cache_path(args, sections)
    if cache is not None:
        adata = read_h5ad(cache)
        if "cell_type" not in adata.obs and "deconv_major" in adata.obsm:  # caches written before read_her2st added it
            adata.obs["cell_type"] = dominant_cell_type(adata.obsm["deconv_major"])
        return adata
    adata = read_her2st(args.data, sections=sections, join="outer")
    sp.pp.annotate_qc(adata, batch_key="slide", nmads=5)
    extractors = needed_extractors(args)
    sp.pp.histology_features(adata, extractors, key_added="features", neighbors=True, progress=False)
    adata.obsm["patches"] = crop_patches(adata, args.patch_size)
    adata.uns.pop("spatial", None)  # images are not needed after preparation
    cache = cache_path(args, sections, extractors)
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


def feature_blocks(spec: str) -> list[str]:
    """Names of the ``obsm["features"]`` blocks that ``spec`` (e.g. ``"lite0+stats+nbr"``) selects."""
    parts = spec.split("+")
    names = [BLOCKS.get(p) for p in parts if p != "nbr"]
    if not names or None in names:
        raise sp.InputError(f"--features must join blocks among {list(BLOCKS)} (and 'nbr') with '+', got {spec!r}")
    if "nbr" in parts:
        names += [f"{n}_neighbors" for n in names]
    return names


def select_features(adata: AnnData, spec: str) -> np.ndarray:
    """Columns of ``obsm["features"]`` named by ``spec``, e.g. ``"lite0+stats+nbr"``; a
    prepared AnnData without those blocks gives its ``obsm["histology"]`` as it is."""
    if "features" not in adata.obsm or "features" not in adata.uns:
        return np.asarray(adata.obsm["histology"], dtype=np.float32)
    names = feature_blocks(spec)
    columns = adata.uns["features"]["columns"]
    return np.concatenate([adata.obsm["features"][:, slice(*columns[n])] for n in names], axis=1)


def gene_panels(train: AnnData, args: argparse.Namespace) -> dict[str, list[str] | None]:
    """Panels chosen on the training sections (and the published ``hist2st_785`` list, only
    when ``genes/hist2st_785.txt`` exists in ``--data``)."""
    mean = np.asarray(normalize_log1p(train.X).mean(0)).ravel()
    panels = {
        "all": None,
        "hvg": hvg_panel(train, n_top=args.n_hvg),
        "top250": list(train.var_names[np.argsort(-mean)[: args.n_top_mean]]),
    }
    file = Path(args.data, "genes", "hist2st_785.txt")
    if file.is_file():
        known = set(train.var_names)
        panels["hist2st_785"] = [g for g in file.read_text().split() if g in known]
    return panels


def modelled_genes(adata: AnnData, panels: dict, train_genes: str) -> AnnData:
    """``adata`` restricted to the genes a generative model is trained on.

    ``"panels"``: the union of the named panels and the mitochondrial (``MT-``/``mt-``)
    genes (so that QCPR's mitochondrial criterion can work), plus a ``__rest__`` column with
    the remaining counts of each spot (so library sizes stay those of the full transcriptome).
    """
    if train_genes == "all":
        return adata
    mito = list(adata.var_names[mito_mask(adata.var_names)])
    genes = list(dict.fromkeys([*(g for p in panels.values() if p is not None for g in p), *mito]))
    keep = adata.var_names.get_indexer(genes)
    rest = np.asarray(adata.X.sum(1)).ravel() - np.asarray(adata[:, keep].X.sum(1)).ravel()
    X = sparse.hstack([adata.X[:, keep], sparse.csr_matrix(rest[:, None])], format="csr", dtype=np.float32)
    out = AnnData(X=X, obs=adata.obs.copy(), obsm=dict(adata.obsm))
    out.var_names = genes + [REST]
    return out


# ---------------------------------------------------------------------------- methods
def usable_labels(train: AnnData, keys) -> list[str]:
    """The label columns among ``keys`` that exist and have at least 2 classes on ``train``."""
    return [k for k in keys if k in train.obs and train.obs[k].dropna().astype(str).nunique() >= 2]


def train_spartha(method: str, train: AnnData, args, seed: int, validation: str | None, label_keys=None, epochs=None,
                  counts_key: str | None = None) -> sp.SPARTHA:
    """SPARTHA (``artifact_latent`` unless ``"spatialdiva"``) with ``label_keys`` (default
    ``--label-keys``: the usable columns, or ``auto``). ``validation="auto"``: the library's
    default (early stopping on the last training section, then a refit on all of them); a
    section: early-stopped on it, with ``--refit`` retrained on every training section for the
    chosen number of epochs; ``None``: trained on every training section for ``epochs``
    (default ``--epochs``) epochs. ``counts_key``: as in :class:`~spartha_pyro.SPARTHA`."""
    keys = args.label_keys if label_keys is None else label_keys
    label_keys = "auto" if list(keys) == ["auto"] else usable_labels(train, keys)

    def fit(validation_sections, epochs):
        model = sp.SPARTHA(
            train, histology_key="histology", label_keys=label_keys, batch_key="slide",
            qc_key="qc_pass", artifact_latent=method != "spatialdiva", counts_key=counts_key, **args.model_kwargs,
        )
        model.train(
            max_epochs=epochs, batch_size=args.batch_size, validation=validation_sections,
            patience=args.patience, seed=seed, progress=False, device=args.device, unimaged=UNIMAGED.get(method, "auto"),
            label_sets=args.label_sets, linear_path=args.linear_path,
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

    The point prediction is :meth:`~spartha_pyro.SPARTHA.predict_mean` over
    ``args.num_samples`` latent draws (seed ``seed * 1000``), with the count noise integrated
    out (``--point-counts expected``) or sampled (``sampled``); normalised over every modelled
    column, ``__rest__`` included, which is then dropped. Counts are drawn
    ``args.sample_chunk`` at a time with seeds ``seed * 1000 + chunk`` until the first chunk
    (QCPR) and the first ``args.calib_samples`` draws (kept with their NB means, same seeds, so
    the same latent and library draws, for the calibration scores) are in hand.

    Returns
    -------
    ``(prediction (spots × genes), genes, counts of the first chunk (sample × spot × column),
    (count draws, NB-mean draws, theta) over every modelled column)``.
    """
    first, kept, means = None, None, None
    n_kept = min(args.calib_samples, args.num_samples)
    for chunk in range(max(1, -(-n_kept // args.sample_chunk))):
        start = chunk * args.sample_chunk
        n = min(args.sample_chunk, args.num_samples - start)
        counts = model.predict_expression(adata, num_samples=n, artifact=artifact, seed=seed * 1000 + chunk)
        first = counts if first is None else first
        if start < n_kept:  # filled in place: a concatenation would need the draws twice
            if kept is None:
                kept, means = (np.empty((n_kept, *counts.shape[1:]), np.float32) for _ in range(2))
            stop = min(start + n, n_kept)
            kept[start:stop] = counts.values[: stop - start]
            means[start:stop] = model.predict_expression(
                adata, num_samples=n, artifact=artifact, value="mean", seed=seed * 1000 + chunk
            ).values[: stop - start]
    return (*point_prediction(model, adata, artifact, args.point_counts, args, seed), first,
            (kept, means, model.dispersion))


def point_prediction(model: sp.SPARTHA, adata: AnnData, artifact: str, counts: str, args, seed: int,
                     linear_path: bool = True):
    """``(predict_mean over args.num_samples draws (spots × genes), genes)``, seed ``seed * 1000``,
    normalised over every modelled column and ``__rest__`` then dropped."""
    point = model.predict_mean(adata, num_samples=args.num_samples, artifact=artifact, counts=counts,
                               seed=seed * 1000, chunk=args.sample_chunk, linear_path=linear_path)
    keep = (point["gene"] != REST).values
    return point.values[:, keep], list(point["gene"].values[keep])


def nb_baseline(predictor, train: AnnData, test_hist: AnnData, args, seed: int):
    """Calibration draws of a point predictor wrapped in an NB (:class:`NBWrapper`; per-gene
    scale and dispersion fit on section-grouped cross-fitted training predictions, library by
    the ``--nb-library`` rule), over the modelled columns ``train`` holds."""
    nb = NBWrapper(predictor, library=args.nb_library, group_key="slide", seed=seed).fit(train)
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
    the training sections with every label of the model) to its labels, slide and QC, fit on
    70% of the spots, scored on the other 30%."""
    adata, dims = model.adata, model.module.model.dims
    keys = list(model.registry.label_keys)
    labelled = adata.obs[keys].notna().all(1).to_numpy() if keys else np.ones(adata.n_obs, dtype=bool)
    latents = {
        f"z_{k}": model.get_latent(latent=k)[labelled]
        for k in ("y", "d", "r", "x") if (k == "y" and keys) or f"z_{k}" in dims
    }
    obs = adata.obs[labelled]
    factors = {name: obs[col].astype(str).to_numpy() for name, col in ([(k, k) for k in keys] + [("slide", "slide"), ("qc", "qc_pass")])}
    n = int(labelled.sum())
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(0.7 * n)
    return probe_matrix(latents, factors, np.sort(perm[:cut]), np.sort(perm[cut:]), seed=seed)


def with_extra_sections(train: AnnData, extra: AnnData) -> AnnData:
    """The imaged training spots and the count-only spots as one AnnData (histology NaN where
    there is no image), via :func:`spartha_pyro.pp.combine_sections`."""
    return combine_parts({"imaged": train, "extra": extra})


def combine_parts(parts: dict[str, AnnData]) -> AnnData:
    """``parts`` stacked by :func:`spartha_pyro.pp.combine_sections` (``obs["has_counts"]``,
    histology NaN where missing), each spot keeping its ``obs["slide"]`` as a category."""
    combined = sp.pp.combine_sections(parts, histology_key="histology", batch_key="part", counts_key="has_counts")
    combined.obs["slide"] = combined.obs["slide"].astype(str).astype("category")
    return combined


def with_target_histology(train: AnnData, target: AnnData) -> AnnData:
    """The training spots and the held-out section's spots as image-only spots (``has_counts``
    False; no QC flag, no label: only ``obs["slide"]`` and ``obsm["histology"]`` are taken)."""
    train = train.copy()
    qc = train.obs["qc_pass"]
    train.obs["qc_pass"] = qc.map({True: "pass", False: "fail"}) if pd.api.types.is_bool_dtype(qc) else qc
    spots = AnnData(obs=pd.DataFrame({"slide": target.obs["slide"].astype(str)}, index=target.obs_names),
                    obsm={"histology": np.asarray(target.obsm["histology"])})
    return combine_parts({"train": train, "target": spots})


def run_method(method, train, test, panels, args, seed, validation, extra=None):
    """Predictions for ``test`` from its histology alone: ``{row: (log1p-normalised
    prediction (spots × genes), genes, sampled counts or None, calibration draws or None)}``,
    for SPARTHA the probe matrix, and for the VAEs what early stopping chose
    (``{"epochs": ..., "val_pcc_gene": ...}``, else ``{}``). Ridge and the mean get their
    calibration draws from an NB around them, fit on the modelled columns (as SPARTHA's)."""
    if method in QC_REFERENCES:
        return {method: (None, *qc_reference(method, train, test, panels, args, seed), None)}, None, {}
    keep = ["histology", "patches"] if method == "histogene" else ["histology"]
    test_hist = AnnData(obs=test.obs[["slide", "array_x", "array_y"]].copy(), obsm={k: test.obsm[k] for k in keep})
    if method in ("mean", "ridge"):
        scaling = args.model_kwargs.get("histology_scaling", "section")  # ridge sees SPARTHA's features
        section_key = "slide" if scaling == "section" else None
        make = (lambda: MeanPredictor()) if method == "mean" else (
            lambda: RidgePredictor("histology", group_key="slide", section_key=section_key))
        calibration = nb_baseline(make(), modelled_genes(train, panels, args.train_genes), test_hist, args, seed)
        return {method: (make().fit(train).predict(test_hist), train.var_names, None, calibration)}, None, {}
    if method == "histogene":
        model = HisToGene(seed=seed).fit(train, coord_key=("array_x", "array_y"), epochs=args.histogene_epochs)
        return {method: (model.predict(test_hist, coord_key=("array_x", "array_y")), train.var_names, None, None)}, None, {}
    if args.pca:
        train, test_hist = pca_histology(train, test_hist, args.pca)
    if method == TRANSDUCTIVE:
        model = train_spartha(method, with_target_histology(modelled_genes(train, panels, args.train_genes), test_hist),
                              args, seed, validation, counts_key="has_counts")
        return {method: posterior_predictive(model, test_hist, "posterior", args, seed)}, None, chosen(model)
    if method in EXTRA_METHODS:
        if extra is None:
            raise sp.InputError(f"{method} needs --extra-sections")
        combined = modelled_genes(with_extra_sections(train, extra), panels, args.train_genes)
        model = train_spartha(method, combined, args, seed, validation, EXTRA_METHODS[method], args.extra_epochs)
        return {method: posterior_predictive(model, test_hist, "posterior", args, seed)}, None, chosen(model)
    model = train_spartha(method, modelled_genes(train, panels, args.train_genes), args, seed, validation)
    modes = {"spartha": "posterior", "spartha_pass": "pass"} if method == "spartha" else {method: "posterior"}
    out = {row: posterior_predictive(model, test_hist, artifact, args, seed) for row, artifact in modes.items()}
    if method == "spartha" and args.also_sampled:  # the other point statistic of the same model
        other = "sampled" if args.point_counts == "expected" else "expected"
        out[f"spartha_{other}"] = (*point_prediction(model, test_hist, "posterior", other, args, seed), None, None)
    if args.also_model_only and model.linear_path is not None:  # the same model without its linear path
        out[f"{method}_model_only"] = (*point_prediction(model, test_hist, "posterior", args.point_counts, args, seed,
                                                         linear_path=False), None, None)
    return out, probe(model, seed) if method == "spartha" else None, chosen(model)


def chosen(model: sp.SPARTHA) -> dict[str, float]:
    """What the validation stage chose: ``epochs`` and ``val_pcc_gene``, and with spots without
    histology ``unimaged_used`` (1/0) and their validation scores ``unimaged_score_use`` /
    ``unimaged_score_ignore``, with several label sets ``label_sets_left_out`` (how many) and
    ``label_sets_score_<a+b>`` per combination tried, and ``linear_share`` with the validation
    score of each share tried, ``linear_score_<share>`` (empty without validation)."""
    selection = model.selection or {}
    out = {k: float(v) for k, v in selection.items() if k in ("epochs", "val_pcc_gene") and v is not None}
    if "linear_path" in selection:
        out["linear_share"] = float(selection["linear_path"]["share"])
        out.update({f"linear_score_{k}": float(v) for k, v in selection["linear_path"]["scores"].items()})
    if "unimaged" in selection:
        out["unimaged_used"] = float(selection["unimaged"]["used"])
        out.update({f"unimaged_score_{k}": float(v) for k, v in selection["unimaged"]["scores"].items()})
    if "label_sets" in selection:
        out["label_sets_left_out"] = float(len(selection["label_sets"]["left_out"]))
        out.update({f"label_sets_score_{k}": float(v) for k, v in selection["label_sets"]["scores"].items()})
    return out


def qc_reference(method: str, train: AnnData, test: AnnData, panels, args, seed: int) -> tuple[list[str], xr.DataArray]:
    """Counts of a QC reference row on the genes the generative models are scored on (the
    modelled columns, ``__rest__`` left out): ``"observed"`` = the real held-out spots
    themselves (one "draw"); ``"constant"`` = the training-mean profile of the modelled
    columns with Poisson noise at each real spot's library, ``--sample-chunk`` draws (as many
    as the generative models' QCPR uses)."""
    test_m = modelled_genes(test, panels, args.train_genes)
    keep = [i for i, g in enumerate(test_m.var_names) if g != REST]
    genes = [test_m.var_names[i] for i in keep]
    if method == "observed":
        counts = test_m.X[:, keep].toarray()[None] if sparse.issparse(test_m.X) else np.asarray(test_m.X)[None, :, keep]
    else:
        train_m = modelled_genes(train, panels, args.train_genes)
        library = np.asarray(test.X.sum(1)).ravel()
        counts = constant_profile_counts(train_m.X, library, n_samples=args.sample_chunk, seed=seed)[..., keep]
    return genes, xr.DataArray(counts, dims=("sample", "spot", "gene"), coords={"gene": genes})


# ---------------------------------------------------------------------------- main
def stored_genes(panels: dict, var_names, train_genes: str) -> set[str]:
    """Genes whose point predictions are kept for the paired block bootstrap: those of the
    named panels, and every gene when the generative models are trained on all genes."""
    keep = {g for v in panels.values() if v is not None for g in v}
    return set(var_names) if train_genes == "all" else keep


def score(pred, genes, counts, calibration, test, obs, panels, args, seed, reference: str | None = None) -> tuple[list[dict], dict]:
    """Point metrics on every panel the prediction covers, QCPR and the QC fidelity (energy
    distance of the QC metrics, :func:`~spartha_pyro.metrics.qc_fidelity`) from the sampled
    counts, and calibration scores (coverage, NB-mixture NLL, CRPS on log1p) from the
    calibration draws. ``reference="observed"``: the counts are the real spots themselves,
    whose fidelity is 0 by construction and is not recorded.

    Returns
    -------
    ``(records, scores)``; ``scores``: ``genes``, per-gene PCC ``pcc_gene`` (over the test
    spots), per-spot PCC per covered panel ``pcc_spot``, and the point prediction on the
    :func:`stored_genes` (``pred``, ``pred_genes``); empty without a point prediction.
    """
    genes = pd.Index(genes)
    cols = test.var_names.get_indexer(genes)
    rows, scores = [], {}
    if pred is not None:
        pred = pred.toarray() if sparse.issparse(pred) else np.asarray(pred)
        covered = {k: v for k, v in panels.items() if (v is None and len(genes) == test.n_vars) or (v is not None and genes.isin(v).sum() == len(v))}
        o = obs[:, cols]
        rows += regression_metrics(pred, o, panels=covered, var_names=genes).to_dict("records")
        index = {k: slice(None) if v is None else genes.get_indexer(v) for k, v in covered.items()}
        keep = genes.isin(list(stored_genes(panels, test.var_names, args.train_genes)))
        scores = {
            "genes": np.asarray(genes, dtype=str),
            "pcc_gene": pcc_gene(pred, o, reduce=False).astype(np.float32),
            "pcc_spot": {k: pcc_spot(pred[:, i], o[:, i], reduce=False).astype(np.float32) for k, i in index.items()},
            "pred": pred[:, keep].astype(np.float32),
            "pred_genes": np.asarray(genes[keep], dtype=str),
        }
    if counts is not None:  # QC of the modelled genes (``__rest__`` left out) against the real spots
        generated = counts.sel(gene=list(genes)).values
        real = test.X[:, cols]
        rows += [{"panel": "qc", "metric": k, "value": v} for k, v in qcpr(generated, real, genes).items()]
        rows.append({"panel": "qc", "metric": "qc_n_mt_genes", "value": float(mito_mask(genes).sum())})
        if reference != "observed":
            rows.append({"panel": "qc", "metric": "qc_energy_distance", "value": qc_fidelity(generated, real, genes, seed=seed)})
    if calibration is not None:
        observed = modelled_genes(test, panels, args.train_genes)
        named = {k: v for k, v in panels.items() if v is not None}
        rows += calibration_records(*calibration, observed.X, panels=named, var_names=observed.var_names, seed=seed)
    return rows, scores


#: what every run reads: (every spot, the count-only spots or None, args); set once per process
_SHARED: tuple | None = None


def limit_threads(threads: int) -> None:
    """Cap the intra-op threads of torch and BLAS in this process."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


def _init_worker(shared: tuple, threads: int | None = None) -> None:
    """Keep the data every run reads (and, in a pool process, cap its threads)."""
    global _SHARED
    _SHARED = shared
    split_data.cache_clear()
    if threads is not None:
        limit_threads(threads)


def training_genes(adata: AnnData, train_sections) -> pd.Index:
    """The gene universe of a split: genes in the count table of EVERY training section
    (``varm["measured"]`` from the outer join; all genes when it is absent). A gene missing
    from the test section's table is zero there, never a reason to drop it."""
    if "measured" not in adata.varm:
        return adata.var_names
    measured = pd.DataFrame(adata.varm["measured"], index=adata.var_names)
    cols = [s for s in train_sections if s in measured.columns]
    return adata.var_names[measured[cols].to_numpy(dtype=bool).all(1)] if cols else adata.var_names


@lru_cache(maxsize=1)  # runs are submitted grouped by split, so a process rarely prepares one twice
def split_data(train_sections: tuple[str, ...], test_section: str) -> tuple[AnnData, AnnData, np.ndarray, dict]:
    """Training spots, test spots (both on the training tables' genes, :func:`training_genes`),
    the test spots' log1p-normalised counts and the gene panels (from the training spots)."""
    adata, _, args = _SHARED
    genes = training_genes(adata, train_sections)
    train = adata[adata.obs["slide"].isin(train_sections).to_numpy(), genes].copy()
    test = adata[(adata.obs["slide"] == test_section).to_numpy(), genes].copy()
    return train, test, normalize_log1p(test.X).toarray(), gene_panels(train, args)


def run_task(task: tuple) -> tuple[list[dict], xr.DataArray | None, dict]:
    """One ``(train sections, test section, validation, method, seed)`` run: trains, predicts
    the test section from histology, scores it; returns its records, SPARTHA's probe and the
    per-row scores of :func:`score` (with the test spots' names, coordinates and panels)."""
    _, extra, args = _SHARED
    train_sections, test_section, validation, method, seed = task
    train, test, obs, panels = split_data(train_sections, test_section)
    start = time.perf_counter()
    preds, probe_da, choice = run_method(method, train, test, panels, args, seed, validation, extra)
    seconds = time.perf_counter() - start
    base = {"method": method, "section": test_section, "seed": seed, "seconds": seconds,
            "features": args.features, "train_genes": args.train_genes, "qc": qc_kind(args), "panel": "train"}
    records, scores = [{**base, "metric": f"chosen_{k}", "value": v} for k, v in choice.items()], {}
    for row, (pred, genes, counts, calibration) in preds.items():
        rows, scores[row] = score(pred, genes, counts, calibration, test, obs, panels, args, seed, reference=row if row in QC_REFERENCES else None)
        records += [
            {"method": row, "section": test_section, "seed": seed, "seconds": seconds,
             "features": args.features, "train_genes": args.train_genes, "qc": qc_kind(args), **r}
            for r in rows
        ]
        pcc = {r["panel"]: round(r["value"], 4) for r in rows if r["metric"] == "pcc_gene"}
        qc = {r["metric"]: round(r["value"], 3) for r in rows if r["metric"] in ("qcpr3", "qc_energy_distance")}
        cov = {r["panel"]: round(r["value"], 3) for r in rows if r["metric"] == "coverage90"}
        print(f"{row:12s} test={test_section} seed={seed} {seconds:7.1f}s pcc_gene={pcc} coverage90={cov} {qc}", flush=True)
    context = {
        "section": test_section, "seed": seed, "spots": np.asarray(test.obs_names, dtype=str),
        "coords": test.obs[["array_x", "array_y"]].to_numpy(dtype=np.float64),
        "panels": {k: np.asarray(v, dtype=str) for k, v in panels.items() if v is not None},
    }
    return records, probe_da, {"context": context, "rows": scores}


def n_jobs(jobs: int, device: str, n_tasks: int) -> int:
    """``--jobs``; 0 means one process per CPU core on CPU (the models are too small for
    intra-op threads to pay) and one process on a GPU."""
    if jobs < 0:
        raise sp.InputError(f"--jobs must be >= 0, got {jobs}")
    if jobs == 0:
        jobs = 1 if resolve_device(device).type == "cuda" else os.cpu_count() or 1
    return max(1, min(jobs, n_tasks))


def run_tasks(tasks: list[tuple], shared: tuple, jobs: int, run=run_task, initializer=_init_worker):
    """Yield ``run(task)`` results (default :func:`run_task`), in ``jobs`` spawned processes of
    ``cpu_count // jobs`` threads each when ``jobs > 1`` (in completion order), else in this
    process in order; ``initializer(shared[, threads])`` first hands each process the data."""
    if jobs == 1:
        initializer(shared)
        yield from map(run, tasks)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=initializer, initargs=(shared, threads)) as pool:
        for future in as_completed([pool.submit(run, t) for t in tasks]):
            yield future.result()


def paired_statistics(results: list[dict], records: list[dict], adata: AnnData, splits, args) -> list[dict]:
    """Paired comparisons of ``--paired-reference`` (default :data:`PAIRED_REFERENCE`) with every other row that has the same
    kind of score, as records whose ``method`` is ``"<reference>_vs_<row>"``:

    - per ``(section, seed)``, a spatial block-bootstrap CI of the difference in mean per-gene
      PCC on each panel both predictions cover (:func:`~spartha_pyro.metrics.block_bootstrap_ci`,
      tiles of ``--block-size`` array units, ``--n-boot`` replicates): metrics
      ``pcc_gene_diff``, ``pcc_gene_diff_ci_low``, ``pcc_gene_diff_ci_high``, ``n_blocks``;
      and the differences of the QC scores (``qcpr3_diff``, ...);
    - with at least two held-out sections, over sections (``section="all"``; each section's
      difference averaged over seeds first): ``<metric>_diff_mean``, ``<metric>_diff_p_value``
      (two-sided sign-flip test), ``..._p_value_greater`` (reference better on PCC/QCPR, worse
      on the energy distance) and ``..._p_value_less``, ``n_sections``. With 5 sections the
      smallest two-sided p is 0.0625 and the smallest one-sided 0.03125.
    """
    ref = args.paired_reference
    runs = {(r["context"]["section"], r["context"]["seed"], row): sc for r in results for row, sc in r["rows"].items() if sc}
    contexts = {(r["context"]["section"], r["context"]["seed"]): r["context"] for r in results}
    observed = {}
    for train_sections, test_section in splits:
        genes = training_genes(adata, train_sections)
        test = adata[(adata.obs["slide"] == test_section).to_numpy(), genes]
        observed[test_section] = (pd.Index(genes), normalize_log1p(test.X))
    out = []
    base = {"features": args.features, "train_genes": args.train_genes}
    skip = {ref, "spartha_pass"} if ref == "spartha" else {ref}  # spartha_pass is the same trained model
    others = sorted({row for (_, _, row) in runs if row not in skip}, key=lambda r: ROWS.index(r) if r in ROWS else 99)
    for (section, seed), ctx in contexts.items():
        a = runs.get((section, seed, ref))
        if a is None:
            continue
        genes_all, obs = observed[section]
        panels = dict(ctx["panels"])
        if args.train_genes == "all":
            panels["all"] = np.asarray(genes_all, dtype=str)
        for other in others:
            b = runs.get((section, seed, other))
            if b is None:
                continue
            name = f"{ref}_vs_{other}"
            for panel, pg in panels.items():
                ia, ib = pd.Index(a["pred_genes"]).get_indexer(pg), pd.Index(b["pred_genes"]).get_indexer(pg)
                if (ia < 0).any() or (ib < 0).any():
                    continue
                o = obs[:, genes_all.get_indexer(pg)]
                ci = block_bootstrap_ci(a["pred"][:, ia], b["pred"][:, ib], o, ctx["coords"], block_size=args.block_size, n_boot=args.n_boot, seed=seed)
                out += [
                    {"method": name, "section": section, "seed": seed, "panel": panel, "metric": m, "value": v, **base}
                    for m, v in (("pcc_gene_diff", ci.estimate), ("pcc_gene_diff_ci_low", ci.ci_low),
                                 ("pcc_gene_diff_ci_high", ci.ci_high), ("n_blocks", float(ci.n_blocks)))
                ]
    # QC score differences per (section, seed)
    df = pd.DataFrame([r for r in records if r["metric"] in PAIRED_QC])
    if not df.empty:
        wide = df.pivot_table(index=["section", "seed", "metric"], columns="method", values="value", aggfunc="mean")
        if ref in wide:
            for other in [c for c in wide.columns if c not in skip | {"observed"}]:
                d = (wide[ref] - wide[other]).dropna()
                out += [
                    {"method": f"{ref}_vs_{other}", "section": sec, "seed": int(seed), "panel": "qc", "metric": f"{m}_diff", "value": float(v), **base}
                    for (sec, seed, m), v in d.items()
                ]
    # sign-flip tests over sections
    diffs = pd.DataFrame([r for r in out if r["metric"].endswith("_diff")])
    tests = []
    if not diffs.empty:
        per_section = diffs.groupby(["method", "panel", "metric", "section"])["value"].mean()
        for (method, panel, metric), v in per_section.groupby(level=[0, 1, 2]):
            if len(v) < 2:
                continue
            # "greater" = the reference is better: higher PCC / QCPR, lower energy distance
            sign = -1.0 if metric.startswith("qc_energy_distance") else 1.0
            res = {alt: paired_sign_flip_test(sign * v.to_numpy(), alt) for alt in ("two-sided", "greater", "less")}
            tests += [
                {"method": method, "section": "all", "seed": None, "panel": panel, "metric": m, "value": float(x), **base}
                for m, x in ((f"{metric}_mean", v.mean()), (f"{metric}_p_value", res["two-sided"].p_value),
                             (f"{metric}_p_value_greater", res["greater"].p_value),
                             (f"{metric}_p_value_less", res["less"].p_value), ("n_sections", float(len(v))))
            ]
    return out + tests


def write_scores(path: Path, results: list[dict], save_predictions: bool) -> None:
    """Per-gene and per-spot scores of every run (and, optionally, the point predictions) in
    one compressed ``.npz``: ``spots/<section>``, ``coords/<section>``,
    ``panel/<section>/<panel>``, ``genes|pcc_gene/<row>/<section>/<seed>``,
    ``pcc_spot/<row>/<section>/<seed>/<panel>``, with ``--save-predictions``
    ``pred|pred_genes/<row>/<section>/<seed>`` (float16, log1p counts per 10,000)."""
    arrays = {}
    for r in results:
        ctx = r["context"]
        sec, seed = ctx["section"], ctx["seed"]
        arrays[f"spots/{sec}"], arrays[f"coords/{sec}"] = ctx["spots"], ctx["coords"]
        arrays.update({f"panel/{sec}/{k}": v for k, v in ctx["panels"].items()})
        for row, sc in r["rows"].items():
            if not sc:
                continue
            key = f"{row}/{sec}/{seed}"
            arrays[f"genes/{key}"], arrays[f"pcc_gene/{key}"] = sc["genes"], sc["pcc_gene"]
            arrays.update({f"pcc_spot/{key}/{k}": v for k, v in sc["pcc_spot"].items()})
            if save_predictions:
                arrays[f"pred/{key}"], arrays[f"pred_genes/{key}"] = sc["pred"].astype(np.float16), sc["pred_genes"]
    np.savez_compressed(path, **arrays)


def print_paired(stats: list[dict]) -> None:
    """The sign-flip tests over sections and the per-section bootstrap CIs, as text tables."""
    df = pd.DataFrame(stats)
    if df.empty:
        return
    tests = df[(df["section"] == "all") & (df["metric"] != "n_sections")].copy()
    if not tests.empty:
        split = tests["metric"].str.extract(r"^(?P<score>.+_diff)_(?P<stat>mean|p_value(?:_greater|_less)?)$")
        tests = tests.assign(score=split["score"], stat=split["stat"])
        t = tests.pivot_table(index=["method", "panel", "score"], columns="stat", values="value", aggfunc="first")
        t = t[[c for c in ("mean", "p_value", "p_value_greater", "p_value_less") if c in t]]
        n = int(df.loc[df["metric"] == "n_sections", "value"].max())
        print(f"\npaired over {n} sections (reference minus row, mean over sections; sign-flip p-values: two-sided, "
              "'greater' = reference better, i.e. higher PCC/QCPR or lower energy distance)")
        print(t.round(4).to_string())
    ci = df[(df["section"] != "all") & df["metric"].str.startswith("pcc_gene_diff")]
    if not ci.empty:
        t = ci.pivot_table(index=["method", "panel", "section"], columns="metric", values="value", aggfunc="mean")
        print("\nper-section block-bootstrap CIs of the per-gene PCC difference (mean over seeds)")
        print(t.round(4).to_string())


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    sections = list(dict.fromkeys(args.train_sections + args.test_sections))
    check_inputs(args, sections)
    adata = prepare(args, sections)
    if args.image_qc:
        image_qc(args, adata, sections)
    adata.obsm["histology"] = select_features(adata, args.features)
    if is_h5ad(args) and "features" not in adata.uns:
        print(f"note: the histology vectors are obsm['histology'] of {args.data} ({adata.obsm['histology'].shape[1]} "
              "columns); --features does not apply", flush=True)
    generative = [m for m in args.methods if m in GENERATIVE]
    if generative:
        if not mito_mask(adata.var_names).any():
            print("note: no MT-/mt- genes in the data: QCPR's mitochondrial criterion and the fidelity score's "
                  "mitochondrial share are off (records: qc_n_mt_genes = 0)", flush=True)
        dropped = [k for k in args.label_keys if k != "auto" and not usable_labels(adata, [k])]
        if dropped:
            print(f"note: label columns {dropped} are absent or have fewer than 2 classes: not used", flush=True)
    extra = None
    if args.extra_sections:
        adata, extra = prepare_extra(args, adata)
        print(f"with --extra-sections: {extra.n_obs} count-only spots from {extra.obs['slide'].nunique()} sections; "
              f"{adata.n_vars} genes are in their tables (each split keeps those of its training tables)", flush=True)
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
        methods = list(dict.fromkeys([*args.methods, *(QC_REFERENCES if generative else ())]))
        tasks += [(tuple(train_sections), test_section, validation, method, seed) for method in methods for seed in args.seeds]
    jobs = n_jobs(args.jobs, args.device, len(tasks))
    print(f"{len(tasks)} runs (method x seed x split) in {jobs} process(es)", flush=True)
    records: list[dict] = []
    probes: list[xr.DataArray] = []
    results: list[dict] = []
    start = time.perf_counter()
    for rows, probe_da, scores in run_tasks(tasks, (adata, extra, args), jobs):
        records += rows
        results.append(scores)
        if probe_da is not None:
            probes.append(probe_da)
        Path(args.out).write_text(json.dumps(records, indent=1))  # after every run: a run cut short keeps its records
    print(f"{len(tasks)} runs: {time.perf_counter() - start:.0f} s wall clock in {jobs} process(es)", flush=True)
    paired = paired_statistics(results, records, adata, splits, args)
    records += paired
    Path(args.out).write_text(json.dumps(records, indent=1))
    write_scores(Path(args.out).with_suffix(".npz"), results, args.save_predictions)
    methods = [r for r in ROWS if any(x["method"] == r for x in records)]
    predictors = [m for m in methods if m not in QC_REFERENCES]
    print(format_table(records, panels=PANELS, methods=predictors, qc_metrics=()))
    if any(r["metric"] == "qcpr3" for r in records):
        print("\nQC of generated spots vs the real held-out spots (observed: the real spots themselves; constant: "
              "training-mean profile + Poisson; energy distance: lower is better)")
        print(format_table(records, panels=(), methods=methods, qc_metrics=("qcpr3", "qcpr4", "qcpr5", "qc_energy_distance")))
    print_paired(paired)
    if any(r["metric"] in CALIBRATION for r in records):
        print("\ncalibration of the predictive distributions (ridge and mean: NB around the point prediction)")
        print(format_table(records, panels=PANELS[1:], metrics=CALIBRATION, qc_metrics=(), methods=predictors))
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
