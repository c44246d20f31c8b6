"""Stream histology patches centred on spots, with bounded memory.

Images are located through the scanpy/squidpy convention: for the section named by
``obs[library_key]``, ``uns["spatial"][section]["metadata"]["source_image_path"]`` is the
full-resolution image and ``obsm["spatial"]`` holds spot centres in its pixels. A source image
stored at another resolution declares ``metadata["source_image_scalef"]`` (source px per
coordinate px, e.g. her2st A1's downscaled PNG); its crops are resized so that every patch
covers the same tissue area.

Only one decoded image is held at a time (~270 MB for a 9k × 10k RGB slide). Patches that
extend past the image are padded with white and flagged, never zero-filled silently.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from anndata import AnnData
from PIL import Image

from .._errors import InputError
from ..io._images import image_size, load_rgb

#: a patch with less tissue than this fraction is flagged as background
MIN_TISSUE_FRACTION = 0.25


def _library_meta(adata: AnnData, library_key: str) -> dict[str, dict]:
    """Per-section image metadata for the sections present in ``obs[library_key]``."""
    if library_key not in adata.obs:
        raise InputError(f"library_key {library_key!r} is not a column of adata.obs")
    spatial = adata.uns.get("spatial", {})
    out = {}
    for lib in adata.obs[library_key].astype(str).unique():
        meta = spatial.get(lib, {}).get("metadata", {})
        if meta.get("source_image_path"):
            out[lib] = {**meta, **spatial[lib].get("scalefactors", {})}
    return out


def default_patch_size(spot_diameter_fullres: float) -> int:
    """Patch side in pixels: the spot diameter rounded up to a multiple of 224 (CNN input).

    A her2st spot (≈145 px) gets 224 px.
    """
    return 224 * max(1, math.ceil(spot_diameter_fullres / 224))


def _patch_px(meta: dict, patch_size: int | None, patch_um: float | None, lib: str) -> int:
    """Patch side in full-resolution (coordinate) pixels for one section."""
    if patch_size is not None and patch_um is not None:
        raise InputError("give patch_size (pixels) or patch_um (micrometres), not both")
    if patch_size is not None:
        if patch_size < 1:
            raise InputError(f"patch_size must be a positive number of pixels, got {patch_size}")
        return int(patch_size)
    if patch_um is not None:
        mpp = meta.get("microns_per_pixel")
        if not mpp:
            raise InputError(f"section {lib!r}: patch_um needs metadata['microns_per_pixel']")
        return max(1, round(patch_um / mpp))
    if "spot_diameter_fullres" not in meta:
        raise InputError(f"section {lib!r}: no scalefactors['spot_diameter_fullres']; give patch_size")
    return default_patch_size(meta["spot_diameter_fullres"])


def patch_outside(
    adata: AnnData,
    patch_size: int | None = None,
    patch_um: float | None = None,
    library_key: str = "slide",
) -> np.ndarray:
    """Which spots' patches extend past their image (from geometry only, nothing decoded).

    Returns
    -------
    Boolean array, shape ``(n_spots,)``; ``False`` for spots whose section has no image.
    """
    metas = _library_meta(adata, library_key)
    libs = adata.obs[library_key].astype(str).to_numpy()
    out = np.zeros(adata.n_obs, dtype=bool)
    for lib, meta in metas.items():
        sel = np.flatnonzero(libs == lib)
        scalef = float(meta.get("source_image_scalef", 1.0))
        w, h = image_size(meta["source_image_path"], lib)
        half = _patch_px(meta, patch_size, patch_um, lib) * scalef / 2
        xy = np.asarray(adata.obsm["spatial"])[sel] * scalef
        out[sel] = (xy[:, 0] - half < 0) | (xy[:, 1] - half < 0) | (xy[:, 0] + half > w) | (xy[:, 1] + half > h)
    return out


def _crop(image: np.ndarray, cx: float, cy: float, size: int) -> np.ndarray:
    """``size × size`` crop centred at ``(cx, cy)``; pixels past the border are white."""
    h, w = image.shape[:2]
    x0, y0 = int(round(cx - size / 2)), int(round(cy - size / 2))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def iter_patches(
    adata: AnnData,
    patch_size: int | None = None,
    patch_um: float | None = None,
    out_size: int | None = None,
    batch_size: int = 64,
    library_key: str = "slide",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield batches of RGB patches centred on spots, one section (one image) at a time.

    Parameters
    ----------
    adata
        Spots with ``obsm["spatial"]`` (full-resolution pixels) and ``uns["spatial"]`` image
        metadata (see the module docstring). Spots of sections without a source image are
        skipped.
    patch_size
        Patch side in full-resolution pixels; default per section
        :func:`default_patch_size` of ``spot_diameter_fullres`` (224 px for her2st).
    patch_um
        Patch side in micrometres instead (needs ``metadata["microns_per_pixel"]``).
    out_size
        Side of the returned patches in pixels; default the patch side. Crops from a source
        image at another resolution are resized to it.
    batch_size
        Patches per batch. Memory: one decoded image plus ``batch_size × out_size² × 3`` bytes.
    library_key
        ``obs`` column naming each spot's section (key of ``uns["spatial"]``).

    Yields
    ------
    indices
        Positional spot indices, ``int64`` array of shape ``(b,)``, all from one section.
    patches
        ``uint8`` array, shape ``(b, out_size, out_size, 3)``.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if "spatial" not in adata.obsm:
        raise InputError("adata.obsm['spatial'] (spot centres in image pixels) is missing")
    metas = _library_meta(adata, library_key)
    libs = adata.obs[library_key].astype(str).to_numpy()
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    for lib, meta in metas.items():
        sel = np.flatnonzero(libs == lib)
        if sel.size == 0:
            continue
        scalef = float(meta.get("source_image_scalef", 1.0))
        size_full = _patch_px(meta, patch_size, patch_um, lib)
        crop = max(1, round(size_full * scalef))
        target = out_size or size_full
        image, _ = load_rgb(meta["source_image_path"], lib)
        try:
            for start in range(0, sel.size, batch_size):
                idx = sel[start : start + batch_size]
                batch = np.empty((idx.size, target, target, 3), dtype=np.uint8)
                for j, i in enumerate(idx):
                    patch = _crop(image, coords[i, 0] * scalef, coords[i, 1] * scalef, crop)
                    if crop != target:
                        patch = np.asarray(
                            Image.fromarray(patch).resize((target, target), Image.Resampling.BILINEAR)
                        )
                    batch[j] = patch
                yield idx, batch
        finally:
            del image


def tissue_fraction(patches: np.ndarray) -> np.ndarray:
    """Fraction of tissue pixels per patch.

    A pixel is tissue when it is not near-white background (mean RGB < 200 or saturation
    ≥ 0.08) and not black (mean RGB > 30: masked-out background, e.g. her2st A1).

    Parameters
    ----------
    patches
        ``uint8`` RGB, shape ``(b, h, w, 3)``.

    Returns
    -------
    ``float64`` array, shape ``(b,)``, values in [0, 1].
    """
    p = patches.astype(np.float32)
    mx, mn = p.max(axis=-1), p.min(axis=-1)
    gray = p.mean(axis=-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)
    tissue = ((gray < 200) | (sat >= 0.08)) & (gray > 30)
    return tissue.mean(axis=(1, 2)).astype(np.float64)


def mean_abs_laplacian(gray: np.ndarray) -> np.ndarray:
    """Mean absolute 4-neighbour Laplacian of grey images ``(b, h, w)`` (interior pixels) -> ``(b,)``."""
    lap = -4 * gray[:, 1:-1, 1:-1] + gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def patch_qc_metrics(patches: np.ndarray) -> dict[str, np.ndarray]:
    """Image QC metrics per patch, in the spirit of HistoQC (whitespace, blur, stain intensity).

    - ``tissue_fraction``: :func:`tissue_fraction` (bubbles, tears, detached tissue lower it);
    - ``log_sharpness``: log of :func:`mean_abs_laplacian` of the grey image in [0, 1] (the
      ``"stats"`` extractor's ``grad_laplace_x1``; an out-of-focus patch has a lower value);
    - ``od_mean``: mean optical density ``-log10((I + 1) / 256)`` over pixels and channels
      (over-staining and folds raise it; washed-out or bare glass lowers it).

    Parameters
    ----------
    patches
        ``uint8`` RGB, shape ``(b, h, w, 3)``, ``h, w ≥ 3``.

    Returns
    -------
    ``{name: float64 array of shape (b,)}`` with the three metrics above.
    """
    rgb = patches.astype(np.float32)
    gray = rgb.mean(axis=-1) / 255.0
    return {
        "tissue_fraction": tissue_fraction(patches),
        "log_sharpness": np.log(mean_abs_laplacian(gray).astype(np.float64) + 1e-6),
        "od_mean": (-np.log10((rgb + 1.0) / 256.0)).mean(axis=(1, 2, 3)).astype(np.float64),
    }


#: the ``obs`` columns :func:`record_patch_qc` writes from :func:`patch_qc_metrics`
PATCH_QC_COLUMNS: dict[str, str] = {name: f"patch_{name}" for name in ("tissue_fraction", "log_sharpness", "od_mean")}


def record_patch_qc(adata: AnnData, outside: np.ndarray, metrics: dict[str, np.ndarray], min_tissue: float) -> None:
    """Write ``obs["patch_outside"]``, the :data:`PATCH_QC_COLUMNS` and ``obs["patch_background"]``.

    ``metrics`` (from :func:`patch_qc_metrics`, one value per spot) are NaN for spots without
    an image; those are not flagged as background.
    """
    adata.obs["patch_outside"] = outside
    for name, column in PATCH_QC_COLUMNS.items():
        adata.obs[column] = metrics[name]
    adata.obs["patch_background"] = np.nan_to_num(metrics["tissue_fraction"], nan=1.0) < min_tissue


def read_patch_qc(adata: AnnData, library_key: str = "slide", patch_size: int | None = None,
                  patch_um: float | None = None, batch_size: int = 64) -> dict[str, np.ndarray]:
    """:func:`patch_qc_metrics` of every spot's patch, NaN for spots without an image."""
    metrics = {name: np.full(adata.n_obs, np.nan) for name in PATCH_QC_COLUMNS}
    for idx, patches in iter_patches(adata, patch_size, patch_um, batch_size=batch_size, library_key=library_key):
        for name, value in patch_qc_metrics(patches).items():
            metrics[name][idx] = value
    return metrics


def annotate_patches(
    adata: AnnData,
    patch_size: int | None = None,
    patch_um: float | None = None,
    min_tissue: float = MIN_TISSUE_FRACTION,
    batch_size: int = 64,
    library_key: str = "slide",
) -> AnnData:
    """Flag spots whose patch is partly outside the image or mostly background, and record
    the patches' image QC metrics (:func:`patch_qc_metrics`).

    Adds ``obs["patch_outside"]`` (bool), ``obs["patch_tissue_fraction"]`` (float in [0, 1]),
    ``obs["patch_log_sharpness"]``, ``obs["patch_od_mean"]`` (NaN without an image) and
    ``obs["patch_background"]`` (tissue fraction < ``min_tissue``). Nothing is dropped.
    :func:`spartha_pyro.pp.histology_features` records the same columns.

    Returns
    -------
    ``adata`` itself.
    """
    metrics = read_patch_qc(adata, library_key, patch_size, patch_um, batch_size)
    record_patch_qc(adata, patch_outside(adata, patch_size, patch_um, library_key), metrics, min_tissue)
    return adata
