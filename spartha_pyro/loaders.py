"""Minibatches for the probabilistic program: one batch schema and the loaders that build it.

:class:`Batch` is the one seam between data and the program: its fields are the positional
arguments of :class:`~spartha_pyro.models.SparthaModel` and both guides, in order, so
``model(*batch)`` runs one minibatch. :func:`minibatch` builds one from host arrays
(:class:`~spartha_pyro.data.SpotArrays`): counts stay sparse (CSR) on the host and are
densified on the device, one minibatch at a time, so a spots × genes matrix is never dense on
the host.

Training reads minibatches through a loader (:func:`make_loader`):

- :class:`DeviceLoader` uploads the whole data set once (counts as CSR arrays) and gathers and
  densifies each minibatch on the device: no host work and no host-device sync per step.
  Chosen when the data fit in a quarter of the free device memory (always on CPU).
- :class:`HostLoader` slices CSR rows on the host (from memory, or from an h5ad opened with
  ``backed="r"``: only the minibatch's rows are read), pins them and prefetches the next
  minibatch on a background thread while the device trains on the current one.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from .data import BackedCounts, SpotArrays


class Batch(NamedTuple):
    """One minibatch of ``B`` spots on the device: the model's and guides' arguments, in order.

    ``x_t`` float32 ``(B, G)`` counts (zero rows where ``has_counts`` is False), or ``None`` to
    generate them; ``x_h`` float32 ``(B, H)`` standardised histology (zero rows where
    ``has_histology`` is False); ``labels`` int64 ``(B, m)`` label codes; ``batch`` and ``qc``
    int64 ``(B,)`` batch and QC codes (QC 0 fail, 1 pass; every code ``-1`` = missing);
    ``has_counts``, ``has_histology`` bool ``(B,)``; ``index`` int64 ``(B,)`` the spots' indices
    in the training set (the plate's subsample).
    """

    x_t: torch.Tensor | None
    x_h: torch.Tensor
    labels: torch.Tensor
    batch: torch.Tensor
    qc: torch.Tensor
    has_counts: torch.Tensor
    has_histology: torch.Tensor
    index: torch.Tensor


def iterate_minibatches(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool):
    """Index arrays covering ``range(n)``, shuffled when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield np.sort(order[start : start + batch_size])


def histology_strata(has_histology: np.ndarray, max_unimaged_share: float) -> tuple[int, int] | None:
    """``(spots with histology, spots without)`` when minibatches are stratified by histology
    (both kinds present and ``max_unimaged_share < 1``), else ``None``. The one test that
    :func:`stratified_minibatches` and the loss's stratum weights share."""
    n_with = int(np.count_nonzero(has_histology))
    if 0 < n_with < len(has_histology) and max_unimaged_share < 1:
        return n_with, len(has_histology) - n_with
    return None


def stratified_minibatches(
    has_histology: np.ndarray, batch_size: int, rng: np.random.Generator, drop_last: bool, max_unimaged_share: float
) -> list[np.ndarray]:
    """One epoch's minibatches (index arrays into ``has_histology``) when the spots without
    histology (count-only sections) would otherwise swamp the ones with.

    An epoch is one pass over the spots **with** histology, shuffled into minibatches of
    ``batch_size - k`` spots; each minibatch is topped up with ``k`` spots without histology,
    ``k = round(batch_size * min(their share of the data, max_unimaged_share))`` (at least one),
    drawn from shuffled passes over them (a partial last minibatch gets a proportional ``k``).
    Adding count-only sections therefore neither lengthens an epoch beyond
    ``1 / (1 - max_unimaged_share)`` times nor cuts the histology path's steps, whatever their
    size. The ELBO stays unbiased through per-stratum scales
    (:meth:`~spartha_pyro.module.SparthaModule.stratum_scale`). With one stratum only, or
    ``max_unimaged_share >= 1``, this is :func:`iterate_minibatches` over every spot.
    """
    has_histology = np.asarray(has_histology, dtype=bool)
    if histology_strata(has_histology, max_unimaged_share) is None:
        return list(iterate_minibatches(len(has_histology), batch_size, rng, drop_last))
    with_h, without = np.flatnonzero(has_histology), np.flatnonzero(~has_histology)
    if batch_size < 2:
        raise ValueError("stratified minibatches need batch_size >= 2")
    share = min(len(without) / len(has_histology), max_unimaged_share)
    k = min(max(1, round(batch_size * share)), batch_size - 1)
    imaged = [with_h[b] for b in iterate_minibatches(len(with_h), batch_size - k, rng, drop_last)]
    sizes = [max(1, round(k * len(h) / (batch_size - k))) for h in imaged]
    passes = -(-sum(sizes) // len(without))
    fill = np.concatenate([rng.permutation(without) for _ in range(passes)])
    ends = np.cumsum(sizes)
    return [np.sort(np.concatenate([h, fill[end - size : end]])) for h, size, end in zip(imaged, sizes, ends)]


def minibatch(data: SpotArrays, idx: np.ndarray, device: torch.device, n_genes: int) -> Batch:
    """The :class:`Batch` of spots ``idx`` of ``data`` on ``device``.

    Counts are sliced as CSR on the host and densified on the device; spots without counts
    get an all-zero row, masked by ``has_counts``.
    """
    idx = np.asarray(idx)
    pin = device.type == "cuda"

    def t(a):
        a = torch.from_numpy(np.ascontiguousarray(a))
        return (a.pin_memory() if pin else a).to(device, non_blocking=pin)

    if data.counts is not None:
        sub = data.counts[idx]
        crow, col, val = (t(a) for a in (sub.indptr.astype(np.int64), sub.indices, sub.data))
        rows = torch.arange(len(idx), device=device)
        x_t = densify_rows(crow, col, val, rows, n_genes, int(np.diff(sub.indptr).max(initial=0)))
    else:
        x_t = torch.zeros(len(idx), n_genes, device=device)
    return Batch(
        x_t=x_t,
        x_h=t(data.x_h[idx]),
        labels=t(data.labels[idx]),
        batch=t(data.batch[idx]),
        qc=t(data.qc[idx]),
        has_counts=t(data.has_counts[idx]),
        has_histology=t(data.has_histology[idx]),
        index=t(idx.astype(np.int64)),
    )


def densify_rows(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, rows: torch.Tensor, n_genes: int, max_nnz: int
) -> torch.Tensor:
    """Dense ``(len(rows), n_genes)`` float32 rows of a CSR matrix given as device tensors.

    A padded gather: every row reads ``max_nnz`` slots (the longest row of the matrix) and
    masks the slots past its end, so no output size depends on the data and no host-device
    synchronisation is needed.

    Parameters
    ----------
    crow, col, val
        CSR row pointers ``(n + 1,)`` int64, column indices ``(nnz,)`` and values ``(nnz,)``.
    rows
        ``(B,)`` int64 row indices.
    n_genes
        Number of columns ``G``.
    max_nnz
        An upper bound of the number of stored entries in any row.
    """
    out = torch.zeros(len(rows), n_genes, dtype=val.dtype, device=val.device)
    if max_nnz == 0 or val.numel() == 0:
        return out
    start, end = crow[rows], crow[rows + 1]
    slot = start.unsqueeze(1) + torch.arange(max_nnz, device=val.device)
    inside = slot < end.unsqueeze(1)
    slot = torch.where(inside, slot, torch.zeros_like(slot))
    return out.scatter_add_(1, col[slot].long(), val[slot] * inside)


class DeviceLoader:
    """The whole data set on ``device``; minibatches gathered and densified there.

    Parameters
    ----------
    data
        In-memory spot arrays (counts CSR or ``None``).
    device
        Where the arrays live and the model trains.
    n_genes
        Number of genes ``G``.
    """

    def __init__(self, data: SpotArrays, device: torch.device, n_genes: int):
        self.device, self.n_genes = device, n_genes
        put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.tensors = {
            name: put(getattr(data, name)) for name in ("x_h", "labels", "batch", "qc", "has_counts", "has_histology")
        }
        self.csr = None
        if data.counts is not None:
            c = data.counts
            # copy=False: on CPU the "upload" is a view of the validated CSR arrays, not a second copy
            arrays = (c.indptr.astype(np.int64, copy=False), c.indices.astype(np.int32, copy=False), c.data.astype(np.float32, copy=False))
            self.csr = tuple(put(a) for a in arrays)
            self.max_nnz = int(np.diff(c.indptr).max(initial=0))

    @staticmethod
    def nbytes(data: SpotArrays) -> int:
        """Device bytes the arrays of ``data`` take once uploaded."""
        fixed = data.x_h.nbytes + data.labels.nbytes + 3 * data.n * 8
        if data.counts is None:
            return fixed
        return fixed + data.counts.nnz * 8 + (data.n + 1) * 8

    def batches(self, index_batches: Iterator[np.ndarray]) -> Iterator[Batch]:
        """A :class:`Batch` for each array of spot indices."""
        pin = self.device.type == "cuda"
        for idx in index_batches:
            rows = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            rows = (rows.pin_memory() if pin else rows).to(self.device, non_blocking=pin)
            if self.csr is not None:
                x_t = densify_rows(*self.csr, rows, self.n_genes, self.max_nnz)
            else:
                x_t = torch.zeros(len(idx), self.n_genes, device=self.device)
            yield Batch(x_t=x_t, **{k: v[rows] for k, v in self.tensors.items()}, index=rows)


class HostLoader:
    """Minibatches sliced on the host (memory or backed h5ad), prefetched on a thread.

    While the device computes step ``t``, a background thread reads, pins and copies the
    rows of step ``t + 1`` (up to ``prefetch`` minibatches ahead).
    """

    def __init__(self, data: SpotArrays, device: torch.device, n_genes: int, prefetch: int = 2):
        self.data, self.device, self.n_genes, self.prefetch = data, device, n_genes, prefetch

    def batches(self, index_batches: Iterator[np.ndarray]) -> Iterator[Batch]:
        """A :class:`Batch` for each array of spot indices."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def work():
            try:
                for idx in index_batches:
                    if stop.is_set():
                        return
                    q.put(minibatch(self.data, idx, self.device, self.n_genes))
                q.put(done)
            except BaseException as err:  # re-raised in the consumer
                q.put(err)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.01)


def make_loader(data: SpotArrays, device: torch.device, n_genes: int, kind: str = "auto") -> DeviceLoader | HostLoader:
    """A training loader: ``"device"``, ``"host"``, or ``"auto"``.

    ``"auto"`` keeps the data on the device when they are in memory (not backed) and take at
    most a quarter of the free device memory (always on CPU), else reads from the host.
    """
    if kind not in ("auto", "device", "host"):
        raise ValueError(f"loader must be 'auto', 'device' or 'host', got {kind!r}")
    if kind == "auto":
        in_memory = not isinstance(data.counts, BackedCounts)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
        kind = "device" if in_memory and DeviceLoader.nbytes(data) <= free / 4 else "host"
    if kind == "device" and isinstance(data.counts, BackedCounts):
        raise ValueError("loader='device' needs counts in memory; this data set is backed on disk")
    return DeviceLoader(data, device, n_genes) if kind == "device" else HostLoader(data, device, n_genes)
