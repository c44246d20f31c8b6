"""One AnnData from ragged sections: imaged, count-only and histology-only spots together.

Real collections are ragged: some sections have an H&E image and counts, many have counts
only, and a new slide may have an image only. :func:`combine_sections` stacks them into the
AnnData that :class:`~spartha_pyro.SPARTHA` trains on, with the conventions of
:mod:`spartha_pyro.data`:

- a spot without histology gets an all-NaN row in ``obsm[histology_key]``;
- a spot without counts gets ``obs[counts_key] = False`` (its ``X`` row is zero and ignored);
- ``obs["modality"]`` says which of ``"counts+histology"``, ``"counts"``, ``"histology"``
  each spot has, and ``obs[batch_key]`` its section;
- ``varm["measured"]`` (genes × sections, bool) says which genes each section reported: after
  ``join="outer"`` over sections with different panels, pass ``gene_mask_key="measured"`` to
  :class:`~spartha_pyro.SPARTHA` so the zero-filled genes are left out of that section's
  likelihood (not when a section's table merely omits its undetected genes: those zeros are
  right).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._errors import InputError

JOINS = ("inner", "outer")
MODALITIES = ("counts+histology", "counts", "histology")


def align_genes(X, genes: pd.Index, target: pd.Index) -> sp.csr_matrix:
    """Columns of ``X`` (spots × ``genes``) reordered to ``target``: genes not in ``target``
    are dropped, genes of ``target`` not in ``genes`` are zero-filled. CSR float32."""
    pos = target.get_indexer(genes)
    coo = sp.coo_matrix(X)
    keep = pos[coo.col] >= 0
    return sp.csr_matrix(
        (coo.data[keep].astype(np.float32), (coo.row[keep], pos[coo.col[keep]])), shape=(X.shape[0], target.size)
    )


def gene_overlap(gene_sets: Mapping[str, pd.Index]) -> pd.DataFrame:
    """Per section: genes it shares with the genes common to all the other sections.

    Returns
    -------
    DataFrame indexed by section with ``n_genes``, ``n_common_others`` (genes measured in
    every other section), ``overlap`` (how many of those the section has) and ``fraction``
    (``overlap / n_common_others``; 1.0 for a single section).
    """
    sets = {s: set(map(str, g)) for s, g in gene_sets.items()}
    rows = {}
    for s, genes in sets.items():
        others = [sets[o] for o in sets if o != s]
        common = set.intersection(*others) if others else set(genes)
        overlap = len(common & genes)
        rows[s] = {
            "n_genes": len(genes), "n_common_others": len(common), "overlap": overlap,
            "fraction": overlap / len(common) if common else 1.0,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def check_gene_overlap(gene_sets: Mapping[str, pd.Index], join: str, min_overlap: float, action: str = "raise") -> None:
    """Raise (or warn, ``action="warn"``) when a section shares less than ``min_overlap`` of
    the genes common to the other sections, naming the overlap and the ``join`` argument."""
    if join not in JOINS:
        raise InputError(f"join must be 'inner' (intersection of genes) or 'outer' (union), got {join!r}")
    if len(gene_sets) < 2:
        return
    table = gene_overlap(gene_sets)
    for s, row in table[table["fraction"] < min_overlap].iterrows():
        effect = (
            f"join='inner' (intersection) would shrink the genes to at most {int(row.overlap)}"
            if join == "inner"
            else f"join='outer' (union) would zero-fill {int(row.n_common_others - row.overlap)} of its genes"
        )
        message = (
            f"section {s!r} shares {int(row.overlap)} of the {int(row.n_common_others)} genes common to the other "
            f"sections ({row.fraction:.0%} < min_overlap={min_overlap:.0%}); {effect}. Leave the section out, "
            "or pass min_overlap=0 to accept it"
        )
        if action == "warn":
            warnings.warn(message, stacklevel=3)
        else:
            raise InputError(message)


def measured_genes(gene_sets: Mapping[str, pd.Index], genes: pd.Index, sections: Sequence[str]) -> pd.DataFrame:
    """Bool DataFrame ``genes`` × ``sections``: ``True`` where the section reported the gene
    (``gene_sets`` holds the sections with counts; a section without counts is all ``False``)."""
    return pd.DataFrame(
        {s: genes.isin(gene_sets[s]) if s in gene_sets else np.zeros(genes.size, bool) for s in sections},
        index=genes,
    )


def warn_zero_filled(measured: pd.DataFrame, counted: Sequence[str]) -> None:
    """Warn when the outer join zero-filled genes of sections with counts, naming ``gene_mask_key``."""
    filled = {s: int((~measured[s]).sum()) for s in counted if not measured[s].all()}
    if filled:
        warnings.warn(
            f"join='outer' zero-filled genes a section did not report ({filled}). If they were not on "
            "that section's panel, pass gene_mask_key='measured' to SPARTHA so they are left out of its "
            "likelihood; if the section's table merely omits undetected genes, the zeros are right",
            stacklevel=3,
        )


def joined_genes(gene_sets: Mapping[str, pd.Index], join: str) -> pd.Index:
    """Intersection (``"inner"``) or union (``"outer"``) of gene names in first-seen order."""
    order = list(gene_sets.values())
    if join == "inner":
        common = set.intersection(*(set(g) for g in order))
        return pd.Index([g for g in order[0] if g in common])
    seen: dict[str, None] = {}
    for genes in order:
        seen.update(dict.fromkeys(genes))
    return pd.Index(list(seen))


def combine_sections(
    sections: Mapping[str, AnnData],
    histology_key: str = "histology",
    batch_key: str = "slide",
    counts_key: str = "has_counts",
    join: str = "inner",
    min_overlap: float = 0.5,
) -> AnnData:
    """Stack sections with and without images (or counts) into one training AnnData.

    Parameters
    ----------
    sections
        Section name -> AnnData. A section has counts when ``n_vars > 0`` (raw counts in
        ``X``) and histology when ``obsm[histology_key]`` is present (rows may already be
        all-NaN for single spots without it).
    histology_key
        ``obsm`` key of the histology vectors; every section that has it must have the
        same width.
    batch_key
        ``obs`` column receiving the section name.
    counts_key
        Boolean ``obs`` column receiving whether the spot's counts were measured (pass it
        to ``SPARTHA(counts_key=...)``).
    join
        Genes of the result: ``"inner"`` (default), the intersection over sections with
        counts, or ``"outer"``, the union, zero-filling the genes a section did not report
        (``varm["measured"]`` marks them: ``SPARTHA(gene_mask_key="measured")`` leaves them
        out of the likelihood; without it the model reads those zeros as measured).
    min_overlap
        Smallest share of the genes common to the other sections that each section must
        have; a section below it raises (see :func:`gene_overlap`).

    Returns
    -------
    AnnData (spots × joined genes, float32 CSR counts) with ``obs`` = the union of the
    sections' ``obs`` columns plus ``batch_key``, ``counts_key`` and ``modality``;
    ``obsm[histology_key]`` (NaN rows where missing), ``varm["measured"]`` (bool, genes ×
    sections: the genes each section reported); other ``obsm`` keys only when every
    section has them with one width. Spot names are prefixed with ``"<section>_"`` when
    they collide across sections.
    """
    if not sections:
        raise InputError("sections is empty")
    names = [str(s) for s in sections]
    if len(set(names)) != len(names):
        raise InputError(f"section names must be unique, got {names}")
    adatas = dict(zip(names, sections.values()))
    gene_sets = {s: pd.Index(ad.var_names.astype(str)) for s, ad in adatas.items() if ad.n_vars > 0}
    if not gene_sets:
        raise InputError("no section has counts (n_vars > 0): SPARTHA needs counts to learn expression")
    check_gene_overlap(gene_sets, join, min_overlap)
    widths = {s: np.shape(ad.obsm[histology_key])[1] for s, ad in adatas.items() if histology_key in ad.obsm}
    if len(set(widths.values())) > 1:
        raise InputError(
            f"obsm[{histology_key!r}] has different widths across sections: {widths}; compute the same features "
            "for every imaged section"
        )
    for s, ad in adatas.items():
        if ad.n_vars == 0 and s not in widths:
            raise InputError(f"section {s!r} has neither counts (n_vars == 0) nor obsm[{histology_key!r}]")
    genes = joined_genes(gene_sets, join)
    width = next(iter(widths.values()), None)

    blocks, hist, obs_parts = [], [], []
    for s, ad in adatas.items():
        has_counts = ad.n_vars > 0
        blocks.append(align_genes(ad.X, gene_sets[s], genes) if has_counts else sp.csr_matrix((ad.n_obs, genes.size), dtype=np.float32))
        if s in widths:
            H = ad.obsm[histology_key]
            H = np.asarray(H.to_numpy() if isinstance(H, pd.DataFrame) else H, dtype=np.float32)
        else:
            H = np.full((ad.n_obs, width), np.nan, dtype=np.float32)
        hist.append(H)
        imaged = ~np.isnan(H).all(1)
        obs = ad.obs.copy()
        obs[batch_key] = s
        obs[counts_key] = has_counts
        obs["modality"] = np.where(imaged, "counts+histology" if has_counts else "histology", "counts")
        obs_parts.append(obs)
    # all-NA columns left out of each part come back as NaN from the outer join (and do not
    # decide the joined dtype)
    obs = pd.concat([part.dropna(axis=1, how="all") for part in obs_parts], join="outer")
    obs = obs.reindex(columns=list(dict.fromkeys(c for part in obs_parts for c in part.columns)))
    if not obs.index.is_unique:
        obs.index = [f"{s}_{i}" for s, part in zip(names, obs_parts) for i in part.index]
    obs[batch_key] = pd.Categorical(obs[batch_key], categories=names)
    obs["modality"] = pd.Categorical(obs["modality"], categories=list(MODALITIES))
    obs[counts_key] = obs[counts_key].astype(bool)
    out = AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=genes))
    out.obsm[histology_key] = np.vstack(hist)
    out.varm["measured"] = measured_genes(gene_sets, genes, names)
    warn_zero_filled(out.varm["measured"], list(gene_sets))
    for key in set.intersection(*(set(ad.obsm) for ad in adatas.values())) - {histology_key}:
        arrays = [ad.obsm[key] for ad in adatas.values()]
        if all(isinstance(a, np.ndarray) and a.ndim == 2 for a in arrays) and len({a.shape[1] for a in arrays}) == 1:
            out.obsm[key] = np.vstack(arrays)
    return out
