"""The feature recipe: how a model's histology vectors were made, so new ones can match.

:func:`spartha_pyro.pp.histology_features` records a recipe in ``adata.uns[key]["recipe"]``;
:class:`~spartha_pyro.SPARTHA` keeps it in its registry (saved with the model), refuses to
predict from histology whose recipe differs (:func:`check_recipe`), and
:func:`spartha_pyro.image.predict_image` reproduces it on a bare H&E image.

A recipe is a plain JSON-able dict:

- ``extractors`` (list, in column order) and ``versions`` (``{extractor: version string}``:
  the weights package or file, or the statistics' definition);
- ``n_features``: width of the vector; ``neighbors``: whether the grid-neighbour mean was
  appended (neighbours within ``neighbor_radius`` × the spot spacing);
- ``patch_px``: side of the patch the extractors saw, in pixels; ``patch_um``: the tissue it
  covered, in µm; ``um_per_px``: resolution of the training images (µm per full-resolution
  pixel);
- ``spot_diameter_um``, ``spot_spacing_um`` and ``grid`` (``"square"``: legacy ST, 4
  neighbours; ``"hex"``: Visium, 6) of the training platform, measured from the spots;
- ``standardization``: ``"none"``: vectors are raw; the model standardises them with its
  training mean and sd.

Keys whose value is unknown are left out (h5ad cannot store ``None``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np

from ._errors import InputError

RECIPE_VERSION = 1
#: relative tolerance on ``patch_um`` and ``spot_spacing_um`` when comparing recipes
RTOL = 0.05


def plain(value):
    """``value`` with numpy scalars/arrays turned into Python ones (as read back from h5ad)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_recipe(adata, histology_key: str) -> dict | None:
    """The recipe recorded with ``adata.obsm[histology_key]``, or ``None`` (vectors made otherwise,
    or changed since: a recipe whose width differs from the vectors' is ignored with a warning)."""
    entry = adata.uns.get(histology_key)
    if not isinstance(entry, Mapping) or "recipe" not in entry:
        return None
    recipe = plain(entry["recipe"])
    if not isinstance(recipe, dict):
        raise InputError(f"adata.uns[{histology_key!r}]['recipe'] must be a mapping, got {type(recipe).__name__}")
    width = np.shape(adata.obsm[histology_key])[1] if histology_key in adata.obsm else None
    if width is not None and recipe.get("n_features", width) != width:
        # the vectors were changed after extraction (columns selected, PCA...): the recipe no longer says how
        warnings.warn(
            f"adata.uns[{histology_key!r}]['recipe'] describes {recipe['n_features']} features but "
            f"obsm[{histology_key!r}] has {width}: ignoring the recipe",
            UserWarning,
            stacklevel=3,
        )
        return None
    return recipe


def recipe_differences(expected: Mapping, actual: Mapping) -> list[str]:
    """Human-readable differences between two recipes that change the features.

    Compared: extractors and their versions, width, neighbour context (and the spot spacing
    it averages over), patch side in px and, when both know it, in µm. Not compared: the
    images' resolution (patches are resampled to ``patch_um``) or spot diameter.
    """
    out = []
    for key in ("extractors", "versions", "n_features", "neighbors", "patch_px", "standardization"):
        if key in expected and key in actual and expected[key] != actual[key]:
            out.append(f"{key}: model {expected[key]!r}, data {actual[key]!r}")
    keys = ["patch_um"] + (["spot_spacing_um"] if expected.get("neighbors") else [])
    for key in keys:
        a, b = expected.get(key), actual.get(key)
        if a is not None and b is not None and not math.isclose(float(a), float(b), rel_tol=RTOL):
            out.append(f"{key}: model {float(a):.4g}, data {float(b):.4g}")
    return out


def check_recipe(expected: Mapping | None, actual: Mapping | None, what: str = "histology") -> None:
    """Raise :class:`InputError` naming every difference when both recipes are known and differ."""
    if expected is None or actual is None:
        return
    diff = recipe_differences(expected, actual)
    if diff:
        raise InputError(
            f"{what} features were made with another recipe than the model's: " + "; ".join(diff)
            + ". Recompute them with sp.pp.histology_features using the model's recipe "
            "(model.registry.histology_recipe)"
        )


def grid_geometry(xy: np.ndarray) -> tuple[float, str] | None:
    """Spot spacing (in the units of ``xy``) and grid kind of one section's spot centres.

    Spacing is the median nearest-neighbour distance; the grid is ``"hex"`` when spots have
    a median of ≥ 5 neighbours within 1.2 spacings, else ``"square"``. ``None`` for < 3 spots.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 3:
        return None
    tree = cKDTree(xy)
    spacing = float(np.median(tree.query(xy, k=2)[0][:, 1]))
    if spacing <= 0:
        return None
    counts = np.array([len(n) - 1 for n in tree.query_ball_point(xy, r=1.2 * spacing)])
    return spacing, "hex" if np.median(counts) >= 5 else "square"
