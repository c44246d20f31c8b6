"""The SVI loop: shuffled minibatches, ClippedAdam, early stopping, checkpoints, progress, NaN diagnosis.

The step runs entirely on the training device: minibatches come from
:func:`~spartha_pyro.loaders.make_loader` (data resident on the device, or prefetched from the
host), the epoch's losses are summed on the device, and the only host reads per step are
the finiteness check every ``check_finite_every`` steps (plus Pyro's own NaN warning inside
its ELBO). With an initialised ``torch.distributed`` process group, each rank trains on a
disjoint shard of the minibatches and gradients are averaged (:mod:`spartha_pyro.distributed`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import asdict, dataclass

import numpy as np
import pyro
import torch
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from . import checkpoint, distributed
from ._errors import InputError
from .data import SpotArrays
from .loaders import histology_strata, iterate_minibatches, make_loader, minibatch, stratified_minibatches
from .module import SparthaModule


@dataclass
class TrainConfig:
    """Settings of :func:`fit` (see :meth:`spartha_pyro.SPARTHA.train`).

    ``check_finite_every``: steps between loss finiteness checks (each is a host-device
    sync). ``accuracy_spots``: spots of the per-epoch classifier-accuracy pass (0: skip).
    ``loader``: ``"auto"``, ``"device"`` or ``"host"`` (see :func:`~spartha_pyro.loaders.make_loader`).
    ``validate``: Pyro's distribution validation during training; ``None`` keeps the global
    setting (:func:`pyro.enable_validation`). Validation checks every site's parameters and
    values with host syncs; the inputs were validated when encoded, so ``False`` is safe
    and faster on a GPU. ``checkpoint_dir``: write a checkpoint there every
    ``checkpoint_every`` epochs, keeping the last ``keep_checkpoints``; with ``resume``,
    continue from the latest complete one (see :mod:`spartha_pyro.checkpoint`).
    ``precision``: ``"32"`` or ``"bf16"`` (see :data:`PRECISIONS`). ``monitor``: see
    :data:`MONITORS`. ``min_epochs``: early stopping neither stops before this many epochs nor
    chooses an earlier one (the histology path's held-out PCC can dip below zero for the first
    tens of epochs before it rises, and a spurious score of a barely trained model there must
    not win; see :meth:`spartha_pyro.SPARTHA.train`). ``max_unimaged_share``: with spots
    without histology among the training spots, an epoch is a pass over those with histology
    and each minibatch gives at most this share to the others
    (:func:`~spartha_pyro.loaders.stratified_minibatches`; 1.0: every spot once per epoch).
    """

    max_epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    clip_norm: float = 10.0
    lrd: float = 1.0
    weight_decay: float = 0.0
    patience: int | None = 20
    seed: int = 0
    progress: bool = True
    check_finite_every: int = 1
    accuracy_spots: int = 2048
    loader: str = "auto"
    validate: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    resume: bool = False
    precision: str = "32"
    monitor: str = "pcc"
    min_epochs: int = 0
    max_unimaged_share: float = 0.5


#: what early stopping watches on the validation spots: ``"pcc"`` the mean per-gene PCC of
#: expression predicted from histology alone (:func:`evaluate_pcc`, maximised), ``"elbo"``
#: the histology path's negative ELBO (minimised)
MONITORS = ("pcc", "elbo")

#: ``"bf16"``: the loss runs under ``torch.autocast(dtype=torch.bfloat16)``, so the matrix
#: products of the encoders and the decoder (the gene-logit layer dominates at 36k genes)
#: run in bfloat16. What stays float32: the parameters and optimizer state, LayerNorm and
#: softmax (autocast's float32 list), and every distribution parameter (the model and guides
#: cast decoder, encoder and classifier outputs to float32 before they enter a distribution),
#: hence every NB/Normal log-density, KL term and the ELBO itself: ``lgamma`` of NB counts in
#: bfloat16 (8 bits of mantissa) would be wrong by whole nats.
PRECISIONS = ("32", "bf16")

#: settings that may differ between a checkpointed run and its resumption
_RESUMABLE = ("max_epochs", "min_epochs", "progress", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and Pyro."""
    random.seed(seed)
    np.random.seed(seed)
    pyro.set_rng_seed(seed)


@torch.no_grad()
def evaluate_loss(module: SparthaModule, data: SpotArrays, idx: np.ndarray, batch_size: int, device) -> float:
    """Histology-path negative ELBO per spot on spots ``idx`` (eval mode, no dropout)."""
    module.eval()
    total, n_genes = 0.0, module.model.n_genes
    for b in iterate_minibatches(len(idx), batch_size, None, False):
        total += float(module.histology_loss(minibatch(data, idx[b], device, n_genes))) * len(b)
    module.train()
    return total / max(len(idx), 1)


@torch.no_grad()
def evaluate_pcc(module: SparthaModule, data: SpotArrays, idx: np.ndarray, batch_size: int, device) -> float:
    """Mean per-gene PCC, over spots ``idx``, between log1p(counts per 10,000) and the
    histology-only prediction ``log1p(10,000 rho(E_q[Z | X_h]))`` (eval mode, no dropout).

    Spots without counts or histology are skipped; genes constant in either are left out.
    This is the held-out metric itself, so early stopping chooses the epoch at which the
    prediction path, not the ELBO, is best.
    """
    module.eval()
    pred, obs = [], []
    keep = idx[data.has_counts[idx] & data.has_histology[idx]]
    for b in iterate_minibatches(len(keep), batch_size, None, False):
        batch = minibatch(data, keep[b], device, module.model.n_genes)
        x = batch.x_t
        pred.append(torch.log1p(1e4 * module.histology_prediction(batch)).double())
        obs.append(torch.log1p(1e4 * x / x.sum(-1, keepdim=True).clamp(min=1.0)).double())
    module.train()
    if not pred:
        return float("nan")
    p, o = torch.cat(pred), torch.cat(obs)
    p, o = p - p.mean(0), o - o.mean(0)
    denom = (p.square().sum(0) * o.square().sum(0)).sqrt()
    ok = denom > 1e-12
    return float(((p * o).sum(0)[ok] / denom[ok]).mean()) if ok.any() else float("nan")


@torch.no_grad()
def classifier_accuracy(module: SparthaModule, data: SpotArrays, idx: np.ndarray, device) -> dict[str, float]:
    """Accuracy of each ``q_psi(L | Z)`` at the full guide's posterior means on spots ``idx``."""
    module.eval()
    out = module.classifier_accuracy(minibatch(data, idx, device, module.model.n_genes))
    module.train()
    return out


def fit(
    module: SparthaModule,
    data: SpotArrays,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    config: TrainConfig,
    device: torch.device,
    jit: bool = False,
) -> list[dict]:
    """Train ``module`` in place; see :func:`_fit` (``jit=True`` for ``JitTrace_ELBO``).

    With spots both with and without histology among ``train_idx`` (and
    ``config.max_unimaged_share < 1``), minibatches are stratified by histology
    (:func:`~spartha_pyro.loaders.stratified_minibatches`) and ``module.strata`` holds the two
    strata's sizes for the duration of the run, so the loss scales each stratum to its size.

    Pyro's settings and param store are left as the caller had them. The module's parameters
    are module-local (``pyro.settings.context(module_local_params=True)`` around the loop):
    they never enter Pyro's global param store, so two models never share weights. Pyro's
    JIT finds parameters through the global store, so a JIT run registers them in a fresh
    store (``param_store.scope()``; the tensors are the module's own) that replaces the
    caller's for the duration of the run and is dropped afterwards.
    """
    module.configure(module.model.n_spots, jit=jit)
    module.strata = histology_strata(np.asarray(data.has_histology[train_idx], dtype=bool), config.max_unimaged_share)
    args = (module, data, train_idx, val_idx, config, device)
    validation = contextlib.nullcontext() if config.validate is None else pyro.validation_enabled(config.validate)
    try:
        with validation:
            if not jit:
                with pyro.settings.context(module_local_params=True):
                    return _fit(*args)
            with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope():
                try:
                    return _fit(*args, drop_last=True)
                finally:
                    module.configure(module.model.n_spots, jit=False)
    finally:
        module.strata = None


def _fit(
    module: SparthaModule,
    data: SpotArrays,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    config: TrainConfig,
    device: torch.device,
    drop_last: bool = False,
) -> list[dict]:
    """Train ``module`` in place on ``data[train_idx]``; returns one history record per epoch.

    With ``val_idx`` and ``config.patience``, stops when the histology-path validation loss
    has not improved for ``patience`` epochs and restores the best parameters. Raises
    ``FloatingPointError`` naming the offending terms when the loss becomes NaN/inf.

    Under ``torch.distributed``, all ranks draw the same minibatch order (seed
    ``config.seed``), each takes every ``world_size``-th minibatch, Monte Carlo noise is
    seeded ``config.seed + rank``, and the logged losses and validation loss are averaged
    over ranks so every rank takes the same early-stopping decision.

    With ``config.checkpoint_dir``, the whole loop state is checkpointed every
    ``config.checkpoint_every`` epochs; with ``config.resume`` the loop continues from the
    latest complete checkpoint (or starts afresh when there is none) and ends with the same
    parameters as a run never interrupted. Raises :class:`~spartha_pyro.InputError` when the
    folder holds checkpoints but ``resume`` is off, or their settings differ from ``config``.
    """
    if config.precision not in PRECISIONS:  # before the data go to the device
        raise InputError(f"precision must be one of {PRECISIONS}, got {config.precision!r}")
    if config.monitor not in MONITORS:
        raise InputError(f"monitor must be one of {MONITORS}, got {config.monitor!r}")
    rank, n_ranks = distributed.world()
    if config.checkpoint_dir is not None and n_ranks > 1:
        raise InputError("checkpoints are written by single-process training only")
    seed_everything(config.seed + rank)
    rng = np.random.default_rng(config.seed)
    module.to(device).train()
    if n_ranks > 1:
        distributed.broadcast_parameters(module)
    loader = make_loader(data, device, module.model.n_genes, config.loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    optim = ClippedAdam(
        module.parameters(), lr=config.lr, clip_norm=config.clip_norm, lrd=config.lrd, weight_decay=config.weight_decay
    )
    acc_idx = rng.choice(train_idx, min(config.accuracy_spots, len(train_idx)), replace=False)
    acc_idx.sort()
    history: list[dict] = []
    best, best_state, stale = math.inf, None, 0
    step, start = 0, 0
    if config.checkpoint_dir is not None:
        state = _resume_state(config)
        if state is not None:
            _check_split(state, train_idx, val_idx)
            try:
                module.load_state_dict(state["module"])
                optim.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise InputError(f"checkpoint {state['path']} does not fit this model: {err}") from None
            checkpoint.set_rng_state(state["rng"], rng)
            history, step, start = state["history"], state["step"], state["epoch"] + 1
            best, best_state, stale = state["best"], state["best_state"], state["stale"]
    bar = tqdm(range(start, config.max_epochs), desc="SPARTHA", unit="epoch", disable=not config.progress, initial=start,
               total=config.max_epochs)  # a resumed run shows epoch start of max_epochs, not of max_epochs - start
    stopped = False
    has_histology = np.asarray(data.has_histology[train_idx], dtype=bool)
    for epoch in bar:
        sums = torch.zeros(2, device=device)
        n_seen = 0
        order = stratified_minibatches(has_histology, config.batch_size, rng, drop_last, config.max_unimaged_share)
        if len(order) < n_ranks:
            raise ValueError(f"{len(order)} minibatches per epoch cannot feed {n_ranks} ranks; lower batch_size")
        for batch in loader.batches(train_idx[b] for b in distributed.shard(order, rank, n_ranks)):
            with autocast:
                loss_full, loss_hist = module.loss(batch)
            loss = loss_full + module.histology_weight * loss_hist
            step += 1
            if step % config.check_finite_every == 0 and not torch.isfinite(loss):
                raise FloatingPointError(
                    f"SPARTHA loss is not finite at epoch {epoch}, step {step}: {module.diagnose_nonfinite(batch)}"
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if n_ranks > 1:
                distributed.allreduce_gradients(module)
            optim.step()
            # each loss is already a per-spot mean over the minibatch (plate scale x 1/n_spots)
            n = len(batch.index)
            sums += torch.stack([loss_full.detach(), loss_hist.detach()]) * n
            n_seen += n
        full, hist = distributed.allreduce_mean(sums / n_seen).tolist()
        if not (math.isfinite(full) and math.isfinite(hist)):
            raise FloatingPointError(f"SPARTHA loss is not finite at epoch {epoch}: {module.diagnose_nonfinite(batch)}")
        record = {"epoch": epoch, "loss": full + module.histology_weight * hist, "loss_full": full, "loss_histology": hist}
        if len(acc_idx):
            record.update(classifier_accuracy(module, data, acc_idx, device))
        if val_idx is not None and len(val_idx):
            val = evaluate_loss(module, data, val_idx, config.batch_size, device)
            record["val_loss_histology"] = float(distributed.allreduce_mean(torch.tensor(val, device=device)))
            if config.monitor == "pcc":
                pcc = evaluate_pcc(module, data, val_idx, config.batch_size, device)
                record["val_pcc_gene"] = float(distributed.allreduce_mean(torch.tensor(pcc, device=device)))
        history.append(record)
        bar.set_postfix({k: round(v, 3) for k, v in record.items() if k != "epoch"}, refresh=False)
        if val_idx is not None and len(val_idx) and config.patience is not None and epoch + 1 >= config.min_epochs:
            watched = monitored(record, config.monitor)
            if watched < best - 1e-4 * abs(best if math.isfinite(best) else 1.0):
                best, stale = watched, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
                if stale >= config.patience:
                    stopped = True
                    break
        if config.checkpoint_dir is not None and (epoch + 1) % config.checkpoint_every == 0:
            state = {
                "epoch": epoch, "step": step, "config": asdict(config), "module": module.state_dict(),
                "optimizer": optim.state_dict(), "history": history, "best": best, "best_state": best_state,
                "stale": stale, "rng": checkpoint.rng_state(rng),
                # tensors: checkpoints are read with torch.load(weights_only=True)
                "split": {k: None if v is None else torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in (("train", train_idx), ("val", val_idx))},
            }
            checkpoint.write_checkpoint(config.checkpoint_dir, state, config.keep_checkpoints)
    if best_state is not None:
        module.load_state_dict(best_state)
        if config.progress:
            chosen = next((h["epoch"] for h in history[config.min_epochs - 1 if config.min_epochs else 0 :]
                           if monitored(h, config.monitor) == best), history[-1]["epoch"])
            ran = history[-1]["epoch"] + 1
            why = f"early stopping after epoch {ran} (no validation improvement for {config.patience})" if stopped else f"{ran} epochs"
            score = f"{score_name(config.monitor)} {-best if config.monitor == 'pcc' else best:.4f}"
            bar.write(f"{why}: kept the weights of epoch {chosen + 1}, the best {score}")
    bar.close()
    module.eval()
    return history


def validation_score(summary: dict, monitor: str) -> float:
    """The monitored score of a :func:`selection_summary`: its per-gene PCC (``"pcc"``) or its
    histology loss (``"elbo"``)."""
    return summary["val_pcc_gene" if monitor == "pcc" else "val_loss_histology"]


def score_name(monitor: str) -> str:
    """What :func:`validation_score` is called in messages."""
    return "validation per-gene PCC" if monitor == "pcc" else "validation loss"


def monitored(record: dict, monitor: str) -> float:
    """The validation quantity early stopping minimises in one history ``record`` (NaN PCC: +inf)."""
    if monitor == "pcc":
        pcc = record["val_pcc_gene"]
        return -pcc if math.isfinite(pcc) else math.inf
    return record["val_loss_histology"]


def selection_summary(history: list[dict], monitor: str, held_out: str | None, refit: bool, min_epochs: int = 0) -> dict:
    """What early stopping chose from a validated ``history``: the epoch count and its scores,
    among epochs ``min_epochs`` and later (all of them when the history is shorter).

    Returns ``{"epochs", "monitor", "held_out", "refit", "val_pcc_gene", "val_loss_histology",
    "message"}`` (JSON-serialisable; ``val_pcc_gene`` is ``None`` when it was not monitored).
    """
    first = max(min_epochs - 1, 0) if len(history) >= min_epochs else 0
    best = min(range(first, len(history)), key=lambda i: monitored(history[i], monitor))
    rec = history[best]
    pcc = rec.get("val_pcc_gene")
    score = f"validation per-gene PCC {pcc:.3f}" if pcc is not None else f"validation loss {rec['val_loss_histology']:.4g}"
    then = f"; refit on every spot for {best + 1} epochs" if refit else "; best weights kept"
    return {
        "epochs": best + 1,
        "monitor": monitor,
        "held_out": held_out,
        "refit": bool(refit),
        "val_pcc_gene": pcc,
        "val_loss_histology": rec["val_loss_histology"],
        "message": f"early stopping on {held_out or 'the validation spots'} chose {best + 1} of "
        f"{len(history)} epochs ({score}){then}",
    }


def unimaged_summary(runs: dict, choice: str, n_unimaged: int, monitor: str, setting: str) -> dict:
    """Whether the training spots without histology were used, and why.

    ``runs``: ``{"use" | "ignore": (module, history, selection_summary)}`` of the validation
    stage(s) run; ``choice``: the one kept. Returns ``{"used", "n_spots", "setting",
    "scores": {option: validation score}, "message"}`` (JSON-serialisable).
    """
    scores = {o: validation_score(run[2], monitor) for o, run in runs.items()}
    if len(runs) > 1:
        why = f"{score_name(monitor)} {scores['use']:.4f} with them vs {scores['ignore']:.4f} without"
    else:
        why = f"unimaged={setting!r}"
    return {
        "used": choice == "use",
        "n_spots": int(n_unimaged),
        "setting": setting,
        "scores": scores,
        "message": f"the {n_unimaged} training spots without histology were {'used' if choice == 'use' else 'left out'} ({why})",
    }


def label_sets_summary(given: list[str], kept: list[str], scores: dict, monitor: str) -> dict:
    """Which of the ``given`` label sets ``train(label_sets="auto")`` kept, and why.

    ``scores``: ``{"+"-joined label sets: validation score}`` of every combination tried.
    Returns ``{"used", "left_out", "scores", "message"}`` (JSON-serialisable).
    """
    left_out = [k for k in given if k not in kept]
    what = score_name(monitor)
    with_all, now = scores["+".join(given)], scores["+".join(kept)]
    why = (f"{what} {now:.4f} without them vs {with_all:.4f} with all" if left_out
           else f"leaving any one out validated worse than {what} {with_all:.4f} with all")
    return {
        "used": list(kept),
        "left_out": left_out,
        "scores": dict(scores),
        "message": f"label sets used: {kept}" + (f", left out: {left_out}" if left_out else "") + f" ({why})",
    }


def _check_split(state: dict, train_idx: np.ndarray, val_idx: np.ndarray | None) -> None:
    """Raise when a checkpoint was written with other training or validation spots."""
    split = state.get("split")
    if split is None:  # older checkpoints did not record it
        return
    for name, now, then in (("training", train_idx, split["train"]), ("validation", val_idx, split["val"])):
        same = (now is None and then is None) or (
            now is not None and then is not None and np.array_equal(np.asarray(now), then.numpy())
        )
        if not same:
            raise InputError(
                f"checkpoint {state['path']} was written with other {name} spots "
                f"({0 if then is None else len(then)} then, {0 if now is None else len(now)} now): "
                "resume with the same data and validation split"
            )


def _resume_state(config: TrainConfig) -> dict | None:
    """The checkpoint ``_fit`` continues from (``None``: start afresh), checked against ``config``."""
    if config.checkpoint_every < 1 or config.keep_checkpoints < 1:
        raise InputError("checkpoint_every and keep_checkpoints must be positive")
    if not config.resume:
        if checkpoint.checkpoint_files(config.checkpoint_dir):
            raise InputError(
                f"{config.checkpoint_dir} holds checkpoints of an earlier run; pass resume=True to continue it "
                "or choose an empty folder"
            )
        return None
    state = checkpoint.load_latest(config.checkpoint_dir)
    if state is None:
        return None
    now, then = asdict(config), state["config"]
    defaults = {k: f.default for k, f in TrainConfig.__dataclass_fields__.items()}  # keys older checkpoints lack
    changed = sorted(k for k in now if k not in _RESUMABLE and now[k] != then.get(k, defaults[k]))
    if changed:
        raise InputError(
            f"checkpoint {state['path']} was written with other settings: "
            + ", ".join(f"{k}={then.get(k)!r} (now {now[k]!r})" for k in changed)
        )
    return state
