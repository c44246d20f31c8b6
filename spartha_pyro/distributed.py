"""Data-parallel training over ``torch.distributed`` ranks (DDP-style, any backend).

Every rank holds a full copy of the module, trains on a disjoint shard of each epoch's
minibatches and averages gradients with one all-reduce per step, so every rank applies the
same update. The loss of each rank is already a per-spot mean (the plate scales the
minibatch up to ``n_spots`` and the model divides by ``n_spots``), hence the average over
ranks is the per-spot loss of the union of the ranks' minibatches: training with ``R`` ranks
× batch ``b`` estimates the same objective as one process with batch ``R b``.

:func:`spartha_pyro.train.fit` uses these helpers whenever a process group is initialised
(``torchrun`` + :func:`torch.distributed.init_process_group`); see ``examples/train_ddp.py``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batches: Sequence, rank: int, size: int) -> list:
    """Rank ``rank``'s share of ``batches``: every ``size``-th item, the same count on every rank.

    The tail that does not divide evenly is dropped, so all ranks run the same number of
    steps (each step has one collective all-reduce).
    """
    n = len(batches) - len(batches) % size
    return list(batches[rank:n:size])


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def allreduce_gradients(module: nn.Module) -> None:
    """Replace each parameter's gradient by its mean over ranks (one flattened all-reduce)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (``t`` itself without a process group)."""
    rank, size = world()
    if size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / size
