"""Shared image helpers: open a histology image safely and make a small in-memory copy.

Full-resolution H&E images are large (~9k × 10k RGB ≈ 270 MB decoded); these helpers open
them lazily, decode at reduced size where the format allows (JPEG draft mode), and always
close the file. Errors name the file and the section.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .._errors import InputError

_LIMIT_LOCK = threading.Lock()
_lifted = 0  # open images (any thread) reading with the limit lifted
_user_limit: int | None = None


@contextmanager
def _open_huge(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)`` with Pillow's decompression-bomb limit lifted for this block only.

    Histology images are legitimately huge (~9k × 10k px), so ``Image.MAX_IMAGE_PIXELS`` is
    lifted while the library reads them, and the caller's limit is restored afterwards: the
    guard stays on for every other image the process opens.
    """
    global _lifted, _user_limit
    with _LIMIT_LOCK:
        if not _lifted:
            _user_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        _lifted += 1
    try:
        with Image.open(path) as im:
            yield im
    finally:
        with _LIMIT_LOCK:
            _lifted -= 1
            if not _lifted:
                Image.MAX_IMAGE_PIXELS = _user_limit


def image_size(path: str | Path, section: str) -> tuple[int, int]:
    """Size ``(width, height)`` in pixels of an image, read from its header only.

    Raises
    ------
    InputError
        If the file is missing or not a readable image; the message names file and section.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"section {section!r}: image file {str(path)!r} does not exist")
    try:
        with _open_huge(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"section {section!r}: cannot read image {str(path)!r}: {err}") from err


def load_rgb(path: str | Path, section: str, max_px: int | None = None) -> tuple[np.ndarray, float]:
    """Decode an image as uint8 RGB, optionally downscaled so its longer side is ≤ ``max_px``.

    Parameters
    ----------
    path
        Image file (JPEG, PNG, TIFF, ... anything Pillow reads).
    section
        Section name, used in error messages.
    max_px
        Longest side of the returned array in pixels; ``None`` keeps full resolution.

    Returns
    -------
    image
        ``uint8`` array, shape ``(height, width, 3)``.
    scale
        Pixels of ``image`` per pixel of the file (1.0 when not downscaled).

    Raises
    ------
    InputError
        Missing, truncated or unreadable file, or one with 16/32-bit integer or float pixels
        (``convert("RGB")`` would clip or zero them); the message names file and section.
    """
    path = Path(path)
    width, height = image_size(path, section)
    scale = 1.0 if max_px is None or max(width, height) <= max_px else max_px / max(width, height)
    try:
        with _open_huge(path) as im:
            if im.mode.startswith(("I", "F")):
                raise InputError(
                    f"section {section!r}: image {str(path)!r} has {im.mode!r} pixels (16/32-bit or float); "
                    "save it as 8-bit RGB"
                )
            if scale < 1.0:
                target = (max(1, round(width * scale)), max(1, round(height * scale)))
                if im.format == "JPEG":
                    im.draft("RGB", target)  # decode at 1/2^k size: fast and small
                im = im.convert("RGB").resize(target, Image.Resampling.LANCZOS)
            else:
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"section {section!r}: cannot decode image {str(path)!r}: {err}") from err
    if scale < 1.0:
        scale = arr.shape[1] / width
    return arr, scale
