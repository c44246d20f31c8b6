"""The preparation recipe shared by ``spartha prepare`` and ``examples/prepare_her2st.py``."""
from __future__ import annotations

from collections.abc import Sequence

from anndata import AnnData

from .._errors import InputError
from .features import histology_features
from .patches import annotate_patches
from .qc import annotate_qc, missing_patch_metrics


def prepare(
    adata: AnnData,
    batch_key: str | None = "slide",
    nmads: Sequence[float] = (3, 4, 5),
    qc_nmads: float = 5.0,
    extractor: str | Sequence[str] | None = ("efficientnet_lite0", "stats"),
    neighbors: bool = False,
    device: str | None = None,
    progress: bool = True,
    image_qc: bool | None = None,
) -> AnnData:
    """Annotate QC (never dropping spots) and compute histology features, in place.

    Parameters
    ----------
    adata
        Raw counts in ``X``; for features, ``obsm["spatial"]`` and the image metadata that
        :func:`~spartha_pyro.datasets.read_her2st` / :func:`~spartha_pyro.io.read_visium` record.
    batch_key
        ``obs`` column of the section/batch (QC medians and MADs are taken per batch);
        ignored when absent from ``obs``.
    nmads
        MAD multiples to annotate: each ``k`` other than ``qc_nmads`` goes to
        ``obs[f"qc_pass_{k:g}mad"]``.
    qc_nmads
        The standard threshold, written to ``obs["qc_pass"]`` (the model's QC label).
    extractor
        Histology extractor(s) for :func:`~spartha_pyro.pp.histology_features`; ``None``
        keeps an existing ``obsm["histology"]`` (e.g. simulated or precomputed vectors).
        Features are computed only when some spot has an image (``obs["has_image"]``).
    neighbors
        Append the grid-neighbour mean of the features.
    device
        Torch device of the extractor (default CUDA when available).
    progress
        Show the extractor's progress bar.
    image_qc
        QC also judges each spot's H&E patch (whitespace, blur, stain intensity; see
        :func:`~spartha_pyro.pp.annotate_qc`), for every threshold; ``None`` (default): when
        some spot has an image. ``True`` needs images (the patch metrics are read while the
        features are computed). Why on by default: on the artifact benchmark its labels let
        SPARTHA predict the clean truth better, and on her2st's real sections (few artifacts)
        it was level with count QC over three seeds (``benchmarks/README.md``).

    Returns
    -------
    ``adata`` itself with ``obs["qc_pass"]``, the extra ``qc_pass_<k>mad`` columns and,
    when computed, ``obsm["histology"]``. Without images and without an existing
    ``obsm["histology"]`` the result serves QC and expression-only use, not training.
    """
    if batch_key is not None and batch_key not in adata.obs:
        batch_key = None
    if min([*nmads, qc_nmads]) <= 0:  # checked before minutes of feature extraction, as annotate_qc would
        raise InputError(f"MAD thresholds must be positive, got nmads={list(nmads)}, qc_nmads={qc_nmads}")
    if adata.n_vars == 0:
        raise InputError("prepare needs counts: adata has no genes")
    has_image = adata.obs["has_image"].astype(bool).any() if "has_image" in adata.obs else False
    image_qc = has_image if image_qc is None else image_qc
    if image_qc and not has_image:
        raise InputError("image_qc needs images: no spot has one (obs['has_image'])")
    if extractor is not None and has_image:
        histology_features(adata, extractor=extractor, neighbors=neighbors, device=device, progress=progress,
                           library_key=batch_key or "slide")
    if image_qc and missing_patch_metrics(adata.obs):
        annotate_patches(adata, library_key=batch_key or "slide")
    for k in nmads:
        if k != qc_nmads:
            annotate_qc(adata, batch_key=batch_key, nmads=k, key_added=f"qc_pass_{k:g}mad", image=image_qc)
    annotate_qc(adata, batch_key=batch_key, nmads=qc_nmads, image=image_qc)  # last, so uns["qc"] records the standard
    return adata
