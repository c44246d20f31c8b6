"""Expression maps from a bare H&E image: pseudo-spots on the tissue, the model's features, predictions.

:func:`predict_image` (``spartha predict-image``) is the path for slides without spatial RNA:

1. :func:`open_image` reads JPEG/PNG (decoded whole) and TIFF / pyramidal TIFF / OME-TIFF /
   SVS **tile by tile** through a zarr view of tifffile's store (only the tiles a region
   touches are decoded; the slide is never in memory);
2. :func:`detect_tissue` finds tissue on a low-resolution copy (Otsu on saturation, small
   holes filled, specks dropped) unless a mask file is given;
3. :func:`spot_grid` lays pseudo-spots at the training platform's geometry (legacy-ST square
   grid or Visium hexagonal grid) where the spot disk is mostly tissue;
4. :func:`image_features` extracts the features with the recipe the model saved
   (:mod:`spartha_pyro.recipe`): same extractors, same patch side in µm resampled to the same
   pixels, same neighbour context; patches are read row by row in streamed batches;
5. the model predicts with uncertainty, chunk by chunk, and the result is an AnnData that
   scanpy plots directly (``obsm["spatial"]`` in full-resolution pixels,
   ``uns["spatial"][library]`` with images and scale factors).
"""
from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from PIL import Image, UnidentifiedImageError

from ._errors import InputError
from .io._images import _open_huge

#: µm per pixel accepted from file metadata (outside: a screen/print DPI, not a microscope)
PLAUSIBLE_UM_PER_PX = (0.05, 20.0)
#: the image's resolution may differ from the training images' by at most this factor
MAX_RESOLUTION_RATIO = 2.0
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8", ".ndpi", ".scn")


# ---------------------------------------------------------------------------- reading
class SlideImage:
    """An RGB image, read region by region.

    Attributes
    ----------
    path
        The file.
    sizes
        ``(width, height)`` of each resolution level, full resolution first.
    downsamples
        Full-resolution pixels per pixel of each level.
    um_per_px
        µm per full-resolution pixel from the file's metadata, or ``None``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tif = None
        self._levels: list = []
        self._array: np.ndarray | None = None
        if not self.path.is_file():
            raise InputError(f"image file {str(self.path)!r} does not exist")
        if self.path.name.lower().endswith(TIFF_SUFFIXES) or _is_tiff(self.path):
            self._open_tiff()
        else:
            self._open_pil()

    # -- backends
    def _open_tiff(self) -> None:
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as err:  # tifffile raises TiffFileError, ValueError, IndexError...
            self.close()
            raise InputError(f"cannot read image {str(self.path)!r} as TIFF: {err}") from None
        axes = series.axes
        if series.dtype != np.uint8 or axes not in ("YXS", "SYX") or series.shape[axes.index("S")] not in (3, 4):
            self.close()
            raise InputError(
                f"image {str(self.path)!r} is not 8-bit RGB: axes {axes!r}, shape {series.shape}, "
                f"dtype {series.dtype} (need 8-bit RGB or RGBA)"
            )
        self._planar = axes == "SYX"
        try:
            for i in range(len(series.levels)):
                self._levels.append(zarr.open(series.aszarr(level=i), mode="r"))
        except Exception as err:
            self.close()
            raise InputError(f"cannot read the tiles of {str(self.path)!r}: {err}") from None
        shapes = [lv.shape[1:] if self._planar else lv.shape[:2] for lv in self._levels]
        self.sizes = [(int(w), int(h)) for h, w in shapes]
        self.um_per_px = _tiff_um_per_px(self._tif)

    def _open_pil(self) -> None:
        try:
            with _open_huge(Path(self.path)) as im:
                if im.mode not in ("RGB", "RGBA", "RGBX"):
                    raise InputError(f"image {str(self.path)!r} has {im.mode!r} pixels, not 8-bit RGB")
                dpi = im.info.get("dpi")
                self._array = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"cannot read image {str(self.path)!r}: {err}") from None
        self.sizes = [(self._array.shape[1], self._array.shape[0])]
        self.um_per_px = _plausible(25400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None

    @property
    def downsamples(self) -> list[float]:
        w0 = self.sizes[0][0]
        return [w0 / w for w, _ in self.sizes]

    def read_region(self, x0: int, y0: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """``uint8`` RGB ``(height, width, 3)`` at ``level`` from its pixel ``(x0, y0)``; white past the border.

        Only the tiles the region touches are decoded.
        """
        w, h = self.sizes[level]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + width, w), min(y0 + height, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return out
        if self._array is not None:
            part = self._array[sy0:sy1, sx0:sx1]
        elif self._planar:
            part = np.moveaxis(np.asarray(self._levels[level][:3, sy0:sy1, sx0:sx1]), 0, -1)
        else:
            part = np.asarray(self._levels[level][sy0:sy1, sx0:sx1, :3])
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = part
        return out

    def thumbnail(self, max_px: int = 2048, band_bytes: int = 64 * 2**20) -> tuple[np.ndarray, float]:
        """A copy whose longer side is ≤ ``max_px``, made from the coarsest level that is large
        enough by block means over bands of rows (memory: one band, about ``band_bytes``).

        Returns
        -------
        image
            ``uint8`` RGB.
        scale
            Thumbnail pixels per full-resolution pixel.
        """
        level = 0
        for i, (w, h) in enumerate(self.sizes):
            if max(w, h) >= max_px:
                level = i
        w, h = self.sizes[level]
        f = max(1, math.ceil(max(w, h) / max_px))
        tw, th = w // f, h // f
        if tw < 1 or th < 1:
            raise InputError(f"image {str(self.path)!r} ({w} × {h} px) is too small")
        out = np.empty((th, tw, 3), dtype=np.uint8)
        rows = max(1, band_bytes // (12 * tw * f * f))  # thumbnail rows per band (float32 RGB)
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            band = self.read_region(0, r0 * f, tw * f, (r1 - r0) * f, level).astype(np.float32)
            out[r0:r1] = band.reshape(r1 - r0, f, tw, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        return out, 1.0 / (f * self.downsamples[level])

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        self._levels, self._array = [], None

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_image(path: str | os.PathLike) -> SlideImage:
    """Open an H&E image for region reading (see :class:`SlideImage`).

    Raises
    ------
    InputError
        Missing or unreadable file, or pixels that are not 8-bit RGB(A).
    """
    return SlideImage(path)


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not np.isfinite(mpp):
        return None
    lo, hi = PLAUSIBLE_UM_PER_PX
    return float(mpp) if lo <= mpp <= hi else None


def _tiff_um_per_px(tif) -> float | None:
    """µm per pixel from OME PhysicalSizeX, an SVS ``MPP =`` description, or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if m:
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
            return _plausible(float(m.group(1)) * factor)
    page = tif.pages[0]
    m = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if m:
        return _plausible(float(m.group(1)))
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is not None and unit is not None:
        num, den = xres.value
        per_unit = num / den if den else 0.0
        um = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if um and per_unit > 0:
            return _plausible(um / per_unit)
    return None


# ---------------------------------------------------------------------------- tissue and grid
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a ``uint8`` RGB array (0 for black)."""
    p = rgb.astype(np.float32)
    mx, mn = p.max(axis=-1), p.min(axis=-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0)


def detect_tissue(thumb: np.ndarray, min_saturation: float = 0.05, hole_fraction: float = 0.001,
                  speck_fraction: float = 0.0005) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image: Otsu on saturation, small holes filled.

    A pixel is tissue when its saturation is above Otsu's threshold (never below
    ``min_saturation``: a blank image has no tissue) and it is not black (masked-out
    background). Holes smaller than ``hole_fraction`` of the image are filled and tissue
    specks smaller than ``speck_fraction`` removed.

    Returns
    -------
    Boolean array of the thumbnail's height × width.
    """
    from scipy import ndimage

    sat = saturation(thumb)
    threshold = max(otsu_threshold(sat.ravel()), min_saturation)
    mask = (sat > threshold) & (thumb.astype(np.float32).mean(axis=-1) > 30)
    mask = ndimage.binary_closing(mask, iterations=2) & (thumb.max(axis=-1) > 30)
    n = mask.size
    holes, n_holes = ndimage.label(~mask)
    if n_holes:
        sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes < hole_fraction * n
        small[0] = False
        small[border] = False
        mask |= small[holes]
    parts, n_parts = ndimage.label(mask)
    if n_parts:
        sizes = np.bincount(parts.ravel())
        keep = sizes >= speck_fraction * n
        keep[0] = False
        mask = keep[parts]
    return mask


def read_mask(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """A tissue-mask image (non-zero = tissue, any size, same aspect) resized to ``shape`` (h, w)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tissue mask {str(path)!r} does not exist")
    try:
        with _open_huge(Path(path)) as im:
            im = im.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)
            mask = np.asarray(im) > 0
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read tissue mask {str(path)!r}: {err}") from None
    return mask


def spot_grid(width: float, height: float, spacing: float, kind: str = "square") -> tuple[np.ndarray, np.ndarray]:
    """Centres of a spot grid covering a ``width × height`` image, in its pixels.

    ``"square"`` (legacy ST): rows and columns ``spacing`` apart. ``"hex"`` (Visium): rows
    ``spacing × √3/2`` apart, odd rows shifted by half a spacing, so every spot has six
    neighbours at ``spacing``. The grid starts half a spacing from the corner.

    Returns
    -------
    xy
        ``float64 (n, 2)`` centres ``(x, y)``.
    rowcol
        ``int64 (n, 2)`` array row and column of each spot.
    """
    if kind not in ("square", "hex"):
        raise InputError(f"grid must be 'square' or 'hex', got {kind!r}")
    if not spacing > 0:
        raise InputError(f"spot spacing must be positive, got {spacing}")
    dy = spacing * (math.sqrt(3) / 2 if kind == "hex" else 1.0)
    rows = np.arange(int(max(0.0, height - spacing / 2) // dy) + 1)
    cols = np.arange(int(max(0.0, width - spacing / 2) // spacing) + 1)
    r, c = np.meshgrid(rows, cols, indexing="ij")
    x = spacing / 2 + c * spacing + (np.where(r % 2 == 1, spacing / 2, 0.0) if kind == "hex" else 0.0)
    y = spacing / 2 + r * dy
    inside = (x < width) & (y < height)
    return np.stack([x[inside], y[inside]], axis=1), np.stack([r[inside], c[inside]], axis=1).astype(np.int64)


def lattice_neighbor_mean(xy: np.ndarray, features: np.ndarray, spacing: float, kind: str = "square") -> np.ndarray:
    """Mean feature vector of the pseudo-spots one training ``spacing`` away along the grid's
    lattice directions (4 on a square grid, 6 on a hex grid), found among ``xy`` (a grid refined
    by an integer factor contains those points) within a quarter of the finest spacing. A
    pseudo-spot with none of them (off the tissue) keeps its own vector, as in
    :func:`spartha_pyro.pp.features.neighbor_mean`, which this equals on an unrefined grid.

    ``xy`` ``(n, 2)`` px, ``features`` ``(n, d)``; returns ``(n, d)``.
    """
    from scipy.spatial import cKDTree

    angles = np.arange(6) * np.pi / 3 if kind == "hex" else np.arange(4) * np.pi / 2
    offsets = spacing * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    tree = cKDTree(xy)
    finest = np.median(tree.query(xy, k=2)[0][:, 1]) if len(xy) > 1 else spacing
    total = np.zeros_like(features, dtype=np.float64)
    count = np.zeros(len(xy))
    for off in offsets:
        dist, idx = tree.query(xy + off, distance_upper_bound=0.25 * finest)
        hit = np.isfinite(dist)
        total[hit] += features[idx[hit]]
        count += hit
    out = features.astype(np.float64).copy()
    some = count > 0
    out[some] = total[some] / count[some, None]
    return out.astype(features.dtype)


def _tissue_under_spots(mask: np.ndarray, scale: float, xy: np.ndarray, spot_px: float) -> np.ndarray:
    """Fraction of tissue in each spot's square of side ``spot_px`` (full-res px), read from ``mask``."""
    from scipy import ndimage

    side = max(1, int(round(spot_px * scale)))
    frac = ndimage.uniform_filter(mask.astype(np.float32), size=side, mode="constant")
    i = np.clip((xy[:, 1] * scale).astype(int), 0, mask.shape[0] - 1)
    j = np.clip((xy[:, 0] * scale).astype(int), 0, mask.shape[1] - 1)
    return frac[i, j]


# ---------------------------------------------------------------------------- features
def _runs(xy: np.ndarray, rowcol: np.ndarray, spacing_px: float, max_width: float) -> Iterator[np.ndarray]:
    """Indices of spots in reading order: per grid row, runs of neighbours no wider than ``max_width``."""
    order = np.lexsort((xy[:, 0], rowcol[:, 0]))
    start = 0
    for k in range(1, len(order) + 1):
        if (
            k == len(order)
            or rowcol[order[k], 0] != rowcol[order[start], 0]
            or xy[order[k], 0] - xy[order[k - 1], 0] > 2.5 * spacing_px
            or xy[order[k], 0] - xy[order[start], 0] > max_width
        ):
            yield order[start:k]
            start = k


def iter_grid_patches(
    slide: SlideImage,
    xy: np.ndarray,
    rowcol: np.ndarray,
    patch_side: int,
    out_size: int,
    level: int = 0,
    spacing_px: float = 1.0,
    batch_size: int = 64,
    max_run_px: int = 8192,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, uint8 patches (b, out_size, out_size, 3))`` centred on ``xy`` (full-res px).

    Patches are ``patch_side`` pixels of ``level`` (resized to ``out_size``), read as one region
    per run of neighbouring spots in a grid row, so a tile is decoded about once per row.
    Memory: one run (``max_run_px × patch_side × 3`` bytes) plus one batch.
    """
    ds = slide.downsamples[level]
    half = patch_side / 2
    idx_buf: list[int] = []
    patch_buf: list[np.ndarray] = []
    for run in _runs(xy, rowcol, spacing_px, max_run_px * ds):
        cx, cy = xy[run, 0] / ds, xy[run, 1] / ds
        x0 = int(round(cx.min() - half))
        y0 = int(round(cy.mean() - half))
        region = slide.read_region(x0, y0, int(round(cx.max() - cx.min())) + patch_side + 1, patch_side + 1, level)
        for i, x, y in zip(run, cx, cy):
            px, py = int(round(x - half)) - x0, max(0, int(round(y - half)) - y0)
            patch = region[py : py + patch_side, px : px + patch_side]
            if patch.shape[:2] != (patch_side, patch_side):  # defensive: pad with white
                full = np.full((patch_side, patch_side, 3), 255, np.uint8)
                full[: patch.shape[0], : patch.shape[1]] = patch
                patch = full
            if patch_side != out_size:
                patch = np.asarray(Image.fromarray(patch).resize((out_size, out_size), Image.Resampling.BILINEAR))
            idx_buf.append(int(i))
            patch_buf.append(patch)
            if len(idx_buf) == batch_size:
                yield np.asarray(idx_buf, dtype=np.int64), np.stack(patch_buf)
                idx_buf, patch_buf = [], []
    if idx_buf:
        yield np.asarray(idx_buf, dtype=np.int64), np.stack(patch_buf)


def _choose_level(slide: SlideImage, um_per_px: float, train_um_per_px: float | None) -> int:
    """The level whose resolution is closest (in ratio) to the training images'."""
    if train_um_per_px is None:
        return 0
    ratios = [abs(math.log(um_per_px * d / train_um_per_px)) for d in slide.downsamples]
    return int(np.argmin(ratios))


def image_features(
    image: str | os.PathLike | SlideImage,
    recipe: dict,
    histology_key: str = "histology",
    um_per_px: float | None = None,
    spacing_um: float | None = None,
    spot_um: float | None = None,
    grid: str | None = None,
    subdivide: int = 1,
    tissue_mask: str | os.PathLike | np.ndarray | None = None,
    min_tissue: float = 0.5,
    library_id: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    weights=None,
    thumbnail_px: int = 2048,
    progress: bool = True,
) -> AnnData:
    """Pseudo-spots on the tissue of an H&E image, with histology features made by ``recipe``.

    Parameters
    ----------
    image
        Image file (JPEG, PNG, TIFF, pyramidal TIFF / OME-TIFF / SVS) or an open :class:`SlideImage`.
    recipe
        A feature recipe (:mod:`spartha_pyro.recipe`), e.g. ``model.registry.histology_recipe``.
    histology_key
        ``obsm`` key of the features (and ``uns`` key of their recipe).
    um_per_px
        µm per full-resolution pixel; default the file's metadata, else the recipe's
        training resolution (with a warning).
    spacing_um, spot_um, grid
        Spot spacing (centre to centre) and diameter in µm and grid kind (``"square"``:
        legacy ST, ``"hex"``: Visium); default the recipe's training platform.
    subdivide
        Pseudo-spots every ``spacing_um / subdivide`` (the same grid kind, refined): a map
        ``subdivide²`` times denser, each pseudo-spot still a full training-size patch, and
        grid-neighbour context (with a ``neighbors`` recipe) still taken from the pseudo-spots
        one training spacing away, as in training. ``1`` (default): the training platform's grid.
    tissue_mask
        Mask image file (non-zero = tissue, any size with the image's aspect) or boolean array
        instead of :func:`detect_tissue`.
    min_tissue
        Keep spots whose spot square is at least this fraction tissue on the mask.
    library_id
        Key of ``uns["spatial"]`` (default the file name without suffix).
    batch_size
        Patches per extractor call.
    device
        Torch device of CNN extractors.
    weights
        ResNet-50 weights (default the path the recipe records).
    thumbnail_px
        Longest side of the low-resolution copy used for tissue detection and plots.
    progress
        Show a tqdm bar.

    Returns
    -------
    AnnData (pseudo-spots × 0 genes) with ``obsm[histology_key]``, ``obsm["spatial"]``
    (full-resolution px), ``obs`` ``array_row``, ``array_col``, ``tissue_fraction`` (mask),
    ``patch_tissue_fraction``, ``uns["spatial"][library_id]`` (``images`` ``hires``/``lowres``,
    ``scalefactors``, ``metadata``), ``uns[histology_key]["recipe"]`` and ``uns["image_grid"]``.

    Raises
    ------
    InputError
        Unreadable or non-RGB image; a recipe that cannot be reproduced from an image
        (``precomputed`` vectors, unknown patch size); no resolution known; a resolution more
        than 2× off the training images'; an image smaller than one patch; no tissue.
    """
    from tqdm.auto import tqdm

    from .pp.features import extractor_versions, make_extractors, neighbor_mean
    from .pp.patches import tissue_fraction
    from .recipe import RECIPE_VERSION

    names = list(recipe.get("extractors", []))
    if not names or "precomputed" in names:
        raise InputError(
            f"the model's features ({names or 'unknown'}) cannot be made from an image: predict-image needs "
            "a model trained on features from sp.pp.histology_features with image extractors"
        )
    if "patch_px" not in recipe:
        raise InputError("the model's feature recipe has no patch size: recompute its training features")
    with ExitStack() as stack:
        slide = image if isinstance(image, SlideImage) else stack.enter_context(open_image(image))
        train_mpp = recipe.get("um_per_px")
        source = "argument"
        if um_per_px is None:
            um_per_px, source = slide.um_per_px, "file metadata"
        if um_per_px is None:
            if train_mpp is None:
                raise InputError(
                    f"the resolution of {str(slide.path)!r} is unknown (no metadata) and the model's recipe does not "
                    "record one: give um_per_px (--um-per-px)"
                )
            um_per_px, source = float(train_mpp), "training resolution (assumed)"
            warnings.warn(
                f"{slide.path.name}: no resolution in the file's metadata; assuming the training images' "
                f"{um_per_px:.4g} µm/px (give --um-per-px if it differs)",
                UserWarning,
                stacklevel=2,
            )
        if not um_per_px > 0:
            raise InputError(f"um_per_px must be positive, got {um_per_px}")
        level = _choose_level(slide, um_per_px, train_mpp)
        level_mpp = um_per_px * slide.downsamples[level]
        if train_mpp is not None:
            ratio = level_mpp / float(train_mpp)
            if max(ratio, 1 / ratio) > MAX_RESOLUTION_RATIO:
                raise InputError(
                    f"{slide.path.name} has {level_mpp:.4g} µm/px (from {source}; best level {level}), "
                    f"{max(ratio, 1 / ratio):.2f}× off the model's training images ({float(train_mpp):.4g} µm/px; "
                    f"at most {MAX_RESOLUTION_RATIO:g}× allowed): give the right --um-per-px, or a rescaled image"
                )
        out_size = int(recipe["patch_px"])
        if "patch_um" in recipe:
            patch_side = max(1, int(round(float(recipe["patch_um"]) / level_mpp)))
        else:
            warnings.warn("the model's recipe has no patch size in µm: patches are taken at its pixel size",
                          UserWarning, stacklevel=2)
            patch_side = max(1, int(round(out_size / slide.downsamples[level])))
        lw, lh = slide.sizes[level]
        if lw < patch_side or lh < patch_side:
            raise InputError(
                f"{slide.path.name} ({lw} × {lh} px at level {level}) is smaller than one patch "
                f"({patch_side} px = {patch_side * level_mpp:.0f} µm)"
            )
        spacing_um = spacing_um or recipe.get("spot_spacing_um")
        if spacing_um is None:
            raise InputError("the model's recipe has no spot spacing: give spacing_um (--spacing-um)")
        spot_um = spot_um or recipe.get("spot_diameter_um") or spacing_um / 2
        grid = grid or recipe.get("grid", "square")
        if not (isinstance(subdivide, (int, np.integer)) and subdivide >= 1):
            raise InputError(f"subdivide must be a positive integer, got {subdivide!r}")
        spacing_px, spot_px = spacing_um / um_per_px, spot_um / um_per_px
        step_px = spacing_px / subdivide  # the pseudo-spots' own spacing

        thumb, scale = slide.thumbnail(thumbnail_px)
        if tissue_mask is None:
            mask = detect_tissue(thumb)
            mask_source = "otsu saturation"
        elif isinstance(tissue_mask, np.ndarray):
            mask = np.asarray(Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize(
                (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST)) > 0
            mask_source = "array"
        else:
            mask = read_mask(tissue_mask, thumb.shape[:2])
            mask_source = str(tissue_mask)
        w0, h0 = slide.sizes[0]
        xy, rowcol = spot_grid(w0, h0, step_px, grid)
        frac = _tissue_under_spots(mask, scale, xy, spot_px) if len(xy) else np.zeros(0)
        keep = frac >= min_tissue
        if not keep.any():
            raise InputError(
                f"no tissue found in {slide.path.name} ({mask_source}: {mask.mean():.1%} of the low-resolution "
                f"image is tissue; no {grid} grid spot of {spacing_um / subdivide:g} µm spacing is ≥ {min_tissue:.0%} tissue); "
                "check the image or give --tissue-mask"
            )
        xy, rowcol, frac = xy[keep], rowcol[keep], frac[keep]

        t0 = time.perf_counter()
        runners = make_extractors(names, weights if weights is not None else recipe.get("resnet50_weights"), device)
        feats: dict[str, np.ndarray] = {}
        patch_frac = np.empty(len(xy))
        with tqdm(total=len(xy), desc="image features", unit="spot", disable=not progress) as bar:
            for idx, patches in iter_grid_patches(slide, xy, rowcol, patch_side, out_size, level,
                                                  step_px / slide.downsamples[level], batch_size):
                patch_frac[idx] = tissue_fraction(patches)
                for name, run in runners.items():
                    f = run(patches)
                    if name not in feats:
                        feats[name] = np.empty((len(xy), f.shape[1]), np.float32)
                    feats[name][idx] = f
                bar.update(len(idx))
        library_id = library_id or slide.path.name.split(".")[0]
        X = np.concatenate([feats[n] for n in names], axis=1)
        obs = pd.DataFrame(
            {"array_row": rowcol[:, 0], "array_col": rowcol[:, 1], "in_tissue": 1, "tissue_fraction": frac,
             "patch_tissue_fraction": patch_frac, "slide": library_id},
            index=[f"{library_id}_{r}x{c}" for r, c in rowcol],
        )
        out = AnnData(obs=obs, obsm={"spatial": xy.astype(np.float64)})
        if recipe.get("neighbors"):
            context = neighbor_mean(out, X, library_key="slide") if subdivide == 1 else lattice_neighbor_mean(xy, X, spacing_px, grid)
            X = np.concatenate([X, context], axis=1)
        out.obsm[histology_key] = X.astype(np.float32)
        made = {
            **{k: v for k, v in recipe.items() if k not in ("versions", "n_features", "patch_um", "um_per_px",
                                                            "spot_spacing_um", "spot_diameter_um", "grid")},
            "recipe_version": RECIPE_VERSION,
            "versions": extractor_versions(names, weights if weights is not None else recipe.get("resnet50_weights")),
            "n_features": int(X.shape[1]),
            "patch_um": patch_side * level_mpp,
            "um_per_px": level_mpp,
            "spot_spacing_um": float(spacing_um),
            "spot_diameter_um": float(spot_um),
            "grid": grid,
        }
        out.uns[histology_key] = {"extractors": names, "neighbors": bool(recipe.get("neighbors")), "recipe": made}
        lowres_f = min(1.0, 600 / max(thumb.shape[:2]))
        lowres = np.asarray(Image.fromarray(thumb).resize(
            (max(1, round(thumb.shape[1] * lowres_f)), max(1, round(thumb.shape[0] * lowres_f))),
            Image.Resampling.LANCZOS))
        out.uns["spatial"] = {
            library_id: {
                "images": {"hires": thumb, "lowres": lowres},
                "scalefactors": {
                    "tissue_hires_scalef": float(scale),
                    "tissue_lowres_scalef": float(scale * lowres.shape[1] / thumb.shape[1]),
                    "spot_diameter_fullres": float(spot_px),
                },
                "metadata": {"source_image_path": str(slide.path.resolve()), "microns_per_pixel": float(um_per_px),
                             "spot_diameter_um": float(spot_um)},
            }
        }
        out.uns["image_grid"] = {
            "image": str(slide.path.resolve()), "size": [int(w0), int(h0)], "um_per_px": float(um_per_px),
            "um_per_px_source": source, "level": int(level), "level_um_per_px": float(level_mpp),
            "patch_side_px": int(patch_side), "grid": grid, "spacing_um": float(spacing_um), "subdivide": int(subdivide),
            "pseudo_spot_spacing_um": float(spacing_um / subdivide),
            "spot_um": float(spot_um), "tissue_mask": mask_source, "min_tissue": float(min_tissue),
            "tissue_area_fraction": float(mask.mean()), "seconds_features": round(time.perf_counter() - t0, 2),
        }
    return out


# ---------------------------------------------------------------------------- prediction
def predict_image(
    model,
    image: str | os.PathLike,
    out: str | os.PathLike | None = None,
    samples: str | os.PathLike | None = None,
    num_samples: int = 20,
    artifact: str = "pass",
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    seed: int = 0,
    chunk_spots: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    linear_path: bool = True,
    **grid_kwargs,
) -> AnnData:
    """Predict expression maps from an H&E image alone, with uncertainty.

    Pseudo-spots and their features come from :func:`image_features` (with the model's
    recipe; ``grid_kwargs`` go there: ``um_per_px``, ``spacing_um``, ``spot_um``, ``grid``,
    ``tissue_mask``, ``min_tissue``, ``library_id``, ``batch_size``, ``device``…). The model
    predicts from histology alone (:meth:`~spartha_pyro.SPARTHA.predict_summary`,
    ``artifact="pass"``: artifact-free): the predictive mean with the count noise integrated
    out, and summaries of sampled draws, a chunk of spots at a time (bounded memory); every
    pseudo-spot's histology is scaled with the whole image's.

    Parameters
    ----------
    model
        A :class:`~spartha_pyro.SPARTHA` or the folder of a saved one.
    image
        The H&E image file.
    out
        Write the result there (``.h5ad``, atomically); ``None``: only return it.
    samples
        Also write every draw to this NetCDF file (dims sample × spot × gene).
    num_samples, artifact, quantiles, seed
        As in ``spartha predict``.
    chunk_spots
        Spots predicted at a time; default ~50 MB of draws per chunk (~4× that while summarising).
    linear_path
        With ``artifact="posterior"``, blend the model's linear histology path into ``X``
        (:meth:`~spartha_pyro.SPARTHA.predict_mean`).
    overwrite
        Replace existing ``out``/``samples`` files (otherwise :class:`InputError`, checked
        before any work).

    Returns
    -------
    AnnData, pseudo-spots × the model's genes: ``X`` = predictive mean of log1p(counts per
    10,000), layers ``draws_mean`` (the same estimated from the draws), ``sd``,
    ``q05``/``q50``/``q95`` (same space) and ``counts_mean``; ``obs``/``obsm``/``uns`` from
    :func:`image_features`, ``uns["prediction"]``, ``uns["linear_share"]``.
    """
    from . import SPARTHA
    from .io.write import atomic_path, write_h5ad

    existing = [str(f) for f in (out, samples) if f is not None and Path(f).exists()]
    if existing and not overwrite:
        raise InputError(f"{existing} already exist; pass overwrite=True (--overwrite) to replace them")
    if samples is not None and Path(samples).suffix != ".nc":
        raise InputError(f"samples file must end in .nc (NetCDF), got {str(samples)!r}")
    if artifact not in ("pass", "posterior"):
        raise InputError(f"artifact must be 'pass' or 'posterior', got {artifact!r}")
    if not isinstance(model, SPARTHA):
        model = SPARTHA.load(model, device=grid_kwargs.get("device") or "auto")
    recipe = model.registry.histology_recipe
    if recipe is None:
        raise InputError(
            "the model does not record how its histology features were made (no feature recipe): retrain it on "
            "features from sp.pp.histology_features / `spartha prepare` with this version"
        )
    spots = image_features(image, recipe, histology_key=model.registry.histology_key, progress=progress, **grid_kwargs)
    t0 = time.perf_counter()
    n_genes = len(model.registry.genes)
    chunk = chunk_spots or max(16, int(5e7 // (4 * num_samples * max(1, n_genes))))
    with ExitStack() as stack:
        nc = None if samples is None else stack.enter_context(atomic_path(samples))
        pred = model.predict_summary(spots, num_samples=num_samples, artifact=artifact, quantiles=quantiles,
                                     batch_size=chunk, seed=seed, out=nc, overwrite=True, linear_path=linear_path)
        for key in spots.obsm:
            pred.obsm[key] = spots.obsm[key]
        pred.uns.update({k: v for k, v in spots.uns.items()})
        pred.uns["prediction"] = {**pred.uns["prediction"], "chunk_spots": int(chunk),
                                  "seconds": round(time.perf_counter() - t0, 2)}
        if out is not None:
            write_h5ad(pred, out)
    return pred


# ---------------------------------------------------------------------------- plots
def check_genes(genes: Sequence[str], known: Sequence[str]) -> list[str]:
    """``genes`` if all are ``known``; else :class:`InputError` naming the unknown ones."""
    missing = [g for g in genes if g not in set(known)]
    if missing:
        raise InputError(f"genes {missing[:10]} are not among the model's {len(known)} genes")
    return list(genes)


def plot_gene_maps(pred: AnnData, genes: Sequence[str], plot_dir: str | os.PathLike, dpi: int = 120) -> list[Path]:
    """Per gene, ``<plot_dir>/<gene>.png``: predicted mean and sd (log1p counts per 10,000) side by side
    over the tissue image (each written atomically).

    Returns
    -------
    The written paths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .io.write import atomic_path

    check_genes(genes, list(pred.var_names))
    lib = next(iter(pred.uns["spatial"]))
    entry = pred.uns["spatial"][lib]
    img, scale = entry["images"]["hires"], float(entry["scalefactors"]["tissue_hires_scalef"])
    xy = np.asarray(pred.obsm["spatial"]) * scale
    spot = float(entry["scalefactors"]["spot_diameter_fullres"]) * scale
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for gene in genes:
        j = int(pred.var_names.get_loc(gene))
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
        for ax, values, title in ((axes[0], pred.X[:, j], "predicted mean"), (axes[1], pred.layers["sd"][:, j], "sd")):
            ax.imshow(img)
            # marker size in points²: the spot diameter in data pixels at this figure's scale
            width_pt = ax.get_window_extent().width * 72 / fig.dpi
            size = (spot * width_pt / img.shape[1]) ** 2
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(values).ravel(), s=size, cmap="viridis", linewidths=0)
            ax.set_title(f"{gene}: {title}\nlog1p(counts per 10,000)")
            ax.set_axis_off()
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        path = plot_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', gene)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(path)
    return written


__all__ = ["SlideImage", "open_image", "detect_tissue", "spot_grid", "image_features", "predict_image",
           "plot_gene_maps", "read_mask", "otsu_threshold"]
