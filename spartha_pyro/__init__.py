"""spartha-pyro: predict spatial gene expression from histology with SPARTHA, in Pyro.

Public names: :class:`SPARTHA`, and the submodules ``datasets``, ``io``, ``pp``,
``metrics`` and ``pl``. The Pyro model and guides are in ``spartha_pyro.models`` and
``spartha_pyro.guides``.
"""
from importlib.metadata import PackageNotFoundError, version

from . import datasets, io, metrics, pl, pp
from ._errors import InputError
from .model import SPARTHA

try:
    __version__ = version("spartha-pyro")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["SPARTHA", "InputError", "datasets", "io", "metrics", "pl", "pp", "__version__"]
