"""Training checkpoints: everything the SVI loop needs to continue exactly where it stopped.

One file per checkpoint, ``ckpt-000012.pt`` (epoch 12 done), each written atomically with
:func:`~spartha_pyro.io.atomic_path`. The latest complete checkpoint is the highest-numbered
file that loads; a killed run leaves at most a hidden temporary file, never a partial
``ckpt-*.pt``. A checkpoint holds the module and optimizer ``state_dict``s, the epoch, the
loss history, the early-stopping state and every random state the loop draws from (torch
CPU and CUDA, NumPy's global state, the loop's ``np.random.Generator``, Python's
``random``; Pyro draws from torch, NumPy and ``random``).
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ._errors import InputError
from .io.write import atomic_path

_NAME = re.compile(r"ckpt-(\d+)\.pt")


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The checkpoint files in ``directory``, newest (highest epoch) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def rng_state(rng: np.random.Generator) -> dict:
    """Every random state the training loop draws from, in ``torch.load(weights_only=True)``-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
        "python": random.getstate(),
        "generator": rng.bit_generator.state,
    }


def set_rng_state(state: dict, rng: np.random.Generator) -> None:
    """Restore the random states of :func:`rng_state` (``rng`` in place)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    rng.bit_generator.state = state["generator"]


def write_checkpoint(directory: str | Path, state: dict, keep: int) -> Path:
    """Write ``state`` (with key ``"epoch"``) as ``directory/ckpt-{epoch:06d}.pt``; keep the last ``keep``.

    Temporary files that a killed earlier write left behind (``.ckpt-*.pt``, never read as
    checkpoints) are removed too: the folder has one writer.

    Parameters
    ----------
    directory
        Checkpoint folder (created when missing).
    state
        The loop's state; ``state["epoch"]`` is the last finished epoch.
    keep
        Number of most recent checkpoints kept; older ones are deleted.

    Returns
    -------
    The path written.
    """
    path = Path(directory) / f"ckpt-{state['epoch']:06d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in [*checkpoint_files(directory)[keep:], *Path(directory).glob(".ckpt-*.pt")]:
        old.unlink(missing_ok=True)
    return path


def load_latest(directory: str | Path) -> dict | None:
    """The latest complete checkpoint in ``directory`` (``None`` when it holds none).

    Files that do not load (truncated or corrupt) are skipped with a warning naming them.

    Raises
    ------
    InputError
        If checkpoint files exist but none loads; the message names them.
    """
    files = checkpoint_files(directory)
    errors = []
    for path in files:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for truncated/corrupt files
            errors.append(f"{path} ({type(err).__name__}: {err})")
            warnings.warn(f"checkpoint {path} cannot be read (truncated or corrupt?); trying an older one", stacklevel=2)
            continue
        state["path"] = str(path)
        return state
    if errors:
        raise InputError(f"no checkpoint in {directory} can be read: {'; '.join(errors)}")
    return None
