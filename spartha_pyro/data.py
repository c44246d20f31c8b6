"""AnnData -> validated host arrays (no tensors, no minibatches: those are :mod:`spartha_pyro.loaders`).

:func:`setup_anndata` validates a training AnnData once and returns its :class:`Registry`
(what the model is trained on: data keys, genes, histology width and standardisation, label
categories) with its :class:`SpotArrays`. :func:`encode_adata` turns any other AnnData (new
spots, or the training spots of a loaded model) into :class:`SpotArrays` under a registry.
Counts stay sparse (CSR, or rows of a backed h5ad read on demand): a spots × genes matrix is
never dense on the host.

Conventions
-----------
- Missing labels: NaN / empty in the ``obs`` column → code ``-1`` (unlabelled spot).
- Missing histology: a row that is entirely NaN in ``obsm[histology_key]`` (or an AnnData
  without that key at all when the spot has counts) → ``has_histology = False``.
- Missing counts: an AnnData with no genes (``n_vars == 0``) → ``has_counts = False`` for
  every spot; in an AnnData mixing spots with and without counts, a boolean ``obs`` column
  named by ``counts_key`` (``True`` = the spot's counts were measured; the ``X`` rows of the
  other spots are ignored, never read as zeros).
- A training spot needs counts or histology (or both).
- QC labels: ``"pass"``/``"fail"`` strings (any case) or booleans (``True`` = pass).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from ._errors import InputError
from .recipe import read_recipe

QC_CODES = {"fail": 0, "pass": 1}


@dataclass
class Registry:
    """What a SPARTHA model was trained on (JSON-serialisable; saved with the model)."""

    histology_key: str
    label_keys: list[str]
    batch_key: str | None
    qc_key: str | None
    layer: str | None
    genes: list[str]
    histology_dim: int
    label_categories: list[list[str]] = field(default_factory=list)
    batch_categories: list[str] = field(default_factory=list)
    histology_mean: list[float] = field(default_factory=list)
    histology_std: list[float] = field(default_factory=list)
    counts_key: str | None = None
    gene_mask_key: str | None = None
    #: ``"section"``: each section's histology is standardised by its own spots' mean and sd
    #: (see :func:`standardize_histology`); ``"global"``: by the training spots' (models saved
    #: before this field existed)
    histology_scaling: str = "global"
    #: how ``obsm[histology_key]`` was made (:mod:`spartha_pyro.recipe`); ``None``: unknown
    histology_recipe: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SpotArrays:
    """Host arrays for ``n`` spots under a registry.

    ``counts`` is CSR float32 ``(n, G)``, a :class:`BackedCounts` (rows read from disk on
    demand) or ``None``; ``count_mask`` bool ``(n,)`` marks the spots whose counts were
    measured (``None``: all of them, when ``counts`` is given); ``x_h`` float32 ``(n, H)``
    standardised (missing rows zero); codes are int64 with ``-1`` for missing;
    ``gene_mask`` bool ``(n_batches, G)`` marks the genes each batch measured (``None``: all).
    """

    obs_names: pd.Index
    counts: sp.csr_matrix | BackedCounts | None
    x_h: np.ndarray
    has_histology: np.ndarray
    labels: np.ndarray
    batch: np.ndarray
    qc: np.ndarray
    count_mask: np.ndarray | None = None
    gene_mask: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.obs_names)

    @property
    def has_counts(self) -> np.ndarray:
        if self.counts is not None and self.count_mask is not None:
            return self.count_mask
        return np.full(self.n, self.counts is not None)

class BackedCounts:
    """Rows of a sparse counts matrix in an h5ad opened with ``backed="r"``, read on demand.

    Parameters
    ----------
    matrix
        The backed ``X`` or layer (an :class:`anndata.abc.CSRDataset`).
    gene_order
        Column indices giving the training gene order, or ``None`` when already in order.
    """

    def __init__(self, matrix, gene_order: np.ndarray | None = None):
        self.matrix, self.gene_order = matrix, gene_order
        self.shape = (matrix.shape[0], len(gene_order) if gene_order is not None else matrix.shape[1])

    def __getitem__(self, idx: np.ndarray) -> sp.csr_matrix:
        """CSR float32 ``(len(idx), G)`` for sorted row indices ``idx``."""
        sub = sp.csr_matrix(self.matrix[np.asarray(idx)], dtype=np.float32)
        return sub[:, self.gene_order].tocsr() if self.gene_order is not None else sub


def _name_spots(obs_names: pd.Index, mask: np.ndarray, limit: int = 5) -> str:
    bad = list(obs_names[np.flatnonzero(mask)[:limit]])
    more = int(mask.sum()) - len(bad)
    return ", ".join(map(repr, bad)) + (f" (+{more} more)" if more > 0 else "")


def _check_obs_names(adata: AnnData) -> None:
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()]
        raise InputError(f"obs names must be unique; duplicated: {list(dup[:5])}")


def _counts_matrix(adata: AnnData, layer: str | None, chunk: int = 8192) -> sp.csr_matrix | BackedCounts:
    """The counts as validated CSR float32: finite, non-negative integers.

    For an AnnData opened with ``backed="r"`` whose ``X`` is sparse, the counts stay on disk:
    they are validated ``chunk`` rows at a time and returned as :class:`BackedCounts`.
    """
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} is not in adata.layers (has {list(adata.layers)})")
    X = adata.X if layer is None else adata.layers[layer]
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if X is None:
        raise InputError(f"{where} is empty: SPARTHA needs raw counts")
    if adata.isbacked and layer is None and not isinstance(X, (np.ndarray, sp.spmatrix)):
        if not hasattr(X, "format") or X.format != "csr":
            raise InputError(f"a backed AnnData needs {where} stored as CSR (got {type(X).__name__})")
        for start in range(0, X.shape[0], chunk):
            _check_counts(sp.csr_matrix(X[start : start + chunk], dtype=np.float32), adata.obs_names[start:], where)
        return BackedCounts(X)
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else sp.csr_matrix(X).astype(np.float32, copy=False)
    _check_counts(X, adata.obs_names, where)
    return X


def _check_counts(X: sp.csr_matrix, obs_names: pd.Index, where: str) -> None:
    """Raise :class:`InputError` naming the spots (rows of ``X``, named by ``obs_names``) with bad counts."""
    data = X.data
    bad = ~np.isfinite(data) | (data < 0) | (data != np.round(data))
    if bad.any():
        rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[bad]
        mask = np.zeros(X.shape[0], dtype=bool)
        mask[rows] = True
        kind = "NaN/inf" if not np.isfinite(data[bad]).all() else ("negative" if (data[bad] < 0).any() else "non-integer")
        raise InputError(
            f"{where} must hold raw counts (finite, non-negative integers) for the negative binomial; "
            f"found {kind} values in spots {_name_spots(obs_names[: X.shape[0]], mask)}"
        )


def _histology(adata: AnnData, key: str, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``(x_h float32 (n, H), has_histology bool (n,))``; all-NaN rows mean missing."""
    if key not in adata.obsm:
        raise InputError(f"histology key {key!r} is not in adata.obsm (has {list(adata.obsm)})")
    H = adata.obsm[key]
    if isinstance(H, pd.DataFrame):  # AnnData keeps its rows aligned with obs_names
        H = H.to_numpy()
    H = np.asarray(H, dtype=np.float32)
    if H.ndim != 2 or H.shape[0] != adata.n_obs:
        raise InputError(f"obsm[{key!r}] must be 2-d with one row per spot, got shape {H.shape}")
    if width is not None and H.shape[1] != width:
        raise InputError(f"obsm[{key!r}] has width {H.shape[1]}, but the model was trained on width {width}")
    finite = np.isfinite(H)
    missing = ~finite.any(1) & np.isnan(H).all(1)
    partial = ~finite.all(1) & ~missing
    if partial.any():
        raise InputError(
            f"obsm[{key!r}] has NaN/inf values in spots {_name_spots(adata.obs_names, partial)} "
            "(an all-NaN row marks missing histology; partial NaN/inf is an error)"
        )
    return H, ~missing


def read_count_mask(adata: AnnData, key: str) -> np.ndarray:
    """``obs[key]`` as a bool mask of spots with measured counts (``True``/``False`` only)."""
    if key not in adata.obs:
        raise InputError(f"counts_key {key!r} is not a column of adata.obs")
    col = adata.obs[key]
    if not pd.api.types.is_bool_dtype(col):
        raise InputError(f"obs[{key!r}] must be boolean (True = the spot's counts were measured), got dtype {col.dtype}")
    return col.to_numpy(dtype=bool)


def _codes(values: pd.Series, categories: Sequence[str]) -> np.ndarray:
    cat = pd.Categorical(values.astype("string").where(values.notna()), categories=list(categories))
    return np.asarray(cat.codes, dtype=np.int64)


def _qc_codes(adata: AnnData, key: str | None) -> np.ndarray:
    if key is None or key not in adata.obs:
        return np.full(adata.n_obs, -1, dtype=np.int64)
    col = adata.obs[key]
    if pd.api.types.is_bool_dtype(col):
        return col.to_numpy().astype(np.int64)
    lower = col.astype("string").str.lower()
    bad = lower.notna() & ~lower.isin(list(QC_CODES))
    if bad.any():
        raise InputError(
            f"obs[{key!r}] must hold 'pass'/'fail' or booleans; got {sorted(set(col[bad.to_numpy()].astype(str)))[:5]}"
        )
    return lower.map(QC_CODES).fillna(-1).to_numpy().astype(np.int64)


def setup_anndata(
    adata: AnnData,
    histology_key: str,
    label_keys: Sequence[str],
    batch_key: str | None,
    qc_key: str | None,
    layer: str | None = None,
    counts_key: str | None = None,
    gene_mask_key: str | None = None,
    histology_scaling: str = "section",
) -> tuple[Registry, SpotArrays]:
    """Validate a training AnnData once: its registry (keys, genes, categories, histology
    scaling) and its arrays (with counts, as ``encode_adata(adata, registry, require_counts=True)``).

    Warns when a label set has no label on any spot with histology: its classifier then
    never sees an imaged spot, and the histology-only path learns that latent through the
    decoder alone.
    """
    if adata.n_obs == 0:  # before the label/QC checks, whose messages would mislead
        raise InputError("adata has 0 spots: nothing to train on")
    _check_obs_names(adata)
    if histology_scaling not in HISTOLOGY_SCALINGS:
        raise InputError(f"histology_scaling must be one of {HISTOLOGY_SCALINGS}, got {histology_scaling!r}")
    if adata.n_vars == 0:
        raise InputError("the training AnnData has no genes: SPARTHA needs counts to learn expression")
    if not adata.var_names.is_unique:
        raise InputError("var names must be unique")
    if gene_mask_key is not None and batch_key is None:
        raise InputError("gene_mask_key needs batch_key: the mask says which genes each batch measured")
    if qc_key is not None and qc_key not in adata.obs:
        raise InputError(f"qc_key {qc_key!r} is not a column of adata.obs; run sp.pp.annotate_qc(adata) first")
    for key in [*label_keys, *(k for k in (batch_key,) if k is not None)]:
        if key not in adata.obs:
            raise InputError(f"obs key {key!r} is not a column of adata.obs")
    if len(set(label_keys)) != len(label_keys):
        raise InputError(f"label_keys has duplicates: {list(label_keys)}")
    label_categories = []
    for key in label_keys:
        cats = sorted(adata.obs[key].dropna().astype(str).unique())
        if len(cats) < 2:
            raise InputError(f"label column obs[{key!r}] needs at least two classes, found {cats}")
        label_categories.append(cats)
    batch_categories = sorted(adata.obs[batch_key].dropna().astype(str).unique()) if batch_key else ["all"]
    if batch_key and adata.obs[batch_key].isna().any():
        raise InputError(f"obs[{batch_key!r}] has missing values: every training spot needs a batch")
    qc = _qc_codes(adata, qc_key)
    if qc_key is not None and (qc < 0).all():
        raise InputError(f"obs[{qc_key!r}] has no pass/fail labels")
    counts = _counts_matrix(adata, layer)
    H, has = _histology(adata, histology_key, None)
    if not has.any():
        raise InputError(f"obsm[{histology_key!r}] is missing (all NaN) for every spot")
    if counts_key is not None:
        measured = read_count_mask(adata, counts_key)
        if not measured.any():
            raise InputError(f"obs[{counts_key!r}] is False for every spot: SPARTHA needs counts to learn expression")
        if (~measured & ~has).any():
            raise InputError(
                f"spots {_name_spots(adata.obs_names, ~measured & ~has)} have neither counts "
                f"(obs[{counts_key!r}] False) nor histology (all-NaN obsm[{histology_key!r}]): drop them"
            )
    for key in label_keys:
        if not adata.obs[key].notna().to_numpy()[has].any():
            where = f" (sections with histology: {sorted(adata.obs.loc[has, batch_key].astype(str).unique())})" if batch_key else ""
            warnings.warn(
                f"label column obs[{key!r}] has no label on any spot with histology{where}: the histology "
                f"path learns its latent only through the decoder",
                stacklevel=3,
            )
    mean = H[has].mean(0)
    std = H[has].std(0)
    std = np.where(std > 1e-6, std, 1.0)
    registry = Registry(
        histology_key=histology_key,
        label_keys=list(label_keys),
        batch_key=batch_key,
        qc_key=qc_key,
        layer=layer,
        genes=[str(g) for g in adata.var_names],
        histology_dim=int(H.shape[1]),
        label_categories=label_categories,
        batch_categories=list(batch_categories),
        histology_mean=mean.astype(float).tolist(),
        histology_std=std.astype(float).tolist(),
        counts_key=counts_key,
        gene_mask_key=gene_mask_key,
        histology_scaling=histology_scaling,
        histology_recipe=read_recipe(adata, histology_key),
    )
    return registry, _encode(adata, registry, counts, H, has, qc, require_counts=True)


def add_label_set(adata: AnnData, registry: Registry, data: SpotArrays, key: str) -> None:
    """Register ``obs[key]`` (categorical; missing = unlabelled) as one more label set of the
    AnnData ``data`` encodes: its categories into ``registry``, its codes into ``data.labels``."""
    categories = sorted(adata.obs[key].dropna().astype(str).unique())
    registry.label_keys.append(key)
    registry.label_categories.append(categories)
    data.labels = np.column_stack([data.labels, _codes(adata.obs[key], categories)])


HISTOLOGY_SCALINGS = ("section", "global")

#: sections with fewer imaged spots are scaled by the training statistics instead of their own
MIN_SECTION_SPOTS = 20


def standardize_histology(
    H: np.ndarray,
    has: np.ndarray,
    sections: np.ndarray | str | None,
    fallback_mean: np.ndarray,
    fallback_std: np.ndarray,
) -> np.ndarray:
    """Standardised histology ``(n, H)`` float32, rows without histology zero.

    ``sections`` an array of section names (one per spot): each section is centred and
    scaled by its own imaged spots' mean and sd, which removes a slide's stain or scanner
    shift before encoding (a section's per-gene ranking of spots is unchanged by it);
    ``None``: all spots form one section; ``"global"``: every spot is scaled by the
    ``fallback`` (training) statistics. A section with fewer than
    :data:`MIN_SECTION_SPOTS` imaged spots gets the fallback statistics, with a warning.
    """
    out = np.zeros(H.shape, np.float32)
    if isinstance(sections, str):
        out[has] = (H[has] - fallback_mean) / fallback_std
        return out
    sections = np.zeros(len(H), dtype=np.int64) if sections is None else np.asarray(sections)
    small = []
    for name in pd.unique(sections[has]):
        rows = has & (sections == name)
        if rows.sum() < MIN_SECTION_SPOTS:
            small.append(str(name))
            mean, std = fallback_mean, fallback_std
        else:
            mean, std = H[rows].mean(0), H[rows].std(0)
            std = np.where(std > 1e-6, std, 1.0)
        out[rows] = (H[rows] - mean) / std
    if small:
        warnings.warn(
            f"sections {small} have fewer than {MIN_SECTION_SPOTS} spots with histology: scaled by the training "
            "statistics instead of their own (histology_scaling='section' needs whole sections)",
            stacklevel=3,
        )
    return out


def encode_adata(adata: AnnData, registry: Registry, require_counts: bool = False) -> SpotArrays:
    """Arrays for ``adata`` under ``registry``.

    Counts are aligned to the training genes by name when ``adata`` has genes; an AnnData
    with ``n_vars == 0`` (histology only) gets ``counts=None``; with the registry's
    ``counts_key`` in ``obs``, that column marks which spots' counts were measured. Labels, batches and QC are
    optional here (codes ``-1`` when absent or unseen: an unseen batch is allowed and its
    batch latent is inferred from histology).
    """
    _check_obs_names(adata)
    counts = None
    if adata.n_vars > 0:
        genes = pd.Index(registry.genes)
        present = genes.isin(adata.var_names)
        if not present.all():
            raise InputError(
                f"adata lacks {int((~present).sum())} of the {len(genes)} training genes "
                f"(e.g. {list(genes[~present][:5])}); pass an AnnData with all training genes, "
                "or one with no genes (histology only) for prediction"
            )
        if not adata.var_names.is_unique:
            raise InputError("var names must be unique")
        X = _counts_matrix(adata, registry.layer)
        order = adata.var_names.get_indexer(genes)
        if np.array_equal(order, np.arange(adata.n_vars)):
            counts = X
        elif isinstance(X, BackedCounts):
            counts = BackedCounts(X.matrix, order)
        else:
            counts = X[:, order].tocsr()
    elif require_counts:
        raise InputError("this AnnData has no genes, but counts are required here")

    if registry.histology_key in adata.obsm:
        H, has_h = _histology(adata, registry.histology_key, registry.histology_dim)
    elif counts is not None:
        H, has_h = np.zeros((adata.n_obs, registry.histology_dim), np.float32), np.zeros(adata.n_obs, bool)
    else:
        raise InputError(
            f"adata has neither counts nor obsm[{registry.histology_key!r}]: nothing to encode"
        )
    return _encode(adata, registry, counts, H, has_h, _qc_codes(adata, registry.qc_key), require_counts)


def _encode(
    adata: AnnData,
    registry: Registry,
    counts: sp.csr_matrix | BackedCounts | None,
    H: np.ndarray,
    has_h: np.ndarray,
    qc: np.ndarray,
    require_counts: bool,
) -> SpotArrays:
    """:class:`SpotArrays` from validated counts (training gene order), raw histology and QC codes."""
    count_mask = None
    if counts is not None and registry.counts_key is not None and registry.counts_key in adata.obs:
        count_mask = read_count_mask(adata, registry.counts_key)

    sections = None
    if registry.histology_scaling == "section" and registry.batch_key is not None and registry.batch_key in adata.obs:
        sections = adata.obs[registry.batch_key].astype(str).to_numpy()
    x_h = standardize_histology(
        H, has_h, sections if registry.histology_scaling == "section" else "global",
        np.asarray(registry.histology_mean, np.float32), np.asarray(registry.histology_std, np.float32),
    )

    labels = np.full((adata.n_obs, len(registry.label_keys)), -1, dtype=np.int64)
    for k, (key, cats) in enumerate(zip(registry.label_keys, registry.label_categories)):
        if key in adata.obs:
            labels[:, k] = _codes(adata.obs[key], cats)
    if registry.batch_key is None:
        batch = np.zeros(adata.n_obs, dtype=np.int64)
    elif registry.batch_key in adata.obs:
        batch = _codes(adata.obs[registry.batch_key], registry.batch_categories)
    else:
        batch = np.full(adata.n_obs, -1, dtype=np.int64)
    data = SpotArrays(
        obs_names=adata.obs_names.copy(),
        counts=counts,
        x_h=x_h.astype(np.float32),
        has_histology=has_h,
        labels=labels,
        batch=batch,
        qc=qc,
        count_mask=count_mask,
    )
    if require_counts and registry.gene_mask_key is not None:
        data.gene_mask = read_gene_mask(adata, registry, data)
    return data


def read_gene_mask(adata: AnnData, registry: Registry, data: SpotArrays, chunk: int = 8192) -> np.ndarray:
    """``varm[registry.gene_mask_key]`` as bool ``(n_batches, G)`` in the registry's batch and gene order.

    The ``varm`` entry is a DataFrame (genes × batches, one bool column per batch category;
    ``True`` = that batch's panel measured the gene), as :func:`spartha_pyro.pp.combine_sections`
    writes it. Raises :class:`InputError` when it is not, when a batch with counts measured no
    gene, or when a spot has counts in a gene its batch did not measure (a wrong mask).
    """
    key = registry.gene_mask_key
    if key not in adata.varm:
        raise InputError(f"gene_mask_key {key!r} is not in adata.varm (has {list(adata.varm)})")
    M = adata.varm[key]
    if not isinstance(M, pd.DataFrame):
        raise InputError(
            f"varm[{key!r}] must be a DataFrame of genes × batches (one bool column per batch), got {type(M).__name__}"
        )
    M = M.set_axis(M.columns.astype(str), axis=1)
    missing = [b for b in registry.batch_categories if b not in M.columns]
    if missing:
        raise InputError(f"varm[{key!r}] has no column for batches {missing[:5]} of obs[{registry.batch_key!r}]")
    M = M.reindex(registry.genes)[registry.batch_categories]
    if not all(pd.api.types.is_bool_dtype(M[c]) for c in M.columns):
        dtypes = sorted(set(map(str, M.dtypes)))
        raise InputError(f"varm[{key!r}] must be boolean (True = the batch measured the gene), got dtypes {dtypes}")
    mask = M.to_numpy(dtype=bool).T
    counted = np.unique(data.batch[data.has_counts & (data.batch >= 0)])
    empty = [registry.batch_categories[b] for b in counted if not mask[b].any()]
    if empty:
        raise InputError(f"varm[{key!r}] marks no gene as measured for batches {empty[:5]}, which have counts")
    if data.counts is not None:
        for start in range(0, data.n, chunk):
            idx = np.arange(start, min(start + chunk, data.n))
            sub = data.counts[idx].tocoo()
            bad_entry = ~mask[data.batch[idx][sub.row], sub.col] & data.has_counts[idx][sub.row]
            if bad_entry.any():
                spots = np.zeros(data.n, dtype=bool)
                spots[idx[sub.row[bad_entry]]] = True
                genes = sorted({registry.genes[g] for g in sub.col[bad_entry][:5]})
                raise InputError(
                    f"spots {_name_spots(data.obs_names, spots)} have counts in genes their batch did not "
                    f"measure according to varm[{key!r}] (e.g. {genes}): the mask is wrong"
                )
    return mask


def class_counts(codes: np.ndarray, n_classes: int) -> torch.Tensor:
    """Per-class counts of non-missing codes, length ``n_classes``."""
    return torch.from_numpy(np.bincount(codes[codes >= 0], minlength=n_classes)[:n_classes])
