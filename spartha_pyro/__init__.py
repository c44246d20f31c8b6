"""spartha-pyro: predict spatial gene expression from histology with SPARTHA, in Pyro.

Public names: :class:`SPARTHA`, and the submodules ``datasets``, ``image``, ``io``, ``pp``,
``metrics`` and ``pl``. The Pyro model and guides are in ``spartha_pyro.models`` and
``spartha_pyro.guides``.

The submodules are imported on first use (PEP 562), so ``import spartha_pyro.train`` or the
benchmarks do not pull in scanpy, matplotlib or the image stack.
"""
import importlib
from importlib.metadata import PackageNotFoundError, version

from ._errors import InputError

_LAZY = {"datasets", "image", "io", "metrics", "pl", "pp"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "SPARTHA":
        from .model import SPARTHA

        return SPARTHA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = version("spartha-pyro")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0"

__all__ = ["SPARTHA", "InputError", "datasets", "image", "io", "metrics", "pl", "pp", "__version__"]
