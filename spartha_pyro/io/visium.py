"""10x Visium (Space Ranger) output in the layout that :mod:`spartha_pyro.pp` expects."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._errors import InputError
from ._images import image_size

VISIUM_SPOT_DIAMETER_UM = 55.0  #: Visium spot diameter in µm


def read_visium(
    path: str | Path,
    source_image_path: str | Path | None = None,
    library_id: str | None = None,
    count_file: str = "filtered_feature_bc_matrix.h5",
    load_images: bool = True,
) -> AnnData:
    """Read one Space Ranger output folder (counts, spot positions, scale factors, images).

    Parameters
    ----------
    path
        Space Ranger ``outs/`` folder with ``count_file`` and ``spatial/``
        (``tissue_positions.csv`` or ``tissue_positions_list.csv``, ``scalefactors_json.json``,
        ``tissue_{hires,lowres}_image.png``).
    source_image_path
        Full-resolution H&E image given to Space Ranger; needed for patch features. Its size
        is checked against the spot coordinates.
    library_id
        Section name; default the one in the h5 file (or the folder name).
    count_file
        Counts file inside ``path``.
    load_images
        Load the hires/lowres PNGs into ``uns["spatial"][library_id]["images"]``.

    Returns
    -------
    AnnData, spots × genes (raw counts, CSR), with ``obsm["spatial"]`` in full-resolution
    pixels, ``obs`` columns ``slide`` (= ``library_id``), ``has_image``, ``in_tissue``,
    ``array_x``/``array_y`` (array column/row), and ``uns["spatial"][library_id]`` holding
    ``images``, ``scalefactors`` and ``metadata`` with ``source_image_path`` (absolute, or
    absent), ``microns_per_pixel`` and ``spot_diameter_um``.

    Raises
    ------
    InputError
        Missing files, or spots outside the source image; the message names the file.
    """
    import scanpy as sc  # imported here: scanpy is slow to import and only this reader needs it

    root = Path(path).expanduser().resolve()
    spatial_dir = root / "spatial"
    required = [root / count_file, spatial_dir / "scalefactors_json.json"]
    for file in required:
        if not file.is_file():
            raise InputError(f"Visium folder {str(root)!r}: required file {str(file)!r} is missing")
    if not any((spatial_dir / n).is_file() for n in ("tissue_positions.csv", "tissue_positions_list.csv")):
        raise InputError(
            f"Visium folder {str(root)!r}: no spatial/tissue_positions.csv or tissue_positions_list.csv"
        )
    source = None
    if source_image_path is not None:
        source = Path(source_image_path).expanduser().resolve()
        image_size(source, library_id or root.name)  # exists and is readable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy/spatialdata
        try:
            adata = sc.read_visium(root, count_file=count_file, library_id=library_id, load_images=load_images)
        except (OSError, KeyError, ValueError) as err:
            raise InputError(f"Visium folder {str(root)!r}: cannot read {count_file!r}: {err}") from err
    adata.var_names_make_unique()
    lib = next(iter(adata.uns["spatial"]))
    entry = adata.uns["spatial"][lib]
    entry.setdefault("metadata", {})
    entry["metadata"].pop("source_image_path", None)
    diameter = float(entry["scalefactors"]["spot_diameter_fullres"])
    entry["metadata"].update(
        {"microns_per_pixel": VISIUM_SPOT_DIAMETER_UM / diameter, "spot_diameter_um": VISIUM_SPOT_DIAMETER_UM}
    )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    adata.obsm["spatial"] = xy
    if source is not None:
        w, h = image_size(source, lib)
        outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
        if outside.any():
            raise InputError(
                f"library {lib!r}: {outside.sum()} of {len(xy)} spots fall outside source image "
                f"{str(source)!r} ({w}×{h} px): is it the full-resolution image given to Space Ranger?"
            )
        entry["metadata"]["source_image_path"] = str(source)
    obs = adata.obs
    obs["slide"] = pd.Categorical([lib] * adata.n_obs)
    obs["has_image"] = source is not None
    obs["in_tissue"] = obs["in_tissue"].astype(bool)
    obs["array_x"] = obs["array_col"].astype(int)
    obs["array_y"] = obs["array_row"].astype(int)
    return adata
