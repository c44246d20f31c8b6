"""The user-facing :class:`SPARTHA` model: AnnData in; arrays, AnnData and xarray out."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
import xarray as xr
from anndata import AnnData

from ._errors import InputError
from .config import ModelConfig
from .io.write import atomic_path
from .data import QC_CODES, Registry, SpotArrays, add_label_set, class_counts, encode_adata, setup_anndata
from .linear_path import LinearPath, choose_share, fit_linear_path, subsample
from .loaders import iterate_minibatches, minibatch
from .models.likelihoods import expected_log1p_normalised
from .module import SparthaModule
from .recipe import check_recipe, read_recipe
from .train import (
    TrainConfig, fit, label_sets_summary, monitored, resolve_device, selection_summary, unimaged_summary,
    validation_score,
)

FORMAT_VERSION = 1
LINEAR_PATH_FILE = "linear_path.npz"
LATENTS = ("y", "d", "r", "x")


class SPARTHA:
    """SPARTHA: histology-to-expression with label, batch and artifact latents.

    Parameters
    ----------
    adata
        Training spots: raw counts over all genes in ``X`` (or ``layers[layer]``; sparse CSR
        is the normal case), histology vectors in ``obsm[histology_key]``. Every spot is
        used: a spot without histology (an all-NaN row of ``obsm[histology_key]``, e.g. a
        count-only section) still trains the decoder, priors and classifiers; a spot without
        counts (``counts_key``) still trains the histology path. See
        :func:`spartha_pyro.pp.combine_sections` to build such an AnnData.
    histology_key
        ``obsm`` key of the histology representation ``X_h`` (float, spots × features).
    label_keys
        ``obs`` columns of the biological label sets ``L^k`` (categorical; missing = unlabelled).
        Each gets its own latent ``Z_y^k``. ``"auto"`` (default): one label set derived from
        the training spots' expression by :func:`spartha_pyro.pp.expression_clusters`
        (written to ``adata.obs["spartha_cluster"]``; what was chosen is in
        ``self.auto_labels`` and saved with the model; prediction needs no labels); with
        fewer than 50 spots with counts, no label set. ``[]``: no label set. The prior of a spot whose ``L^k``
        is missing is the mixture of the class priors weighted by the class frequencies
        (not the classifier's posterior).
    batch_key
        ``obs`` column of the batch/slide ``L_d`` (``None``: one batch).
    qc_key
        ``obs`` column of QC pass/fail ``L_r`` (see :func:`spartha_pyro.pp.annotate_qc`).
    layer
        Layer holding raw counts instead of ``X``.
    counts_key
        Boolean ``obs`` column, ``False`` for spots whose counts were not measured (their
        ``X`` rows are ignored); ``None``: every spot has counts.
    gene_mask_key
        ``varm`` key of a bool DataFrame, genes × batches (columns named by the ``batch_key``
        categories): ``False`` where a batch's panel did not measure a gene, e.g. after
        ``combine_sections(..., join="outer")``, which writes ``varm["measured"]``. Those
        genes are left out of the batch's count likelihood (and its proportions are
        renormalised over the measured genes) instead of being read as zeros; the full
        guide's encoder still sees the zero-filled values as input. ``None``: every batch
        measured every gene.
    histology_scaling
        ``"section"`` (default): standardise each section's histology vectors by that
        section's own mean and sd (sections by ``obs[batch_key]``; an AnnData to predict
        without that column is one section), at training and at prediction, so that a new
        slide's stain or scanner shift is removed before encoding; ``"global"``: by the
        training spots' mean and sd. Predict whole sections (at least 20 spots) with
        ``"section"``.
    seed
        Seed of the initial weights (``train(seed=...)`` seeds minibatches and Monte Carlo
        draws): the same seeds give the same fit.
    **config
        Architecture hyperparameters, the fields of :class:`~spartha_pyro.config.ModelConfig`
        (kept in ``self.config``; another name raises :class:`InputError`):

{config}

    Examples
    --------
    >>> adata = sp.datasets.simulate(n_spots=2000, n_genes=1000, seed=0)
    >>> sp.pp.annotate_qc(adata, batch_key="slide")
    >>> model = sp.SPARTHA(adata, label_keys=["cell_type"], batch_key="slide")
    >>> model.train(max_epochs=50)
    >>> pred = model.predict_expression(adata_histology_only, num_samples=20)
    """

    def __init__(
        self,
        adata: AnnData,
        histology_key: str = "histology",
        label_keys: Sequence[str] | str = "auto",
        batch_key: str | None = None,
        qc_key: str | None = "qc_pass",
        layer: str | None = None,
        counts_key: str | None = None,
        gene_mask_key: str | None = None,
        histology_scaling: str = "section",
        seed: int = 0,
        **config,
    ):
        self.config = ModelConfig.from_kwargs(config)
        artifact_latent = self.config.artifact_latent
        auto = isinstance(label_keys, str) and label_keys == "auto"
        if isinstance(label_keys, str) and not auto:
            label_keys = [label_keys]
        if artifact_latent and qc_key is None:
            raise InputError("artifact_latent=True needs qc_key (run sp.pp.annotate_qc first)")
        self._init_seed = seed
        self._setup_args = (
            histology_key, "auto" if auto else list(label_keys), batch_key, qc_key if artifact_latent else None,
            layer, counts_key, gene_mask_key, histology_scaling,
        )
        self._register(adata)
        self.module = self._initial_module()
        self.history: list[dict] = []
        #: what ``train(validation=...)`` chose (epochs, held-out spots, scores); ``None`` before
        self.selection: dict | None = None
        self.device = torch.device("cpu")
        self.is_trained = False
        #: the linear histology path blended into ``predict_mean`` (see ``train(linear_path=)``)
        self.linear_path: LinearPath | None = None

    # ------------------------------------------------------------------ building
    def _register(self, adata: AnnData) -> None:
        """Make ``adata`` the training AnnData: validate it into ``self.registry`` and
        ``self._data`` and, with ``label_keys="auto"``, cluster its spots into a label set."""
        histology_key, label_keys, batch_key, qc_key, layer, counts_key, gene_mask_key, scaling = self._setup_args
        auto = label_keys == "auto"
        self.registry, self._data = setup_anndata(
            adata, histology_key, [] if auto else label_keys, batch_key, qc_key, layer, counts_key, gene_mask_key, scaling,
        )
        self.auto_labels = self._auto_labels(adata, layer, counts_key, self._init_seed) if auto else None
        self.adata = adata

    def _auto_labels(self, adata, layer, counts_key, seed) -> dict | None:
        """``label_keys="auto"`` on validated data: cluster the spots with counts by expression,
        add the label set to the registry and the arrays; returns what was chosen (``None``: too few spots)."""
        from .pp.clusters import expression_clusters

        spots = adata if counts_key is None else adata[adata.obs[counts_key].astype(bool).to_numpy()].copy()
        if spots.n_obs < 50:
            warnings.warn(f"label_keys='auto': only {spots.n_obs} spots with counts, too few to cluster; no label set",
                          stacklevel=3)
            return None
        info = expression_clusters(spots, batch_key=self.registry.batch_key, layer=layer, seed=seed)
        if spots is not adata:
            adata.obs[info["key"]] = spots.obs[info["key"]].reindex(adata.obs_names)
        add_label_set(adata, self.registry, self._data, info["key"])
        return info

    def _initial_module(self) -> SparthaModule:
        """A freshly initialised module, weights seeded by ``seed`` (the global RNG is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._init_seed)
            return self._build_module(self._data.n)

    @pyro.settings.context(module_local_params=True)  # weights stay in the module, out of the user's param store
    def _build_module(self, n_spots: int) -> SparthaModule:
        r, data = self.registry, self._data
        if data is None:  # loaded for prediction only: the saved state restores the class weights and gene mask
            no_codes = np.empty(0, dtype=np.int64)
            labels, batch, qc = np.empty((0, len(r.label_keys)), dtype=np.int64), no_codes, no_codes
            gene_mask = np.ones((len(r.batch_categories), len(r.genes)), bool) if r.gene_mask_key else None
        else:
            labels, batch, qc, gene_mask = data.labels, data.batch, data.qc, data.gene_mask
        return SparthaModule(
            n_spots=n_spots,
            n_genes=len(r.genes),
            histology_dim=r.histology_dim,
            label_class_counts=[class_counts(labels[:, k], len(c)) for k, c in enumerate(r.label_categories)],
            batch_class_counts=class_counts(batch, len(r.batch_categories)),
            qc_class_counts=class_counts(qc, len(QC_CODES)),
            config=self.config,
            gene_mask=torch.from_numpy(gene_mask) if gene_mask is not None else None,
        )

    def __repr__(self) -> str:
        r = self.registry
        kind = "SPARTHA" if self.config.artifact_latent else "SPARTHA(artifact_latent=False) [SpatialDIVA]"
        return (
            f"{kind}: {self._data.n if self._data is not None else 'no training'} spots × {len(r.genes)} genes, histology {r.histology_dim}-d, "
            f"labels {r.label_keys}, batch {r.batch_key!r}, qc {r.qc_key!r}, latents {self.module.model.dims}, "
            f"trained={self.is_trained}"
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        validation: float | Sequence[str] | str | None = "auto",
        patience: int | None = 20,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        jit: bool = False,
        progress: bool = True,
        clip_norm: float = 10.0,
        weight_decay: float = 0.0,
        loader: str = "auto",
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        keep_checkpoints: int = 3,
        resume: bool = False,
        precision: str = "32",
        refit: bool | None = None,
        monitor: str = "pcc",
        min_epochs: int | None = None,
        max_unimaged_share: float = 0.5,
        unimaged: str = "auto",
        label_sets: str = "auto",
        linear_path: str | float | None = "auto",
    ) -> list[dict]:
        """Fit by minibatch SVI (ClippedAdam) on the training AnnData.

        Parameters
        ----------
        max_epochs
            Maximum passes over the training spots (over those with histology when some
            have none; see ``max_unimaged_share``).
        batch_size
            Spots per minibatch.
        lr
            ClippedAdam learning rate.
        validation
            ``"auto"`` (default): the epoch count is chosen on the training data alone —
            with two or more imaged batches, the last of them (in sorted order) is held out
            whole; with one, a spatial block of its spots (the 20 % with the largest first
            ``obsm["spatial"]`` coordinate; a random 20 % without coordinates) — and then the
            model is refit on every spot for that many epochs (``refit``). ``None``: no
            validation, ``max_epochs`` epochs. A fraction of spots held out at random, or a
            list of batch categories (whole slides) held out. ``monitor`` on these spots
            drives early stopping; nothing outside the training AnnData is ever used.
        patience
            Epochs without validation improvement before stopping (best weights restored).
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``…
        seed
            Seeds Python, NumPy, torch, Pyro and the minibatch order.
        jit
            Use ``JitTrace_ELBO`` (full minibatches only; the last partial one is skipped).
        progress
            Show a tqdm bar (epoch, losses, classifier accuracies).
        loader
            ``"auto"``: keep the data on the device when they fit (a quarter of free device
            memory; not for a backed AnnData), else ``"host"``: read minibatches on the host
            (rows of a ``backed="r"`` h5ad are read per minibatch) with a prefetch thread.
            ``"device"`` forces the former. See :func:`spartha_pyro.loaders.make_loader`.
        checkpoint_dir
            Folder of training checkpoints (``ckpt-000012.pt``: epoch 12 done), each written
            atomically, holding the module, optimizer, history, early-stopping and random
            states (see :mod:`spartha_pyro.checkpoint`). ``None``: no checkpoints. Without
            ``resume`` the folder must hold no checkpoints.
        checkpoint_every
            Epochs between checkpoints.
        keep_checkpoints
            Most recent checkpoints kept; older ones are deleted.
        resume
            Continue from the latest complete checkpoint in ``checkpoint_dir`` (start afresh
            when it holds none). Call with the same data, model and training settings
            (``max_epochs`` may change): on CPU the result equals that of a run never
            interrupted.
        precision
            ``"32"`` (default) or ``"bf16"``: the encoders' and decoder's matrix products in
            bfloat16 under ``torch.autocast`` (for GPUs with bfloat16 tensor cores); parameters,
            distribution parameters and every log-density stay float32 (see
            :data:`spartha_pyro.train.PRECISIONS`).
        refit
            With ``validation``: after early stopping, re-initialise the weights and train on
            *every* spot (validation spots included) for the number of epochs that early
            stopping chose. On real data this matters: a validation slide held out of the final
            fit is training data lost (see ``benchmarks/README.md``). Not with checkpoints.
            ``None`` (default): on with ``validation="auto"`` (unless ``checkpoint_dir`` is
            given), off otherwise.
        monitor
            What early stopping watches on the validation spots: ``"pcc"`` (default), the
            mean per-gene PCC of expression predicted from histology alone (see
            :func:`spartha_pyro.train.evaluate_pcc`), or ``"elbo"``, the histology path's
            negative ELBO. The chosen epochs and the validation scores are in
            ``self.selection`` (saved with the model).
        min_epochs
            Early stopping neither stops before this many epochs nor chooses an earlier one;
            ``None`` (default): half of ``max_epochs``. On her2st (train C2 C3 C4, validate C5) the held-out per-gene PCC
            of the histology path dips below zero for the first ~25 epochs and plateaus from
            ~45 on: a patience of 20 alone would stop in the dip.
        max_unimaged_share
            When some training spots have no histology (count-only sections), an epoch is one
            pass over the spots *with* histology and each minibatch holds at most this share of
            the others, drawn afresh each epoch, with the ELBO reweighted per stratum so it
            stays unbiased (:func:`spartha_pyro.loaders.stratified_minibatches`). So adding
            count-only sections keeps the histology path's steps per epoch (what prediction
            uses) and at most doubles an epoch's cost (at 0.5), however many spots they bring.
            ``1.0``: every spot once per epoch.
        unimaged
            Whether training uses the spots without histology (count-only sections): ``"use"``,
            ``"ignore"``, or ``"auto"`` (default): with validation, the validation stage is run
            both ways and they are used only if the histology path then predicts the validation
            spots better (``monitor``); the refit follows that choice, and ``self.selection
            ["unimaged"]`` records both scores (printed). Left out, they leave no trace: the
            model is the one the spots with histology alone would give (batch and label
            categories and ``label_keys="auto"`` clusters re-derived from those spots), and
            ``self.adata`` becomes a copy holding only them. Without validation, or with
            checkpoints, ``"auto"`` uses them. Adding count-only sections is not free: on her2st
            they can lower held-out accuracy (``benchmarks/README.md``).
        label_sets
            With two or more ``label_keys``: ``"auto"`` (default) leaves out, by backward
            elimination on the validation stage, every label set whose absence predicts the
            validation spots at least as well (``monitor``; a tie leaves it out), then refits
            with the rest; ``self.selection["label_sets"]`` records each combination's score
            (printed). A left-out label set leaves no trace (the model is the one built without
            it). Costs one validation stage per label set and round. ``"all"``: keep every one.
        linear_path
            The linear histology path blended into :meth:`predict_mean` (see
            :mod:`spartha_pyro.linear_path`): a ridge probe from the model's standardised
            histology to log1p(counts per 10,000), fit on the spots the final model is trained
            on. ``"auto"`` (default): with validation, its share ``s`` (0, 0.1, …, 1) is the one
            whose blend with the validation-stage model predicts the validation spots best
            (mean per-gene PCC; ``self.selection["linear_path"]`` records every share's score,
            printed); without validation, or with a ``gene_mask_key`` (the probe would read
            unmeasured genes as zeros), no linear path. A float in [0, 1]: that share (refused
            with a ``gene_mask_key``). ``None``: none. The fitted path is ``self.linear_path`` (saved with the model).

        Under ``torch.distributed`` (e.g. ``torchrun`` + ``init_process_group``) every rank
        trains on a disjoint shard of the minibatches with averaged gradients; see
        :mod:`spartha_pyro.distributed` and ``examples/train_ddp.py``.

        Returns
        -------
        The per-epoch history (also in ``self.history``).
        """
        if max_epochs < 1 or batch_size < 1:
            raise InputError("max_epochs and batch_size must be positive")
        if not (linear_path is None or linear_path == "auto"
                or (isinstance(linear_path, numbers.Real) and not isinstance(linear_path, bool) and 0 <= linear_path <= 1)):
            raise InputError(f"linear_path must be 'auto', None or a share in [0, 1], got {linear_path!r}")
        if linear_path not in (None, "auto") and linear_path > 0 and self.registry.gene_mask_key is not None:
            raise InputError("linear_path needs every batch to measure every gene: with gene_mask_key the probe "
                             "would read unmeasured genes as zeros; pass linear_path=None")
        if unimaged not in ("auto", "use", "ignore"):
            raise InputError(f"unimaged must be 'auto', 'use' or 'ignore', got {unimaged!r}")
        if label_sets not in ("auto", "all"):
            raise InputError(f"label_sets must be 'auto' or 'all', got {label_sets!r}")
        if not 0 < max_unimaged_share <= 1:
            raise InputError(f"max_unimaged_share must be in (0, 1], got {max_unimaged_share}")
        if self._data is None:
            raise InputError("this model was loaded without its training AnnData; pass adata to SPARTHA.load to train")
        if resume and checkpoint_dir is None:
            raise InputError("resume=True needs checkpoint_dir")
        if refit is None:
            refit = isinstance(validation, str) and validation == "auto" and checkpoint_dir is None
        if refit and (validation is None or checkpoint_dir is not None):
            raise InputError("refit=True needs validation (to choose the epoch count) and no checkpoint_dir")
        train_idx, val_idx = self._split(validation, seed)
        self.device = resolve_device(device)
        config = TrainConfig(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, patience=patience, seed=seed, progress=progress,
            clip_norm=clip_norm, weight_decay=weight_decay,
            check_finite_every=1 if self.device.type == "cpu" else 50, loader=loader,
            # on a GPU, Pyro's distribution checks are host syncs at every site; inputs were validated
            validate=None if self.device.type == "cpu" else False,
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, resume=resume, precision=precision, monitor=monitor,
            min_epochs=max_epochs // 2 if min_epochs is None else min_epochs, max_unimaged_share=max_unimaged_share,
        )
        imaged = np.asarray(self._data.has_histology, dtype=bool)
        n_unimaged = int((~imaged[train_idx]).sum())
        options = ["use"]  # "ignore" first when both run: a tie keeps the simpler training set
        if n_unimaged and unimaged == "ignore":
            options = ["ignore"]
        elif n_unimaged and unimaged == "auto" and val_idx is not None and checkpoint_dir is None:
            options = ["ignore", "use"]
        worlds = {"use": self._world(train_idx=train_idx, val_idx=val_idx)}
        if "ignore" in options:
            try:
                worlds["ignore"] = self._world(imaged, train_idx=train_idx, val_idx=val_idx)
            except InputError as err:
                if unimaged == "ignore":
                    raise InputError(f"unimaged='ignore': the spots with histology alone cannot be trained on: {err}") from None
                warnings.warn(f"unimaged='auto': the spots without histology are used, those with it alone "
                              f"cannot be trained on: {err}", stacklevel=2)
                options = ["use"]
        stage = lambda world, fresh: self._validation_stage(world, config, jit, refit, fresh)
        score = lambda run: monitored(run[1][run[2]["epochs"] - 1], monitor) if run[2] else 0.0  # lower is better
        runs = {o: stage(worlds[o], k > 0 or o == "ignore") for k, o in enumerate(options)}
        choice = min(options, key=lambda o: score(runs[o]))  # a tie: the first
        world, best = worlds[choice], runs[choice]
        history = best[1] if len(options) == 1 else [{**h, "unimaged": o} for o in options for h in runs[o][1]]
        given = [] if world["setup"][1] == "auto" else list(world["registry"].label_keys)
        keys, label_scores = given, None
        if label_sets == "auto" and len(given) >= 2 and val_idx is not None and checkpoint_dir is None:
            label_scores = {"+".join(keys): validation_score(best[2], monitor)}
            while len(keys) >= 2:  # backward elimination: leave out the label set whose absence validates best
                tried = {}
                for key in keys:
                    fewer = [k for k in keys if k != key]
                    candidate = self._world(labels=fewer, base=world)
                    tried["+".join(fewer)] = (candidate, fewer, stage(candidate, True))
                label_scores.update({name: validation_score(run[2], monitor) for name, (_, _, run) in tried.items()})
                history = history + [{**h, "label_sets": name} for name, (_, _, run) in tried.items() for h in run[1]]
                drop = min(tried, key=lambda name: score(tried[name][2]))
                if score(tried[drop][2]) > score(best):  # a tie: fewer label sets
                    break
                world, keys, best = tried[drop]
        self._set_world(world)
        self.module = best[0]
        if val_idx is not None:
            self.selection = best[2]
        if n_unimaged and val_idx is not None:
            self.selection["unimaged"] = unimaged_summary(runs, choice, n_unimaged, monitor, unimaged)
            self.selection["message"] += "; " + self.selection["unimaged"]["message"]
        if label_scores is not None:
            self.selection["label_sets"] = label_sets_summary(given, keys, label_scores, monitor)
            self.selection["message"] += "; " + self.selection["label_sets"]["message"]
        share = linear_path
        if linear_path == "auto":
            share = None
            if val_idx is not None and world["registry"].gene_mask_key is None:
                share, summary = self._choose_linear_share(world, seed)
                self.selection["linear_path"] = summary
                self.selection["message"] += "; " + summary["message"]
        if val_idx is not None and progress:
            print(self.selection["message"])
        if refit:
            self.module = self._initial_module()
            self.module.configure(n_spots=self._data.n, jit=False)
            config.max_epochs, config.patience = self.selection["epochs"], None
            history = [{**h, "stage": "validation"} for h in history]
            history += [
                {**h, "stage": "refit"}
                for h in fit(self.module, self._data, np.arange(self._data.n), None, config, self.device, jit=jit)
            ]
        self.linear_path = None
        if share:  # fit on the spots the final model was trained on
            final = np.arange(self._data.n) if refit or val_idx is None else world["train_idx"]
            self.linear_path = self._fit_linear_path(final, float(share), seed)
            if linear_path == "auto":
                self.linear_path.scores = {float(k): v for k, v in self.selection["linear_path"]["scores"].items()}
        self.history += history
        self.is_trained = True
        return self.history

    def _fit_linear_path(self, idx: np.ndarray, share: float, seed: int) -> LinearPath:
        """The ridge probe fit on the training spots ``idx`` that have counts and histology."""
        data = self._data
        idx = subsample(idx[data.has_counts[idx] & data.has_histology[idx]], len(self.registry.genes), seed)
        if len(idx) < 2:
            raise InputError("linear_path needs at least two training spots with counts and histology")
        return fit_linear_path(data.x_h[idx], data.counts[idx], data.batch[idx], share, seed)

    def _choose_linear_share(self, world: dict, seed: int) -> tuple[float, dict]:
        """Choose the linear share on the validation spots of ``world``, with ``self.module``
        (the validation-stage model) and a probe fit on the world's training spots:
        ``(share, summary)``."""
        from .metrics.normalize import normalize_log1p  # lazy: the metrics package loads scanpy and the image stack

        data, val = self._data, world["val_idx"]
        val = subsample(val[data.has_counts[val] & data.has_histology[val]], len(self.registry.genes), seed)
        path = self._fit_linear_path(world["train_idx"], 0.0, seed)
        spots = dataclasses.replace(
            data, obs_names=data.obs_names[val], counts=None, count_mask=None, x_h=data.x_h[val],
            has_histology=data.has_histology[val], labels=data.labels[val], batch=data.batch[val], qc=data.qc[val],
        )
        model_pred = self._model_mean(spots, 100, "posterior", "expected", 256, seed, 25)
        observed = normalize_log1p(data.counts[val])
        share, scores = choose_share(model_pred, path.predict(spots.x_h), observed)
        message = (f"linear histology path: share {share:g} (per-gene PCC of predict_mean on the validation spots "
                   f"{scores[share]:.4f}; model alone {scores[0.0]:.4f}, probe alone {scores[1.0]:.4f})")
        return share, {"share": share, "scores": {str(k): v for k, v in scores.items()}, "message": message}

    def _validation_stage(self, world: dict, config: TrainConfig, jit: bool, refit: bool, fresh: bool) -> tuple:
        """Train in ``world`` (see :meth:`_world`) on its training spots, early-stopped on its
        validation spots: ``(module, history, selection_summary or None)``; ``fresh``: from new
        weights, else from the current ones. ``self`` is left as it was."""
        kept = self._world(), self.module
        try:
            self._set_world(world)
            if fresh:
                self.module = self._initial_module()
            self.module.configure(n_spots=len(world["train_idx"]), jit=False)
            history = fit(self.module, self._data, world["train_idx"], world["val_idx"], config, self.device, jit=jit)
            summary = (selection_summary(history, config.monitor, self._held_out, refit, config.min_epochs)
                       if world["val_idx"] is not None else None)
            return self.module, history, summary
        finally:
            self._set_world(kept[0])
            self.module = kept[1]

    def _world(self, keep: np.ndarray | None = None, labels: list[str] | None = None, base: dict | None = None,
               train_idx: np.ndarray | None = None, val_idx: np.ndarray | None = None) -> dict:
        """What a model is trained on: the training AnnData, its registry and arrays, the
        automatic labels, the setup arguments and the training/validation spots. From ``base``
        (default: the current one), a copy restricted to the spots in the bool mask ``keep``
        (``unimaged="ignore"``: the model those spots alone would give, categories, class counts
        and automatic labels re-derived from them, indices remapped) or with only the label sets
        ``labels``. ``self`` is left as it was."""
        now = {"adata": self.adata, "registry": self.registry, "data": self._data, "auto_labels": self.auto_labels,
               "setup": self._setup_args, "train_idx": train_idx, "val_idx": val_idx}
        base = now if base is None else base
        if keep is None and labels is None:
            return dict(base)
        try:
            self._set_world(base)
            if labels is not None:
                self._setup_args = (self._setup_args[0], list(labels), *self._setup_args[2:])
            if keep is None:
                self._register(self.adata)
                return {**self._world(), "train_idx": base["train_idx"], "val_idx": base["val_idx"]}
            position = np.cumsum(keep) - 1
            remap = lambda idx: None if idx is None else position[idx[keep[idx]]]
            self._register(self.adata[keep].copy())
            return {**self._world(), "train_idx": remap(base["train_idx"]), "val_idx": remap(base["val_idx"])}
        finally:
            self._set_world(now)

    def _set_world(self, world: dict) -> None:
        self.adata, self.registry, self._data = world["adata"], world["registry"], world["data"]
        self.auto_labels, self._setup_args = world["auto_labels"], world["setup"]

    def _split(self, validation, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        n = self._data.n
        self._held_out = None
        if validation is None:
            return np.arange(n), None
        if isinstance(validation, str):
            if validation != "auto":
                raise InputError(f"validation must be 'auto', None, a fraction or a list of batches, got {validation!r}")
            return self._auto_split(seed)
        if isinstance(validation, float):
            if not 0.0 < validation < 1.0:
                raise InputError(f"validation fraction must be in (0, 1), got {validation}")
            perm = np.random.default_rng(seed).permutation(n)
            n_val = max(1, int(round(validation * n)))
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
        key = self.registry.batch_key
        if key is None:
            raise InputError("validation by batch needs batch_key")
        held = [str(v) for v in validation]
        unknown = sorted(set(held) - set(self.registry.batch_categories))
        if unknown:
            raise InputError(f"validation batches {unknown} are not in obs[{key!r}]")
        is_val = self.adata.obs[key].astype(str).isin(held).to_numpy()
        if is_val.all():
            raise InputError("validation holds out every spot")
        self._held_out = f"batches {held}"
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def _auto_split(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``validation="auto"``: the last imaged batch with counts, or a spatial block of one batch."""
        data, key = self._data, self.registry.batch_key
        usable = data.has_counts & data.has_histology
        if key is not None:
            batches = self.adata.obs[key].astype(str).to_numpy()
            imaged = sorted(set(batches[usable]))
            if len(imaged) >= 2:
                return self._split([imaged[-1]], seed)
        n = data.n
        candidates = np.flatnonzero(usable)
        n_val = max(1, int(round(0.2 * len(candidates))))
        if "spatial" in self.adata.obsm:
            x = np.asarray(self.adata.obsm["spatial"], dtype=float)[candidates, 0]
            val = np.sort(candidates[np.argsort(x, kind="stable")[-n_val:]])
            self._held_out = f"the spatial block of {n_val} spots with the largest obsm['spatial'] x"
        else:
            val = np.sort(np.random.default_rng(seed).choice(candidates, n_val, replace=False))
            self._held_out = f"a random {n_val} of the imaged spots"
        if n_val >= len(candidates):
            raise InputError("validation='auto' needs at least two imaged spots with counts; pass validation=None")
        return np.setdiff1d(np.arange(n), val), val

    # ------------------------------------------------------------------ inference
    @property
    def dispersion(self) -> np.ndarray:
        """NB inverse dispersion ``theta = exp(log_theta)`` per gene, float64 ``(n_genes,)``.

        Count variance given the NB mean ``mu`` is ``mu + mu^2 / theta``. With the NB means
        of :meth:`predict_expression` (``value="mean"``) it gives the predictive density
        (:func:`spartha_pyro.metrics.nll`). ZINB models raise: their predictive also needs
        the zero-inflation gate per draw, which the model does not expose.
        """
        if self.config.likelihood != "nb":
            raise InputError("dispersion (and the NB predictive density) is defined for likelihood='nb' only")
        return self.module.model.log_theta.detach().double().exp().cpu().numpy()

    def _encode(self, adata: AnnData | None) -> SpotArrays:
        if adata is None and self._data is None:
            raise InputError("this model was loaded without its training AnnData: pass adata")
        if adata is not None and adata.n_obs == 0:
            raise InputError("adata has 0 spots")
        if adata is not None:
            check_recipe(self.registry.histology_recipe, read_recipe(adata, self.registry.histology_key))
        return self._data if adata is None else encode_adata(adata, self.registry)

    @pyro.settings.context(module_local_params=True)  # weights stay in the module, out of the user's param store
    @torch.no_grad()
    def get_latent(
        self,
        adata: AnnData | None = None,
        latent: str = "y",
        label_key: str | None = None,
        encoder: str = "auto",
        batch_size: int = 1024,
        key_added: str | None = None,
    ) -> np.ndarray:
        """Posterior means of a latent, also written to ``adata.obsm``.

        Parameters
        ----------
        adata
            Spots to embed (default: the training AnnData).
        latent
            ``"y"`` (all ``Z_y^k`` concatenated, or one with ``label_key``), ``"d"``, ``"r"``, ``"x"``.
        encoder
            ``"full"`` (counts + histology), ``"histology"`` (histology only), or ``"auto"``:
            full when ``adata`` has counts.
        key_added
            ``obsm`` key (default ``f"X_spartha_{latent}"``).

        Returns
        -------
        ``(n_spots, latent width)`` float32 array.
        """
        sites = self._latent_sites(latent, label_key)
        adata_out = self.adata if adata is None else adata
        data = self._encode(adata)
        if encoder == "auto":
            encoder = "full" if data.counts is not None else "histology"
        if encoder not in ("full", "histology"):
            raise InputError(f"encoder must be 'auto', 'full' or 'histology', got {encoder!r}")
        if encoder == "full" and data.counts is None:
            raise InputError("encoder='full' needs counts; this AnnData has none")
        module = self.module.to(self.device).eval()
        out = []
        for b in iterate_minibatches(data.n, batch_size, None, False):
            batch = minibatch(data, b, self.device, len(self.registry.genes))
            out.append(module.latent_means(batch, sites, encoder).cpu().numpy())
        z = np.concatenate(out)
        adata_out.obsm[key_added or f"X_spartha_{latent}" + (f"_{label_key}" if label_key else "")] = z
        return z

    def _latent_sites(self, latent: str, label_key: str | None) -> list[str]:
        dims = self.module.model.dims
        if latent not in LATENTS:
            raise InputError(f"latent must be one of {LATENTS}, got {latent!r}")
        if latent == "y":
            keys = self.registry.label_keys
            if label_key is not None:
                if label_key not in keys:
                    raise InputError(f"label_key {label_key!r} is not one of the model's label keys {keys}")
                return [f"z_y{keys.index(label_key)}"]
            if not keys:
                raise InputError("this model has no label sets, hence no Z_y; use latent='x'")
            return [f"z_y{k}" for k in range(len(keys))]
        site = f"z_{latent}"
        if site not in dims:
            raise InputError(f"this model has no {site} (artifact_latent/x_dim settings)")
        return [site]

    @pyro.settings.context(module_local_params=True)  # weights stay in the module, out of the user's param store
    @torch.no_grad()
    def predict_expression(
        self,
        adata: AnnData,
        num_samples: int = 20,
        artifact: str = "pass",
        value: str = "counts",
        batch_size: int = 256,
        seed: int = 0,
        out: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> xr.DataArray:
        """Generate expression for spots from their histology alone (posterior predictive).

        Latents are drawn from the histology-only guide ``q(Z | X_h)``; with
        ``artifact="pass"`` the artifact latent is drawn instead from its prior given a
        passing spot, ``p(Z_r | L_r = pass)`` (artifact-free generation); with
        ``"posterior"`` from ``q(Z_r | X_h)``. The library size is drawn from
        ``p(log l | Z)`` and counts from the NB (or ZINB).

        Parameters
        ----------
        adata
            Spots with ``obsm[histology_key]``; counts are not needed (``n_vars`` may be 0).
            When both the model and ``adata.uns[histology_key]`` know their feature recipe
            (:mod:`spartha_pyro.recipe`), a different recipe raises :class:`InputError`.
        num_samples
            Posterior predictive draws per spot.
        artifact
            ``"pass"`` or ``"posterior"`` (SpatialDIVA models accept only ``"posterior"``
            semantics: they have no ``Z_r``).
        value
            ``"counts"`` (sampled counts, int32) or ``"mean"`` (NB mean ``mu``, float32,
            expected counts given the sampled latents and library).
        seed
            Seed of Pyro's RNG: same seed, same draws.
        out
            A NetCDF path (``.nc``): stream the draws there minibatch by minibatch instead of
            holding ``num_samples × spots × genes`` in memory (peak memory
            ``num_samples × batch_size × genes``). Written under a temporary name in the
            same folder, then renamed; the returned array reads lazily from the file.
        overwrite
            Replace an existing ``out`` file (otherwise ``FileExistsError``).

        Returns
        -------
        ``xarray.DataArray`` with dims ``("sample", "spot", "gene")``, coords from
        ``adata.obs_names`` and the training genes (file-backed when ``out`` is given).
        """
        if value not in _DRAWS:
            raise InputError(f"value must be 'counts' or 'mean', got {value!r}")
        _check_draw_request(num_samples, out, overwrite)
        data = self._encode_histology(adata, artifact)
        coords = {"sample": np.arange(num_samples), "spot": np.asarray(adata.obs_names), "gene": self.registry.genes}
        attrs = {"artifact": artifact, "value": value, "seed": seed, "model": repr(self)}
        with contextlib.ExitStack() as stack:
            sink = (np.empty((num_samples, data.n, len(self.registry.genes)), dtype=_DRAWS[value][1]) if out is None
                    else stack.enter_context(self._draws_to_netcdf(out, coords, value, attrs)))
            for b, draws in self._draw_blocks(data, num_samples, artifact, value, batch_size, seed):
                sink[:, b] = draws
        if out is not None:
            return xr.open_dataarray(out)
        return xr.DataArray(sink, dims=("sample", "spot", "gene"), coords=coords, name=_DRAWS[value][2], attrs=attrs)

    @pyro.settings.context(module_local_params=True)
    @torch.no_grad()
    def predict_summary(
        self,
        adata: AnnData,
        num_samples: int = 20,
        artifact: str = "pass",
        quantiles: Sequence[float] = (0.05, 0.5, 0.95),
        batch_size: int = 256,
        seed: int = 0,
        out: str | os.PathLike | None = None,
        overwrite: bool = False,
        linear_path: bool = True,
    ) -> AnnData:
        """Point prediction and posterior-predictive summaries of spots, from histology alone.

        ``X`` is :meth:`predict_mean` (count noise integrated out; blended with the linear
        path for ``artifact="posterior"`` unless ``linear_path=False``); the layers summarise
        ``num_samples`` count draws per spot (:func:`~spartha_pyro.predictions.summarize_samples`):
        ``draws_mean``, ``sd``, one per quantile and ``counts_mean``. The draws are exactly
        those of :meth:`predict_expression` with the same ``seed`` and ``batch_size``, made and
        summarised one minibatch at a time: the draws take ``num_samples × batch_size × genes``
        whatever the number of spots (the output, ``(4 + len(quantiles)) × spots × genes``
        float32, comes on top), and the histology of every spot is scaled together
        (per section), so the result does not depend on ``batch_size`` beyond the draws.

        Parameters
        ----------
        adata
            Spots with ``obsm[histology_key]`` (whole sections, as for :meth:`predict_mean`).
        num_samples, artifact, batch_size, seed
            As in :meth:`predict_expression`.
        quantiles
            Quantiles in ``[0, 1]`` of log1p(counts per 10,000) to store.
        out, overwrite
            Also stream every draw to this NetCDF file, as :meth:`predict_expression` does.
        linear_path
            As in :meth:`predict_mean`.

        Returns
        -------
        AnnData, ``adata``'s spots (its ``obs``) × the model's genes, float32;
        ``uns["prediction"]`` records the settings and ``uns["linear_share"]`` the blend.
        """
        from .predictions import summarize_samples  # lazy: pulls in metrics (scanpy)

        _check_draw_request(num_samples, out, overwrite)
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise InputError(f"quantiles must be in [0, 1], got {tuple(quantiles)}")
        data = self._encode_histology(adata, artifact)
        point, share = self._point_prediction(data, num_samples, artifact, "expected", batch_size, seed, 25, linear_path)
        spots = np.asarray(adata.obs_names)
        coords = {"sample": np.arange(num_samples), "spot": spots, "gene": self.registry.genes}
        attrs = {"artifact": artifact, "value": "counts", "seed": seed, "model": repr(self)}
        layers: dict[str, np.ndarray] = {}
        with contextlib.ExitStack() as stack:
            sink = None if out is None else stack.enter_context(self._draws_to_netcdf(out, coords, "counts", attrs))
            for b, draws in self._draw_blocks(data, num_samples, artifact, "counts", batch_size, seed):
                if sink is not None:
                    sink[:, b] = draws
                part = summarize_samples(xr.DataArray(draws, dims=("sample", "spot", "gene"),
                                                      coords={"spot": spots[b], "gene": self.registry.genes},
                                                      attrs=attrs), quantiles=quantiles)
                for name, values in {"draws_mean": part.X, **part.layers}.items():
                    if name not in layers:
                        layers[name] = np.empty((data.n, values.shape[1]), np.float32)
                    layers[name][b] = values
        summary = AnnData(X=point, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(self.registry.genes)),
                          layers=layers)
        summary.uns["prediction"] = {**part.uns["prediction"], "num_samples": int(num_samples), "seed": int(seed),
                                     "batch_size": int(batch_size), "X": "predictive mean, count noise integrated out"}
        summary.uns["linear_share"] = float(share)
        return summary

    def _draw_blocks(self, data: SpotArrays, num_samples: int, artifact: str, value: str, batch_size: int, seed: int):
        """Yield ``(slice of spots, draws (num_samples, spots, G))`` minibatch by minibatch:
        counts (int32) or NB means (float32), as :meth:`predict_expression` returns them."""
        site, dtype, _ = _DRAWS[value]
        for b, draws in self._draws(data, num_samples, artifact, [site], batch_size, seed, num_samples):
            yield slice(b[0], b[-1] + 1), draws[site].cpu().numpy().astype(dtype)

    @staticmethod
    @contextlib.contextmanager
    def _draws_to_netcdf(out: str | os.PathLike, coords: Mapping[str, Sequence], value: str, attrs: Mapping):
        """A ``(sample, spot, gene)`` NetCDF variable to write draws into, at ``out`` once complete."""
        _, dtype, name = _DRAWS[value]
        with atomic_path(out) as tmp, _netcdf_variable(tmp, name, dtype, coords, attrs) as sink:
            yield sink

    def _encode_histology(self, adata: AnnData, artifact: str) -> SpotArrays:
        """Arrays of spots to predict from histology alone (checked: every spot has histology)."""
        if artifact not in ("pass", "posterior"):
            raise InputError(f"artifact must be 'pass' or 'posterior', got {artifact!r}")
        if adata.n_obs == 0:
            raise InputError("adata has 0 spots: nothing to predict")
        key = self.registry.histology_key
        if key not in adata.obsm:
            raise InputError(f"prediction needs histology in adata.obsm[{key!r}]")
        check_recipe(self.registry.histology_recipe, read_recipe(adata, key))
        obs = adata.obs[[self.registry.batch_key]] if self.registry.batch_key in adata.obs else adata.obs[[]]
        data = encode_adata(AnnData(obs=obs, obsm={key: adata.obsm[key]}), self.registry)
        if not data.has_histology.all():
            raise InputError(
                f"spots without histology (all-NaN rows in obsm[{key!r}]) cannot be predicted from histology"
            )
        return data

    def _draws(self, data: SpotArrays, num_samples: int, artifact: str, sites: Sequence[str], batch_size: int,
               seed: int, chunk: int):
        """Yield ``(spot indices b, {site: draws (s, len(b), G)})`` of model ``sites`` from
        ``q(Z | X_h)``, ``chunk`` draws at a time (see :meth:`predict_expression` for ``artifact``)."""
        module = self.module.to(self.device).eval()
        pyro.set_rng_seed(seed)
        n_genes = len(self.registry.genes)
        for b in iterate_minibatches(data.n, batch_size, None, False):
            batch = minibatch(data, b, self.device, n_genes)
            for start in range(0, num_samples, chunk):
                s = min(chunk, num_samples - start)
                draws = module.posterior_predictive(batch, s, sites, artifact_free=artifact == "pass")
                yield b, {site: draws[site].reshape(s, len(b), n_genes) for site in sites}

    @pyro.settings.context(module_local_params=True)  # weights stay in the module, out of the user's param store
    @torch.no_grad()
    def predict_mean(
        self,
        adata: AnnData,
        num_samples: int = 100,
        artifact: str = "posterior",
        counts: str = "expected",
        batch_size: int = 256,
        seed: int = 0,
        chunk: int = 25,
        linear_path: bool = True,
    ) -> xr.DataArray:
        """Point prediction from histology alone: the posterior-predictive mean of
        ``log1p(counts per 10,000)``, the space the field's metrics score, blended with the
        model's linear histology path when it has one (:mod:`spartha_pyro.linear_path`).

        Averaged over ``num_samples`` draws of the latents and library from ``q(Z | X_h)``
        (see :meth:`predict_expression`), ``chunk`` draws at a time, so memory is
        ``chunk × batch_size × genes`` whatever the number of draws. Not the log of the
        predicted mean: for sparse genes the two differ, and only this one is what a
        measured spot's log-normalised value is expected to be.

        Parameters
        ----------
        adata
            Spots with ``obsm[histology_key]`` (whole sections when the model scales
            histology per section).
        num_samples
            Draws of the latents and library averaged (Monte Carlo error falls as
            ``1/sqrt(num_samples)``).
        artifact
            ``"posterior"`` (default): the artifact latent from ``q(Z_r | X_h)``, the
            prediction of a *measured* spot, artifacts included; score it against measured
            counts. ``"pass"``: artifact-free expression, to be scored against clean truth.
        counts
            ``"expected"`` (default): the NB (ZINB) count noise is integrated out exactly
            given each draw (:func:`~spartha_pyro.models.expected_log1p_normalised`, the
            spot's total taken as its expected library), which removes the count noise
            from the Monte Carlo error. ``"sampled"``: counts are drawn and normalised by
            their realised total.
        batch_size, seed, chunk
            Spots per minibatch, seed of the draws, draws per chunk.
        linear_path
            With ``artifact="posterior"`` and a model trained with a linear path
            (``self.linear_path``, see :meth:`train`): ``(1 - s) * model + s * probe``, ``s``
            the share chosen on the validation spots (or given to :meth:`train`), with either
            ``counts``; ``s = 1`` is the probe alone. ``False``, ``artifact="pass"`` (the
            probe learned measured, artifact-laden spots) or no linear path: the model's own
            prediction. The share used is in ``attrs["linear_share"]``.

        Returns
        -------
        ``xarray.DataArray`` ``(spot, gene)`` float32.
        """
        if num_samples < 1 or chunk < 1:
            raise InputError("num_samples and chunk must be positive")
        if counts not in ("expected", "sampled"):
            raise InputError(f"counts must be 'expected' or 'sampled', got {counts!r}")
        data = self._encode_histology(adata, artifact)
        out, share = self._point_prediction(data, num_samples, artifact, counts, batch_size, seed, chunk, linear_path)
        return xr.DataArray(
            out, dims=("spot", "gene"), coords={"spot": np.asarray(adata.obs_names), "gene": self.registry.genes},
            name="log1p_normalised",
            attrs={"artifact": artifact, "counts": counts, "num_samples": num_samples, "seed": seed,
                   "linear_share": share},
        )

    def _point_prediction(self, data: SpotArrays, num_samples: int, artifact: str, counts: str, batch_size: int,
                          seed: int, chunk: int, linear_path: bool) -> tuple[np.ndarray, float]:
        """:meth:`predict_mean` for encoded spots: ``(prediction float32 (n, G), linear share used)``."""
        out = self._model_mean(data, num_samples, artifact, counts, batch_size, seed, chunk)
        if linear_path and artifact == "posterior" and self.linear_path is not None:
            return self.linear_path.blend(out, data.x_h), self.linear_path.share
        return out, 0.0

    @pyro.settings.context(module_local_params=True)
    @torch.no_grad()
    def _model_mean(self, data: SpotArrays, num_samples: int, artifact: str, counts: str, batch_size: int, seed: int,
                    chunk: int) -> np.ndarray:
        """The model's own part of :meth:`predict_mean` for encoded spots, float32 ``(n, G)``."""
        zinb = self.config.likelihood == "zinb"
        sites = ["x_t"] if counts == "sampled" else ["mu", "zi_logits"] if zinb else ["mu"]
        theta = self.module.model.log_theta.detach().to(self.device).exp()
        out = np.zeros((data.n, len(self.registry.genes)), np.float32)
        for b, draws in self._draws(data, num_samples, artifact, sites, batch_size, seed, chunk):
            if counts == "sampled":
                x = draws["x_t"].float()
                norm = torch.log1p(1e4 * x / x.sum(-1, keepdim=True).clamp(min=1.0))
            else:
                norm = expected_log1p_normalised(draws["mu"].float(), theta, draws.get("zi_logits"))
            out[b[0] : b[-1] + 1] += norm.sum(0).cpu().numpy() / num_samples
        return out

    def export_posterior(
        self,
        adata: AnnData,
        num_samples: int = 50,
        quantiles: Sequence[float] = (0.05, 0.5, 0.95),
        artifact: str = "pass",
        key: str = "spartha",
        seed: int = 0,
        batch_size: int = 256,
    ) -> AnnData:
        """Write posterior-predictive summaries of generated expression into ``adata.layers``.

        Draws counts with :meth:`predict_expression` (histology only) and summarises them with
        :func:`spartha_pyro.predictions.summarize_samples`. Layers (spots × ``adata``'s genes,
        float32; genes the model does not know are NaN):

        - ``{key}_mean``: the point prediction, :meth:`predict_mean` (count noise integrated
          out; with ``artifact="posterior"``, blended with the linear histology path);
        - ``{key}_draws_mean``, ``{key}_sd``, ``{key}_q05`` … (one per quantile, see
          :func:`~spartha_pyro.predictions.quantile_layer`): mean, sd and quantiles of the
          draws' log1p(counts per 10,000) — the space of the point metrics, normalised over
          all modelled genes;
        - ``{key}_counts_mean``: mean of the sampled counts;
        - ``{key}_cv``: coefficient of variation sd / mean of the sampled counts (count noise
          included; NaN where the mean is 0).

        ``adata.uns[key]`` records the settings. For spots without counts or genes (a
        histology-only AnnData has no gene axis to hold layers), or too many spots to hold
        every draw in memory, use :meth:`predict_summary`, which returns a new AnnData.

        Parameters
        ----------
        adata
            Spots with ``obsm[histology_key]`` and at least one modelled gene in ``var_names``.
        num_samples
            Posterior-predictive draws per spot.
        quantiles
            Quantiles in ``[0, 1]`` to store.
        artifact
            ``"pass"`` (artifact-free generation) or ``"posterior"``, as in :meth:`predict_expression`.
        key
            Prefix of the layer names and the ``uns`` key.
        seed, batch_size
            As in :meth:`predict_expression`.

        Returns
        -------
        ``adata``, with the layers added.
        """
        genes = pd.Index(self.registry.genes)
        cols = genes.get_indexer(adata.var_names)
        known = cols >= 0
        if not known.any():
            raise InputError(
                "adata has none of the model's genes in var_names; use model.predict_summary(adata) instead"
            )
        samples = self.predict_expression(adata, num_samples, artifact=artifact, seed=seed, batch_size=batch_size)
        from .predictions import summarize_samples  # lazy: pulls in metrics (scanpy)

        summary = summarize_samples(samples, quantiles=quantiles)
        counts = samples.values
        counts_sd = counts.std(0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cv = np.where(summary.layers["counts_mean"] > 0, counts_sd / summary.layers["counts_mean"], np.nan)
        point = self.predict_mean(adata, num_samples, artifact, batch_size=batch_size, seed=seed)
        layers = {"mean": point.values, "draws_mean": summary.X, **summary.layers, "cv": cv}
        for name, values in layers.items():
            out = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            out[:, known] = values[:, cols[known]]
            adata.layers[f"{key}_{name}"] = out
        adata.uns[key] = {**summary.uns["prediction"], "cv": "sd / mean of sampled counts",
                          "linear_share": float(point.attrs["linear_share"]), "layers": [f"{key}_{n}" for n in layers]}
        return adata

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``path/model.pt`` (weights), ``path/settings.json`` (registry, settings, version)
        and, when the model has a linear path, ``path/linear_path.npz`` (the probe's arrays).

        Each file is written under a temporary name in the same folder, then renamed.
        """
        path = Path(path)
        if (path / "model.pt").exists() and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True")
        path.mkdir(parents=True, exist_ok=True)
        from . import __version__

        settings = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "registry": self.registry.to_dict(),
            "init_kwargs": self.config.to_dict(),
            "n_train_spots": self.module.model.n_spots,
            "seed": self._init_seed,
            "is_trained": self.is_trained,
            "history": self.history,
            "selection": self.selection,
            "linear_path": None if self.linear_path is None else self.linear_path.summary(),
            "auto_labels": self.auto_labels,
        }
        with atomic_path(path / "model.pt") as tmp:
            torch.save(self.module.state_dict(), tmp)
        if self.linear_path is not None:  # before settings.json, which names it
            with atomic_path(path / LINEAR_PATH_FILE) as tmp:
                self.linear_path.save(tmp)
        with atomic_path(path / "settings.json") as tmp:
            tmp.write_text(json.dumps(settings, indent=1))
        if self.linear_path is None:  # after settings.json no longer names it
            (path / LINEAR_PATH_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | os.PathLike, adata: AnnData | None = None, device: str | torch.device | None = "cpu") -> "SPARTHA":
        """Load a saved model.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        adata
            Training spots holding the training genes (order may differ): needed to train
            further or to embed them with ``get_latent()``. ``None`` loads for prediction
            only: :meth:`predict_expression` and ``get_latent(new_adata)`` work.
        device
            Device of later inference (``"auto"``, ``"cpu"``, ``"cuda"``…).

        Returns
        -------
        The loaded model.
        """
        path = Path(path)
        try:
            settings = json.loads((path / "settings.json").read_text())
        except FileNotFoundError:
            raise InputError(f"{path / 'settings.json'} does not exist: not a saved SPARTHA model") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path / 'settings.json'} is corrupt: {err}") from None
        if not isinstance(settings, dict):
            raise InputError(f"{path / 'settings.json'} is corrupt: not a JSON object")
        if settings.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(
                f"{path / 'settings.json'} has format {settings['format_version']} (library "
                f"{settings.get('library_version')}); this library reads <= {FORMAT_VERSION}: upgrade spartha-pyro"
            )
        self = cls.__new__(cls)
        try:
            self.registry, self.config = Registry(**settings["registry"]), ModelConfig.from_kwargs(settings["init_kwargs"])
            n_train_spots = settings["n_train_spots"]
            self._init_seed = settings.get("seed", 0)
            self._data = None
            self.module = self._build_module(n_train_spots)
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"{path / 'settings.json'} is corrupt: {type(err).__name__}: {err}") from None
        try:
            state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            self.module.load_state_dict(state)
        except FileNotFoundError:
            raise InputError(f"{path / 'model.pt'} does not exist: not a saved SPARTHA model") from None
        except Exception as err:  # torch raises several types for truncated/corrupt/mismatched files
            raise InputError(f"{path / 'model.pt'} cannot be read (truncated, corrupt or not this model's): {err}") from None
        r = self.registry
        # training further treats every saved label set, automatic ones included, as a given column
        self._setup_args = (r.histology_key, list(r.label_keys), r.batch_key, r.qc_key, r.layer, r.counts_key,
                            r.gene_mask_key, r.histology_scaling)
        self.adata = adata
        self._data = encode_adata(adata, self.registry, require_counts=True) if adata is not None else None
        self.module.eval()
        self.history = settings.get("history", [])
        self.selection = settings.get("selection")
        self.linear_path = None
        if settings.get("linear_path") is not None:
            try:
                self.linear_path = LinearPath.load(path / LINEAR_PATH_FILE, settings["linear_path"])
                self.linear_path.check_shape(self.registry.histology_dim, len(self.registry.genes))
            except (OSError, EOFError, zipfile.BadZipFile, KeyError, TypeError, ValueError) as err:
                raise InputError(f"{path / LINEAR_PATH_FILE} (the model's linear path) cannot be read: {err}") from None
        self.auto_labels = settings.get("auto_labels")
        self.is_trained = settings.get("is_trained", True)
        self.device = resolve_device(device)
        return self


if SPARTHA.__doc__:  # the architecture's fields, documented once in ModelConfig
    SPARTHA.__doc__ = SPARTHA.__doc__.replace("{config}", ModelConfig.describe(indent=" " * 8))


#: by ``predict_expression(value=...)``: the model site drawn, its dtype and the draws' variable name
_DRAWS = {"counts": ("x_t", np.int32, "expression"), "mean": ("mu", np.float32, "expected_expression")}


def _check_draw_request(num_samples: int, out: str | os.PathLike | None, overwrite: bool) -> None:
    """Up front, before any work: a positive ``num_samples``, and no ``out`` file to clobber unless ``overwrite``."""
    if num_samples < 1:
        raise InputError("num_samples must be positive")
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def _netcdf_variable(path: Path, name: str, dtype, coords: Mapping[str, Sequence], attrs: Mapping[str, object]):
    """A new NetCDF-4 file at ``path`` holding coordinates and an empty ``(sample, spot, gene)``
    variable ``name``; yields the variable (write slices into it), closes the file on exit."""
    import netCDF4

    ds = netCDF4.Dataset(path, "w", format="NETCDF4")
    try:
        for dim, values in coords.items():
            values = np.asarray(values)
            ds.createDimension(dim, len(values))
            kind = str if values.dtype.kind in "OU" else values.dtype
            ds.createVariable(dim, kind, (dim,))[:] = values.astype(object) if kind is str else values
        chunks = (1, min(256, len(coords["spot"])), len(coords["gene"]))
        # compressed as write_samples did (draw counts shrink ~10x), one chunk per sample and minibatch
        variable = ds.createVariable(name, dtype, ("sample", "spot", "gene"), chunksizes=chunks, zlib=True, complevel=4)
        variable.setncatts(dict(attrs))
        yield variable
    finally:
        ds.close()
