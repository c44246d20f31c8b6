"""HER2-positive breast cancer legacy Spatial Transcriptomics data (Andersson et al. 2021).

Layout read by :func:`read_her2st` (the layout of ``shared/data/her2st``)::

    counts/<S>.tsv.gz                         spots × genes raw UMI counts, rows "<x>x<y>"
    spots/<S>_selection.tsv                   x y new_x new_y pixel_x pixel_y selected
    images/<S>.jpg                            full-resolution H&E (≈0.69 µm/px), optional
    images/<S>_lowres.png                     downscaled H&E (A1 only), optional
    pathology/<S>_labeled_coordinates.tsv     pathologist region per spot, optional
    clusters/<S>-cluster-annotation.tsv.gz    expression cluster per spot (column ``label``)
    clusters/motivation.csv                   cluster names per patient (first 3 columns)
    deconvolution/{major,minor,subset}.zip    stereoscope proportions, optional

Legacy ST: spots of 100 µm diameter on a 200 µm grid, so ``spot_diameter_fullres`` ≈ 145 px.
"""
from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._errors import InputError
from ..io._images import image_size, load_rgb
from ..io.write import atomic_path
from ..pp.combine import align_genes, check_gene_overlap, joined_genes, measured_genes

#: The 35 sections with counts (patients A–H).
HER2ST_SECTIONS: tuple[str, ...] = tuple(
    f"{p}{i}" for p, n in zip("ABCDEFGH", (6, 6, 5, 6, 3, 3, 3, 3)) for i in range(1, n + 1)
)
#: Sections with a full-resolution H&E image.
HER2ST_IMAGED: tuple[str, ...] = ("B4", "C2", "C3", "C4", "C5")
MICRONS_PER_PIXEL = 0.69  #: full-resolution image pixel size in µm
SPOT_DIAMETER_UM = 100.0  #: legacy ST spot diameter in µm
#: full-resolution width (px) of sections shipped only as a downscaled PNG
_LOWRES_FULLRES_WIDTH = {"A1": 6954}
#: fraction of spot centres outside the image above which the scale is declared wrong
_MAX_OUTSIDE_FRACTION = 0.05
DECONVOLUTION_LEVELS = ("major", "minor", "subset")

HER2ST_BASE_URL = "https://raw.githubusercontent.com/almaan/her2st/master"
_REMOTE_FILES = {
    "counts/{s}.tsv.gz": "data/ST-cnts/{s}.tsv.gz",
    "spots/{s}_selection.tsv": "data/ST-spotfiles/{s}_selection.tsv",
    "clusters/{s}-cluster-annotation.tsv.gz": "res/ST-cluster/lbl/{s}-cluster-annotation.tsv.gz",
}
_REMOTE_IMAGES = {
    "B4": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    "C5": "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg",
}
_REMOTE_PATHOLOGY = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")


def _read_counts(file: Path, section: str) -> tuple[pd.Index, pd.Index, sp.csr_matrix]:
    """Parse one counts table into CSR without keeping more than one section dense.

    Returns spot names (``"<x>x<y>"``), gene names and a float32 CSR ``(n_spots, n_genes)``
    of integer values.
    """
    names: list[str] = []
    blocks: list[sp.csr_matrix] = []
    rows: list[np.ndarray] = []
    try:
        with gzip.open(file, "rt") as fh:
            genes = pd.Index(fh.readline().rstrip("\n").split("\t")[1:])
            for lineno, line in enumerate(fh, start=2):
                name, _, rest = line.rstrip("\n").partition("\t")
                try:
                    row = np.array(rest.split("\t"), dtype=np.float64)
                except ValueError as err:
                    raise InputError(
                        f"section {section!r}: non-numeric count in {str(file)!r} line {lineno}"
                    ) from err
                if row.size != genes.size:
                    raise InputError(
                        f"section {section!r}: {str(file)!r} line {lineno} has {row.size} values "
                        f"for {genes.size} genes"
                    )
                names.append(name)
                rows.append(row)
                if len(rows) == 256:  # bounded dense buffer
                    blocks.append(sp.csr_matrix(np.vstack(rows)))
                    rows = []
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise InputError(f"section {section!r}: cannot read counts file {str(file)!r}: {err}") from err
    if rows:
        blocks.append(sp.csr_matrix(np.vstack(rows)))
    if not names:
        raise InputError(f"section {section!r}: counts file {str(file)!r} has no spots")
    X = sp.vstack(blocks, format="csr")
    if not np.isfinite(X.data).all() or (X.data < 0).any() or (X.data != np.round(X.data)).any():
        raise InputError(
            f"section {section!r}: counts in {str(file)!r} must be non-negative integers "
            "(raw UMI counts, not normalised values)"
        )
    spots = pd.Index(names)
    for what, idx in (("spot", spots), ("gene", genes)):
        if not idx.is_unique:
            dup = idx[idx.duplicated()].unique()[:5].tolist()
            raise InputError(f"section {section!r}: duplicate {what} names in {str(file)!r}: {dup}")
    return spots, genes, X.astype(np.float32)


def _read_selection(file: Path, section: str) -> pd.DataFrame:
    """Selected spots (``selected == 1``) indexed by ``"<x>x<y>"`` with pixel coordinates."""
    if not file.is_file():
        raise InputError(f"section {section!r}: spot coordinate file {str(file)!r} does not exist")
    try:
        sel = pd.read_csv(file, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"section {section!r}: spot coordinate file {str(file)!r} cannot be parsed: {err}") from None
    columns = ["x", "y", "pixel_x", "pixel_y"]
    missing = set(columns) - set(sel.columns)
    if missing:
        raise InputError(f"section {section!r}: {str(file)!r} lacks columns {sorted(missing)}")
    numeric = sel[columns].apply(pd.to_numeric, errors="coerce")
    finite = np.isfinite(numeric.to_numpy(dtype=np.float64)).all(1)
    if not finite.all():
        rows = sel.index[~finite][:5].tolist()
        raise InputError(f"section {section!r}: {str(file)!r} has missing or non-numeric coordinates in rows {rows}")
    sel[columns] = numeric
    if "selected" in sel:
        sel = sel[sel["selected"] == 1]
    sel.index = sel["x"].astype(int).astype(str) + "x" + sel["y"].astype(int).astype(str)
    if not sel.index.is_unique:
        dup = sel.index[sel.index.duplicated()].unique()[:5].tolist()
        raise InputError(f"section {section!r}: duplicate spots in {str(file)!r}: {dup}")
    return sel


def _read_labels(root: Path, section: str) -> tuple[pd.Series | None, pd.Series | None]:
    """Expression-cluster numbers and pathology labels indexed by ``"<x>x<y>"`` (or None)."""
    cluster = pathology = None
    cfile = root / "clusters" / f"{section}-cluster-annotation.tsv.gz"
    if cfile.is_file():
        cl = pd.read_csv(cfile, sep="\t")
        cl.index = cl["x"].astype(int).astype(str) + "x" + cl["y"].astype(int).astype(str)
        cluster = cl["label"][~cl.index.duplicated()]
    pfile = root / "pathology" / f"{section}_labeled_coordinates.tsv"
    if pfile.is_file():
        pa = pd.read_csv(pfile, sep="\t").dropna(subset=["x", "y", "label"])
        # x, y are the refined (new_x, new_y) array positions: round to the grid
        pa.index = pa["x"].round().astype(int).astype(str) + "x" + pa["y"].round().astype(int).astype(str)
        pathology = pa["label"][~pa.index.duplicated()]
    return cluster, pathology


def _read_motivation(root: Path) -> dict[str, str]:
    """``"<patient>_<cluster>" -> annotation`` from ``clusters/motivation.csv`` (first 3 columns)."""
    file = root / "clusters" / "motivation.csv"
    if not file.is_file():
        return {}
    # later columns contain unquoted commas: parse only the first three fields of each line
    out = {}
    with open(file, encoding="utf-8") as fh:
        next(fh, None)
        for line in fh:
            parts = line.rstrip("\n").split(",", 3)
            if len(parts) >= 3:
                out[f"{parts[0].strip()}_{parts[1].strip()}"] = parts[2].strip()
    return out


def _read_deconvolution(root: Path, level: str, sections: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per-section proportion tables (spots × cell types) from ``deconvolution/<level>.zip``."""
    file = root / "deconvolution" / f"{level}.zip"
    out: dict[str, pd.DataFrame] = {}
    if not file.is_file():
        return out
    with zipfile.ZipFile(file) as zf:
        members = set(zf.namelist())
        for s in sections:
            member = f"{level}/{s}-proportion.tsv"
            if member in members:
                with zf.open(member) as fh:
                    out[s] = pd.read_csv(fh, sep="\t", index_col=0)
    return out


def _find_image(root: Path, section: str) -> tuple[Path, float] | None:
    """Image file of a section and its scale (image px per full-resolution px), or None."""
    full = root / "images" / f"{section}.jpg"
    if full.exists():
        return full, 1.0
    low = root / "images" / f"{section}_lowres.png"
    if low.exists():
        if section not in _LOWRES_FULLRES_WIDTH:
            warnings.warn(
                f"section {section!r}: {str(low)!r} has no known full-resolution width; "
                "loading counts only",
                stacklevel=3,
            )
            return None
        width, _ = image_size(low, section)
        return low, width / _LOWRES_FULLRES_WIDTH[section]
    return None


def _check_inside(xy: np.ndarray, size: tuple[int, int], scale: float, file: Path, section: str) -> None:
    """Raise when spot centres fall outside the image (a scale mismatch), warn for a few."""
    w, h = size
    p = xy * scale
    outside = (p[:, 0] < 0) | (p[:, 1] < 0) | (p[:, 0] >= w) | (p[:, 1] >= h)
    frac = outside.mean()
    if frac > _MAX_OUTSIDE_FRACTION:
        raise InputError(
            f"section {section!r}: {outside.sum()} of {len(p)} spot centres fall outside image "
            f"{str(file)!r} ({w}×{h} px at scale {scale:.4g}); pixel coordinates and image do "
            "not match (wrong image or scale factor)"
        )
    if outside.any():
        warnings.warn(
            f"section {section!r}: {outside.sum()} spot centres fall outside image {str(file)!r}",
            stacklevel=3,
        )


def dominant_cell_type(proportions: pd.DataFrame) -> pd.Categorical:
    """Per spot, the cell type (column) of largest proportion; NaN for spots without
    proportions (a NaN or all-zero row). ``proportions``: spots × cell types."""
    known = proportions.notna().all(1) & (proportions.sum(1) > 0)
    return pd.Categorical(proportions[known].idxmax(axis=1).reindex(proportions.index))


def read_her2st(
    path: str | Path,
    sections: Sequence[str] | None = None,
    join: str = "inner",
    image_downscale: int = 1000,
    deconvolution: Sequence[str] = ("major",),
) -> AnnData:
    """Read her2st sections into one AnnData of raw counts, coordinates, labels and images.

    Parameters
    ----------
    path
        Folder with the her2st layout (see the module docstring).
    sections
        Section names, e.g. ``["B4", "C2"]``; default: every section with a counts file.
    join
        ``"inner"`` keeps genes measured in every chosen section; ``"outer"`` keeps all genes,
        zero-filling those missing from a section's table. her2st is whole-transcriptome and
        each table lists ~15,000 of the genes (11,877 are in all 35), so a missing gene was
        most likely not detected there and the zero is right; ``varm["measured"]`` marks
        them if you would rather leave them out (``SPARTHA(gene_mask_key="measured")``).
    image_downscale
        Longest side, in pixels, of the in-memory low-resolution image kept per section
        (``uns["spatial"][section]["images"]["lowres"]``). Full-resolution images are never
        kept in memory; their path is recorded for patch extraction.
    deconvolution
        Levels of stereoscope proportions to attach (any of ``"major"``, ``"minor"``,
        ``"subset"``) as ``obsm["deconv_<level>"]`` DataFrames (NaN where missing).

    Returns
    -------
    AnnData, spots × genes, ``X`` = raw integer UMI counts (float32 CSR), with

    - ``obs``: ``slide`` (section), ``patient``, ``cluster`` (``"<patient>_<n>"``; numbers are
      per patient), ``cluster_annotation``, ``pathology`` (NaN where absent), ``has_image``,
      ``array_x``, ``array_y``, and ``cell_type``: the cell type of largest proportion at the
      first ``deconvolution`` level (NaN where the spot has no proportions);
    - ``obsm["spatial"]``: full-resolution pixel coordinates ``(pixel_x, pixel_y)``,
      shape ``(n_spots, 2)``; sections without an image still get them;
    - ``uns["spatial"][section]`` for imaged sections: ``images["lowres"]`` (uint8 RGB),
      ``scalefactors`` (``tissue_lowres_scalef``, ``spot_diameter_fullres`` in px) and
      ``metadata`` (``source_image_path`` absolute, ``source_image_scalef`` = source-image px
      per full-resolution px, ``microns_per_pixel``, ``spot_diameter_um``);
    - ``varm["measured"]``: bool DataFrame, genes × sections, ``True`` where the section's
      counts file has the gene;
    - ``uns["her2st"]``: spots that did not join (per section) and the join used.

    Raises
    ------
    InputError
        Missing/unreadable files, non-integer counts, duplicate spots, counts that do not join
        the coordinates, or spots outside their image; the message names file and section.
    """
    root = Path(path).expanduser().resolve()
    if not (root / "counts").is_dir():
        raise InputError(f"{str(root)!r} is not a her2st folder: it has no counts/ subfolder")
    available = sorted(p.name[: -len(".tsv.gz")] for p in (root / "counts").glob("*.tsv.gz"))
    if sections is None:
        sections = available
    sections = list(dict.fromkeys(sections))
    unknown = [s for s in sections if s not in available]
    if unknown or not sections:
        raise InputError(f"sections {unknown} have no counts file in {str(root / 'counts')!r}")
    bad_levels = set(deconvolution) - set(DECONVOLUTION_LEVELS)
    if bad_levels:
        raise InputError(f"deconvolution levels must be among {DECONVOLUTION_LEVELS}, got {sorted(bad_levels)}")

    annotations = _read_motivation(root)
    matrices: dict[str, sp.csr_matrix] = {}
    gene_sets: dict[str, pd.Index] = {}
    obs_parts: list[pd.DataFrame] = []
    xy_parts: list[np.ndarray] = []
    spatial: dict[str, dict] = {}
    unjoined: dict[str, dict[str, int]] = {}
    for s in sections:
        spots, genes, X = _read_counts(root / "counts" / f"{s}.tsv.gz", s)
        sel = _read_selection(root / "spots" / f"{s}_selection.tsv", s)
        joined = spots.isin(sel.index)
        if not joined.any():
            raise InputError(
                f"section {s!r}: no spot of {str(root / 'counts' / f'{s}.tsv.gz')!r} joins the "
                f"selected spots of {str(root / 'spots' / f'{s}_selection.tsv')!r} on '<x>x<y>'"
            )
        if not joined.all():
            warnings.warn(
                f"section {s!r}: {(~joined).sum()} spots with counts have no selected coordinates "
                "and are dropped",
                stacklevel=2,
            )
        unjoined[s] = {
            "counts_without_coordinates": int((~joined).sum()),
            "selected_without_counts": int((~sel.index.isin(spots)).sum()),
        }
        spots, X = spots[joined], X[np.flatnonzero(joined)]
        sel = sel.loc[spots]
        xy = sel[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
        cluster, pathology = _read_labels(root, s)
        patient = s[0]
        cl = cluster.reindex(spots) if cluster is not None else pd.Series(np.nan, index=spots)
        cl_label = [f"{patient}_{int(c)}" if pd.notna(c) else np.nan for c in cl]
        image = _find_image(root, s)
        obs = pd.DataFrame(
            {
                "slide": s,
                "patient": patient,
                "cluster": cl_label,
                "cluster_annotation": [annotations.get(c, np.nan) if isinstance(c, str) else np.nan for c in cl_label],
                "pathology": pathology.reindex(spots).to_numpy() if pathology is not None else np.nan,
                "has_image": image is not None,
                "array_x": sel["x"].astype(int).to_numpy(),
                "array_y": sel["y"].astype(int).to_numpy(),
            },
            index=[f"{s}_{n}" for n in spots],
        )
        if image is not None:
            file, source_scalef = image
            _check_inside(xy, image_size(file, s), source_scalef, file, s)
            lowres, scale = load_rgb(file, s, max_px=image_downscale)
            spatial[s] = {
                "images": {"lowres": lowres},
                "scalefactors": {
                    "tissue_lowres_scalef": float(scale * source_scalef),
                    "spot_diameter_fullres": SPOT_DIAMETER_UM / MICRONS_PER_PIXEL,
                },
                "metadata": {
                    "source_image_path": str(file),
                    "source_image_scalef": float(source_scalef),
                    "microns_per_pixel": MICRONS_PER_PIXEL,
                    "spot_diameter_um": SPOT_DIAMETER_UM,
                },
            }
        matrices[s], gene_sets[s] = X, genes
        obs_parts.append(obs)
        xy_parts.append(xy)

    check_gene_overlap(gene_sets, join, min_overlap=0.5, action="warn")
    var_names = joined_genes(gene_sets, join)
    X = sp.vstack([align_genes(matrices.pop(s), gene_sets[s], var_names) for s in sections], format="csr")
    obs = pd.concat(obs_parts)
    for col in ("slide", "patient", "cluster", "cluster_annotation", "pathology"):
        obs[col] = pd.Categorical(obs[col])
    obs["slide"] = obs["slide"].cat.reorder_categories(sections)
    adata = AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=var_names))
    adata.obsm["spatial"] = np.vstack(xy_parts)
    adata.varm["measured"] = measured_genes(gene_sets, var_names, sections)
    for level in deconvolution:
        tables = _read_deconvolution(root, level, sections)
        if tables:
            df = pd.concat(
                [t.set_axis([f"{s}_{i}" for i in t.index], axis=0) for s, t in tables.items()]
            )
            df = df[~df.index.duplicated()].reindex(adata.obs_names)
            df.columns = df.columns.astype(str)
            adata.obsm[f"deconv_{level}"] = df.astype(np.float64)
    if deconvolution and f"deconv_{deconvolution[0]}" in adata.obsm:
        adata.obs["cell_type"] = dominant_cell_type(adata.obsm[f"deconv_{deconvolution[0]}"])
    adata.uns["spatial"] = spatial
    adata.uns["her2st"] = {"join": join, "unjoined": unjoined}
    return adata


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch ``url`` to ``dest`` atomically (:func:`~spartha_pyro.io.atomic_path`)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                fh.write(chunk)
        if dest.suffix == ".gz":
            with open(tmp, "rb") as fh:
                if fh.read(2) != b"\x1f\x8b":
                    raise OSError(f"{url} did not return a gzip file (a Git LFS pointer or an error page?)")


def her2st(
    path: str | Path | None = None,
    sections: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    base_url: str = HER2ST_BASE_URL,
    timeout: float = 60.0,
    **kwargs,
) -> AnnData:
    """The her2st data set: read from ``path``, or download it once into a cache and read it.

    Parameters
    ----------
    path
        Local her2st folder (see :func:`read_her2st`); when given nothing is downloaded.
    sections
        Sections to load; default all 35 with counts (downloading only needs these).
    cache_dir
        Download cache; default ``$SPARTHA_DATA`` or ``~/.cache/spartha_pyro``. Files land in
        ``<cache_dir>/her2st`` in the layout of :func:`read_her2st`.
    base_url
        Root of the public ``almaan/her2st`` repository's raw files.
    timeout
        Seconds per HTTP request.
    **kwargs
        Passed on to :func:`read_her2st` (``join``, ``image_downscale``, ``deconvolution``).

    Raises
    ------
    InputError
        When a file cannot be downloaded (e.g. no network); the message says to pass ``path=``.
    """
    if path is not None:
        return read_her2st(path, sections=sections, **kwargs)
    cache = Path(cache_dir or os.environ.get("SPARTHA_DATA", "~/.cache/spartha_pyro")).expanduser() / "her2st"
    wanted = list(sections) if sections is not None else list(HER2ST_SECTIONS)
    todo: list[tuple[str, Path]] = []
    for s in wanted:
        for local, remote in _REMOTE_FILES.items():
            todo.append((f"{base_url}/{remote.format(s=s)}", cache / local.format(s=s)))
        if s in _REMOTE_IMAGES:
            todo.append((f"{base_url}/{_REMOTE_IMAGES[s]}", cache / "images" / f"{s}.jpg"))
        if s in _REMOTE_PATHOLOGY:
            todo.append(
                (f"{base_url}/data/ST-pat/lbl/{s}_labeled_coordinates.tsv",
                 cache / "pathology" / f"{s}_labeled_coordinates.tsv")
            )
    todo.append((f"{base_url}/res/ST-cluster/motivation.csv", cache / "clusters" / "motivation.csv"))
    for url, dest in todo:
        if dest.exists():
            continue
        try:
            _download(url, dest, timeout)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise InputError(
                f"could not download her2st file {url} into {str(cache)!r}: {err}. Without network "
                "access, pass path= to a local copy of the her2st data (layout: counts/, spots/, "
                "images/, ...)"
            ) from err
    return read_her2st(cache, sections=wanted, **kwargs)
