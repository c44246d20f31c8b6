"""The one documented error type for bad user input."""


class InputError(ValueError):
    """Raised when user input (AnnData keys, counts, histology, files) is invalid.

    The message names the offending key, spots, file or section. Subclasses ``ValueError``
    so generic handlers keep working.
    """
