"""``spartha``: prepare data, train, predict from histology, evaluate, run the demo.

Each subcommand is a thin layer over the Python API (no second implementation):

- ``spartha prepare``  -> :func:`spartha_pyro.datasets.load` + :func:`spartha_pyro.pp.prepare`
- ``spartha train``    -> :class:`spartha_pyro.SPARTHA` + ``.train()`` + ``.save()``
- ``spartha predict``  -> :meth:`SPARTHA.load` + ``.predict_summary(out=...)`` (draws streamed
  to NetCDF)
- ``spartha predict-image`` -> :func:`spartha_pyro.image.predict_image` (+
  :func:`~spartha_pyro.image.plot_gene_maps`)
- ``spartha evaluate`` -> :func:`spartha_pyro.demo.score` (regression metrics, QCPR) +
  :func:`spartha_pyro.metrics.format_table`
- ``spartha demo``     -> :func:`spartha_pyro.demo.report`

Options can also come from a TOML or YAML file (``--config``): top-level keys apply to
every subcommand, a table named after the subcommand (``[train]``) to that one only; keys
are the long option names (``max-epochs`` or ``max_epochs``). Flags on the command line
override the file. Exit codes: 0 success, 2 bad usage or input, 1 any other failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._errors import InputError
from .config import AUX_KINDS, ModelConfig

#: exit codes
OK, FAILURE, BAD_INPUT = 0, 1, 2

DESCRIPTION = """SPARTHA: spatial gene expression from histology, with QC-failed spots kept and
artifacts modelled by their own latent.

  spartha prepare her2st/ -o data.h5ad              read, annotate QC, histology features
  spartha train data.h5ad -o model/ --sections B4 C2 C3 C4 --label-keys cluster
  spartha predict model/ data.h5ad --sections C5 -o pred.h5ad --samples draws.nc
  spartha predict-image model/ slide.tif -o maps.h5ad --genes ERBB2 --plot-dir maps/
  spartha evaluate pred.h5ad data.h5ad --samples draws.nc --json metrics.json
  spartha demo                                      the simulated main job

Every subcommand has --help. Options can come from a TOML/YAML file (--config): top-level
keys apply to every subcommand, a table named after the subcommand ([train]) to that one;
keys are the long option names. Command-line flags override the file.
Exit codes: 0 success, 2 bad usage or input, 1 any other failure."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


def _none_or_str(value: str) -> str | None:
    return None if value.lower() == "none" else value


def linear_path_setting(value: str) -> str | float | None:
    """A command-line ``--linear-path``: ``"auto"``, ``"none"`` (``None``) or a share in [0, 1]
    (``ValueError`` otherwise, which argparse reports as an invalid value)."""
    if value.lower() in ("auto", "none"):
        return None if value.lower() == "none" else "auto"
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a linear share must be in [0, 1], got {share}")
    return share


def _validation(values: Sequence[str] | None) -> float | list[str] | str | None:
    """``["0.1"]`` -> 0.1 (a random fraction); ``["auto"]`` -> "auto"; ``["none"]`` -> None;
    section names -> the list."""
    if not values or [v.lower() for v in values] == ["none"]:
        return None
    if [v.lower() for v in values] == ["auto"]:
        return "auto"
    if len(values) == 1:
        try:
            return float(values[0])
        except ValueError:
            pass
    return list(values)


def _aux_weights(items: Sequence[str] | None) -> dict[str, float]:
    """``["y=50", "r=10"]`` -> ``{"y": 50.0, "r": 10.0}``."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or key not in AUX_KINDS:
            raise InputError(f"--aux-weights takes y=W, d=W or r=W, got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"--aux-weights {item!r}: {value!r} is not a number") from None
    return out


# ---------------------------------------------------------------------------- commands
def cmd_prepare(args: argparse.Namespace) -> None:
    """Read the input, annotate QC, compute histology features, write the ``.h5ad``."""
    from . import datasets, io, pl, pp

    adata = datasets.load(args.input, kind=args.kind, sections=args.sections, source_image_path=args.source_image)
    print(f"read {adata.n_obs} spots × {adata.n_vars} genes from {args.input}")
    extractor = None if [e.lower() for e in args.extractor] == ["none"] else args.extractor
    pp.prepare(adata, batch_key=args.batch_key, nmads=args.nmads, qc_nmads=args.qc_nmads, extractor=extractor,
               neighbors=args.neighbors, device=args.device, progress=args.progress, image_qc=args.image_qc)
    if args.batch_key in adata.obs:
        print(pl.qc_summary(adata, batch_key=args.batch_key, nmads=args.nmads).to_string(float_format="%.3f"))
    if "histology" in adata.obsm:
        print(f"histology: {adata.obsm['histology'].shape[1]} features per spot")
    else:
        print("note: no images and no obsm['histology']: this file can be used for QC, not for training")
    io.write_h5ad(adata, args.out)
    print(f"wrote {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train SPARTHA on a prepared ``.h5ad`` and save it to a folder."""
    from . import SPARTHA, datasets

    if (Path(args.out) / "model.pt").exists() and not args.overwrite:
        raise InputError(f"{args.out} already holds a saved model; pass --overwrite to replace it")
    if args.refit and (_validation(args.validation) is None or args.checkpoint_dir is not None):  # before the data load
        raise InputError("--refit needs --validation (to choose the epoch count) and no --checkpoint-dir")
    adata = datasets.load(args.input, kind="h5ad", sections=args.sections)
    model = SPARTHA(
        adata, histology_key=args.histology_key, label_keys="auto" if args.label_keys is None else args.label_keys,
        batch_key=args.batch_key, histology_scaling=args.histology_scaling,
        qc_key=args.qc_key, layer=args.layer, counts_key=args.counts_key,
        gene_mask_key=args.gene_mask_key, seed=args.seed, **_model_config(args),
    )
    print(model)
    history = model.train(
        max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, validation=_validation(args.validation),
        patience=args.patience, device=args.device, seed=args.seed, jit=args.jit, progress=args.progress,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
        precision=args.precision, refit=args.refit, monitor=args.monitor, min_epochs=args.min_epochs,
        unimaged=args.unimaged, max_unimaged_share=args.max_unimaged_share, label_sets=args.label_sets,
        linear_path=args.linear_path,
    )
    model.save(args.out, overwrite=args.overwrite)
    print(f"{_trained(history)} (final loss {history[-1]['loss']:.4f}); saved to {args.out}")


def _trained(history: list[dict]) -> str:
    """What training did, e.g. "early stopping chose 23 epochs; refit on all spots for 23 epochs"."""
    refit = [h for h in history if h.get("stage") == "refit"]
    if refit:  # validation-stage epochs run: one count per run (unimaged / label sets compared: several)
        runs = Counter((h.get("unimaged"), h.get("label_sets")) for h in history if h.get("stage") == "validation")
        ran = " and ".join(str(n) for n in runs.values())
        return (f"early stopping chose {len(refit)} epochs (of {ran} run with validation); "
                f"refit on all training spots for {len(refit)} epochs")
    return f"trained {len(history)} epochs"  # early stopping, when it happened, was announced by the loop


def cmd_predict(args: argparse.Namespace) -> None:
    """Predict expression from histology with a saved model; write summaries (and draws)."""
    from . import SPARTHA, datasets, io

    existing = [f for f in (args.out, args.samples) if f and Path(f).exists()]
    if existing and not args.overwrite:
        raise InputError(f"{existing} already exist; pass --overwrite to replace them")
    if args.samples and Path(args.samples).suffix != ".nc":
        raise InputError(f"--samples must end in .nc (NetCDF), got {args.samples!r}")
    adata = datasets.load(args.input, kind="h5ad", sections=args.sections)
    model = SPARTHA.load(args.model, device=args.device)
    print(f"predicting {adata.n_obs} spots × {len(model.registry.genes)} genes, {args.num_samples} draws each")
    # with --samples the draws stream to the NetCDF file, never all in memory
    out = model.predict_summary(adata, num_samples=args.num_samples, artifact=args.artifact, quantiles=args.quantiles,
                                batch_size=args.batch_size, seed=args.seed, out=args.samples, overwrite=args.overwrite,
                                linear_path=args.linear_path)
    if args.samples:
        print(f"wrote {args.samples}: {args.num_samples} draws (sample, spot, gene)")
    for key in ("spatial", model.registry.histology_key):
        if key in adata.obsm:
            out.obsm[key] = np.asarray(adata.obsm[key])
    if "spatial" in adata.uns:
        out.uns["spatial"] = adata.uns["spatial"]
    io.write_h5ad(out, args.out)
    print(f"wrote {args.out}: X = {_point_description(out)}; layers {list(out.layers)} (summaries of the model's "
          "own draws)")


def _point_description(pred) -> str:
    """What ``X`` of a :meth:`~spartha_pyro.SPARTHA.predict_summary` output is, in words."""
    share = pred.uns["linear_share"]
    blend = f", blended with the linear histology path (share {share:g})" if share else ""
    return f"predictive mean of log1p(counts per 10k), count noise integrated out{blend}"


def cmd_predict_image(args: argparse.Namespace) -> None:
    """Predict expression maps from an H&E image alone: pseudo-spots on the tissue, the model's
    features, predictions with uncertainty; optional per-gene map PNGs."""
    from . import SPARTHA, image

    existing = [f for f in (args.out, args.samples) if f and Path(f).exists()]
    if existing and not args.overwrite:
        raise InputError(f"{existing} already exist; pass --overwrite to replace them")
    if args.genes and not args.plot_dir:
        raise InputError("--genes needs --plot-dir (where the map PNGs go)")
    model = SPARTHA.load(args.model, device=args.device)
    genes = image.check_genes(args.genes or [], model.registry.genes)
    pred = image.predict_image(
        model, args.image, out=args.out, samples=args.samples, num_samples=args.num_samples, artifact=args.artifact,
        quantiles=args.quantiles, seed=args.seed, overwrite=args.overwrite, progress=args.progress,
        um_per_px=args.um_per_px, spacing_um=args.spacing_um, spot_um=args.spot_um, grid=args.grid,
        subdivide=args.subdivide, tissue_mask=args.tissue_mask, min_tissue=args.min_tissue, library_id=args.library_id,
        batch_size=args.batch_size, device=None if args.device == "auto" else args.device, linear_path=args.linear_path,
    )
    g = pred.uns["image_grid"]
    print(f"{pred.n_obs} pseudo-spots ({g['grid']} grid, {g['pseudo_spot_spacing_um']:g} µm spacing) on {args.image} at "
          f"{g['um_per_px']:.4g} µm/px ({g['um_per_px_source']}; level {g['level']})")
    print(f"wrote {args.out}: X = {_point_description(pred)}; layers {list(pred.layers)}")
    if args.samples:
        print(f"wrote {args.samples}: {args.num_samples} draws (sample, spot, gene)")
    if genes:
        for path in image.plot_gene_maps(pred, genes, args.plot_dir):
            print(f"wrote {path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Score predictions against observed counts; print the table, optionally write JSON."""
    import anndata as ad

    from . import datasets, demo, metrics, predictions

    try:
        pred = ad.read_h5ad(args.predictions)
    except (OSError, KeyError) as err:
        raise InputError(f"{args.predictions!r} cannot be read as .h5ad: {err}") from None
    if pred.n_obs == 0 or pred.n_vars == 0:
        raise InputError(f"{args.predictions!r} holds {pred.n_obs} spots × {pred.n_vars} genes: nothing to evaluate")
    observed = datasets.load(args.observed, kind="h5ad")
    missing_spots = pred.obs_names.difference(observed.obs_names)
    missing_genes = pred.var_names.difference(observed.var_names)
    if len(missing_spots) or len(missing_genes):
        raise InputError(
            f"the observed data lack {len(missing_spots)} predicted spots (e.g. {list(missing_spots[:3])}) and "
            f"{len(missing_genes)} predicted genes (e.g. {list(missing_genes[:3])})"
        )
    observed = observed[pred.obs_names, pred.var_names].copy()
    panels: dict[str, object] = {"all": None}
    for file in args.panel or ():
        genes = [g.strip() for g in Path(file).read_text().split() if g.strip()]
        panels[Path(file).stem] = [g for g in genes if g in set(pred.var_names)]
    samples = None
    if args.samples:
        samples = predictions.read_samples(args.samples).sel(spot=list(pred.obs_names), gene=list(pred.var_names))
    records = demo.score(args.method, np.asarray(pred.X), observed, panels,
                         samples.values if samples is not None else None, seed=args.seed)
    print(metrics.format_table(records, panels=list(panels)))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1, default=float))
        print(f"wrote {args.json}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The simulated main job (same as ``python -m spartha_pyro.demo``)."""
    from . import demo

    demo.report(args)


# ---------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML or YAML file with options (flags override it)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", formatter_class=_Formatter, help="read data, annotate QC, compute histology features",
                       description=cmd_prepare.__doc__ + "\n\nQC never drops spots: it labels them pass/fail.")
    p.add_argument("input", help="her2st folder, Space Ranger outs/ folder or .h5ad file")
    p.add_argument("-o", "--out", required=True, help="output .h5ad")
    p.add_argument("--kind", default="auto", choices=["auto", "her2st", "visium", "h5ad"], help="input kind")
    p.add_argument("--sections", nargs="+", help="sections to read (her2st) or keep (h5ad obs['slide']); default all")
    p.add_argument("--source-image", help="Visium: full-resolution H&E given to Space Ranger")
    p.add_argument("--batch-key", default="slide", help="obs column of the section: QC statistics per section")
    p.add_argument("--nmads", type=float, nargs="+", default=[3.0, 4.0, 5.0],
                   help="MAD thresholds annotated (obs['qc_pass_<k>mad'])")
    p.add_argument("--qc-nmads", type=float, default=5.0, help="threshold of obs['qc_pass'], the model's QC label")
    p.add_argument("--image-qc", action=argparse.BooleanOptionalAction, default=None,
                   help="QC also judges each spot's H&E patch: > 25%% background, blur or stain intensity beyond the "
                   "MAD threshold (obs['qc_pass_image']); default: when the data have images")
    p.add_argument("--extractor", nargs="+", default=["efficientnet_lite0", "stats"],
                   help="histology extractor(s): efficientnet_lite0, resnet50, stats; 'none' keeps obsm['histology']")
    p.add_argument("--neighbors", action="store_true", help="append the mean features of grid neighbours")
    p.add_argument("--device", default=None, help="torch device of the extractor (default CUDA when available)")
    _common(p)
    p.set_defaults(func=cmd_prepare)


def _add_train(sub) -> None:
    p = sub.add_parser("train", formatter_class=_Formatter, help="train SPARTHA on a prepared .h5ad",
                       description=cmd_train.__doc__ + "\n\nOptions mirror SPARTHA(...) and SPARTHA.train(...).")
    p.add_argument("input", help="prepared .h5ad: raw counts in X, obsm['histology'], obs['qc_pass']")
    p.add_argument("-o", "--out", required=True, help="model folder (model.pt + settings.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    p.add_argument("--sections", nargs="+", help="train on these obs['slide'] sections only (default all)")
    g = p.add_argument_group("data keys")
    g.add_argument("--histology-key", default="histology", help="obsm key of the histology vectors")
    g.add_argument("--label-keys", nargs="*", default=None,
                   help="obs columns of biological labels (one Z_y each); default: clusters of the training "
                        "expression (obs['spartha_cluster']); the flag with no column: no label set")
    g.add_argument("--batch-key", type=_none_or_str, default="slide", help="obs column of the batch/slide ('none': one batch)")
    g.add_argument("--qc-key", type=_none_or_str, default="qc_pass", help="obs column of QC pass/fail")
    g.add_argument("--layer", default=None, help="layer with raw counts (default X)")
    g.add_argument("--counts-key", default=None,
                   help="boolean obs column, False for spots without measured counts (default: all have counts)")
    g.add_argument("--gene-mask-key", default=None,
                   help="varm key of the genes x batches bool mask of measured genes, e.g. 'measured' after an outer join")
    g.add_argument("--histology-scaling", default="section", choices=["section", "global"],
                   help="standardise histology per section (default; removes a slide's stain shift) or globally")
    _add_model_config(p.add_argument_group("model"))
    g = p.add_argument_group("training")
    g.add_argument("--max-epochs", type=int, default=100,
                   help="maximum passes over the spots (over those with histology when some have none)")
    g.add_argument("--batch-size", type=int, default=256, help="spots per minibatch")
    g.add_argument("--lr", type=float, default=1e-3, help="ClippedAdam learning rate")
    g.add_argument("--validation", nargs="+", default=["auto"],
                   help="early stopping on: auto (default: the last training section, or a spatial block of "
                        "one section), a fraction of spots (e.g. 0.1), whole sections (e.g. C4), or none")
    g.add_argument("--monitor", default="pcc", choices=["pcc", "elbo"],
                   help="what early stopping watches: per-gene PCC of the histology-only prediction, or its ELBO")
    g.add_argument("--patience", type=int, default=20, help="epochs without validation improvement before stopping")
    g.add_argument("--min-epochs", type=int, default=None,
                   help="early stopping never stops before this many epochs (default: half of --max-epochs)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="after early stopping, retrain on every spot for the chosen epoch count "
                        "(default: on with --validation auto)")
    g.add_argument("--unimaged", default="auto", choices=["auto", "use", "ignore"],
                   help="spots without histology (count-only sections): used only if they improve the validation "
                        "score (auto, default; the validation stage runs both ways), always, or never")
    g.add_argument("--label-sets", default="auto", choices=["auto", "all"],
                   help="with two or more --label-keys: leave out those whose absence validates at least as well "
                        "(auto, default; backward elimination, one validation stage per label set and round), or keep all")
    g.add_argument("--linear-path", type=linear_path_setting, default="auto",
                   help="share of the linear histology path (a ridge probe) in predictions: auto (default: chosen "
                        "on the validation spots, 0 to 1 in steps of 0.1), none, or a share in [0, 1]")
    g.add_argument("--max-unimaged-share", type=float, default=0.5,
                   help="most of each minibatch given to spots without histology (an epoch is a pass over the imaged "
                        "spots); 1: every spot once per epoch")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1…")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, minibatches and sampling")
    g.add_argument("--jit", action="store_true", help="JitTrace_ELBO (full minibatches only)")
    g.add_argument("--precision", default="32", choices=["32", "bf16"],
                   help="bf16: matrix products in bfloat16 (autocast); log-densities stay float32")
    g.add_argument("--checkpoint-dir", type=Path, help="write training checkpoints (ckpt-000012.pt …) to this folder")
    g.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (same data and options)")
    _common(p)
    p.set_defaults(func=cmd_train)


def _add_model_config(group) -> None:
    """One option per :class:`~spartha_pyro.config.ModelConfig` field, its default and help from the field."""
    for f in dataclasses.fields(ModelConfig):
        flag, default, help_ = "--" + f.name.replace("_", "-"), f.default, f.metadata["help"]
        if f.name == "aux_weights":
            defaults = [f"{k}={v:g}" for k, v in f.default_factory().items()]
            group.add_argument(flag, nargs="*", metavar="K=W", default=defaults, help=help_)
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            group.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"), help=help_)


def _model_config(args: argparse.Namespace) -> dict:
    """The :class:`~spartha_pyro.config.ModelConfig` fields given to ``spartha train``."""
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)}
    config["aux_weights"] = _aux_weights(config["aux_weights"])
    return config


def _output_options(p: argparse.ArgumentParser) -> None:
    """Output options shared by ``predict`` and ``predict-image``."""
    p.add_argument("-o", "--out", required=True, help="output .h5ad of predictions")
    p.add_argument("--samples", help="also write every draw to this NetCDF (.nc) file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")


def _draw_options(p) -> None:
    """Posterior-predictive options shared by ``predict`` and ``predict-image`` (a parser or group)."""
    p.add_argument("--num-samples", type=int, default=20, help="posterior predictive draws per spot")
    p.add_argument("--artifact", default="pass", choices=["pass", "posterior"],
                   help="pass: artifact-free generation (Z_r from p(Z_r | pass)); posterior: Z_r from q(Z_r | X_h)")
    p.add_argument("--quantiles", type=float, nargs="*", default=[0.05, 0.5, 0.95], help="quantile layers to write")
    p.add_argument("--linear-path", action=argparse.BooleanOptionalAction, default=True,
                   help="with --artifact posterior, blend the model's linear histology path into X (its share is "
                        "uns['linear_share']); the draws' layers are always the model's own")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", formatter_class=_Formatter, help="predict expression from histology",
                       description=cmd_predict.__doc__
                       + "\n\nX = predictive mean of log1p(counts per 10,000), count noise integrated out; layers "
                       "draws_mean, sd, q05/q50/q95 (same space) and counts_mean. Counts in the input are ignored: only "
                       "histology is used.")
    p.add_argument("model", help="model folder written by 'spartha train'")
    p.add_argument("input", help=".h5ad with obsm['histology'] (counts not needed)")
    _output_options(p)
    p.add_argument("--sections", nargs="+", help="predict these obs['slide'] sections only (default all)")
    _draw_options(p)
    p.add_argument("--batch-size", type=int, default=256, help="spots per prediction batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda…")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    _common(p)
    p.set_defaults(func=cmd_predict)


def _add_predict_image(sub) -> None:
    p = sub.add_parser("predict-image", formatter_class=_Formatter, help="predict expression maps from an H&E image",
                       description=cmd_predict_image.__doc__
                       + "\n\nReads JPEG/PNG/TIFF and pyramidal TIFF/OME-TIFF/SVS tile by tile. Pseudo-spots follow the "
                       "training platform (legacy-ST square or Visium hex grid) unless overridden. X = predictive mean "
                       "of log1p(counts per 10,000); layers draws_mean, sd, q05/q50/q95, counts_mean; obsm['spatial'] in "
                       "full-resolution pixels and uns['spatial'] for sc.pl.spatial.")
    p.add_argument("model", help="model folder written by 'spartha train' (features from 'spartha prepare')")
    p.add_argument("image", help="H&E image: JPEG, PNG, TIFF, pyramidal TIFF / OME-TIFF / SVS")
    _output_options(p)
    g = p.add_argument_group("image and grid")
    g.add_argument("--um-per-px", type=float, help="µm per full-resolution pixel (default: file metadata, else the "
                   "training resolution with a warning)")
    g.add_argument("--spacing-um", type=float, help="spot centre-to-centre spacing in µm (default: training platform)")
    g.add_argument("--spot-um", type=float, help="spot diameter in µm (default: training platform)")
    g.add_argument("--grid", choices=["square", "hex"], help="square (legacy ST) or hex (Visium); default: training")
    g.add_argument("--subdivide", type=int, default=1, help="pseudo-spots every spacing/K (a K²-times denser map of "
                   "training-size patches; neighbour context still one spacing away); default 1")
    g.add_argument("--tissue-mask", help="mask image (non-zero = tissue, any size) instead of tissue detection")
    g.add_argument("--min-tissue", type=float, default=0.5, help="keep spots whose area is at least this tissue fraction")
    g.add_argument("--library-id", help="key of uns['spatial'] (default the image file name)")
    g = p.add_argument_group("prediction")
    _draw_options(g)
    g.add_argument("--batch-size", type=int, default=64, help="patches per feature-extractor call")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda…")
    g.add_argument("--seed", type=int, default=0, help="seed of the draws")
    g = p.add_argument_group("plots")
    g.add_argument("--genes", nargs="+", help="genes to map (mean and sd side by side, one PNG each)")
    g.add_argument("--plot-dir", help="folder of the map PNGs")
    _common(p)
    p.set_defaults(func=cmd_predict_image)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", formatter_class=_Formatter, help="score predictions against observed counts",
                       description=cmd_evaluate.__doc__
                       + "\n\nPCC per gene / per spot, R², MAE, MSE on log1p(counts per 10,000); QCPR at 3/4/5 MADs "
                       "when --samples is given.")
    p.add_argument("predictions", help=".h5ad written by 'spartha predict'")
    p.add_argument("observed", help=".h5ad with the observed raw counts of the same spots")
    p.add_argument("--samples", help="NetCDF of draws from 'spartha predict --samples' (enables QCPR)")
    p.add_argument("--panel", nargs="*", help="text files of gene names, one extra panel each (named by the file)")
    p.add_argument("--method", default="spartha", help="row name in the table")
    p.add_argument("--seed", type=int, default=0, help="seed recorded with the metrics")
    p.add_argument("--json", help="write the metric records to this JSON file")
    _common(p)
    p.set_defaults(func=cmd_evaluate)


def _add_demo(sub) -> None:
    from .demo import __doc__ as demo_doc
    from .demo import add_arguments

    p = sub.add_parser("demo", formatter_class=_Formatter, help="the simulated main job: SPARTHA vs baselines",
                       description=demo_doc)
    add_arguments(p)
    _common(p)
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``spartha`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="spartha", description=DESCRIPTION, formatter_class=_Formatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"spartha-pyro {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{prepare,train,predict,predict-image,evaluate,demo}")
    for add in (_add_prepare, _add_train, _add_predict, _add_predict_image, _add_evaluate, _add_demo):
        add(sub)
    return parser


def read_config(path: Path, command: str) -> dict:
    """Options for ``command`` from a TOML/YAML file: top-level keys, then the ``[command]`` table.

    Parameters
    ----------
    path
        ``.toml``, ``.yaml`` or ``.yml`` file.
    command
        Subcommand name.

    Returns
    -------
    ``{dest: value}`` with dashes in keys turned into underscores.
    """
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        else:
            raise InputError(f"config file must be .toml, .yaml or .yml, got {str(path)!r}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"config file {str(path)!r} is not valid: {err}") from None
    except ImportError:
        raise InputError("YAML config files need PyYAML (pip install pyyaml); TOML needs nothing") from None
    except Exception as err:  # yaml.YAMLError without importing yaml up front
        if type(err).__module__.startswith("yaml"):
            raise InputError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        raise
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of options")
    commands = {"prepare", "train", "predict", "predict-image", "evaluate", "demo"}
    options = {k: v for k, v in data.items() if k not in commands}
    section = data.get(command) or {}
    if not isinstance(section, dict):
        raise InputError(f"[{command}] in {str(path)!r} must be a table of options")
    options.update(section)
    return {k.replace("-", "_"): v for k, v in options.items()}


def _apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """When ``argv`` names a ``--config`` file, make its values the subcommand's defaults.

    A value from the file also satisfies a required option (such as ``--out``); flags on
    the command line still win because they are parsed afterwards.
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    known, _ = pre.parse_known_args(argv)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    command = next((a for a in argv if a in subparsers), None)
    if known.config is None or command is None:
        return
    config = read_config(known.config, command)
    sub = subparsers[command]
    options = {}  # long option name (quiet, no_artifact_latent) or dest (progress) -> action
    for action in sub._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            options[action.dest] = action
            options.update({o.lstrip("-").replace("-", "_"): action for o in action.option_strings if o.startswith("--")})
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise InputError(f"unknown option(s) {unknown} for 'spartha {command}' in {str(known.config)!r} "
                         f"(positional arguments go on the command line); known: {sorted(options)}")
    defaults = {}
    for key, value in config.items():
        action = options[key]
        action.required = False
        # quiet = true (store_false), no_refit = true (--no-refit of a BooleanOptionalAction)
        negated = key != action.dest and (isinstance(action, argparse._StoreFalseAction) or key == f"no_{action.dest}")
        defaults[action.dest] = (not value) if negated else value
    sub.set_defaults(**defaults)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spartha`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Parameters
    ----------
    argv
        Command-line arguments without the program name.

    Returns
    -------
    0 on success, 2 for bad usage or input (:class:`~spartha_pyro.InputError`, a missing
    file, an existing output), 1 for any other failure.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv
    try:
        _apply_config(parser, argv)
        args = parser.parse_args(argv)
        args.func(args)
    except SystemExit as exit_:  # --help, --version (0) or a usage error (2)
        return int(exit_.code or 0)
    except (InputError, FileExistsError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"spartha: error: {err}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("spartha: interrupted", file=sys.stderr)
        return FAILURE
    except Exception as err:
        if debug:
            raise
        print(f"spartha: failed: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return FAILURE
    return OK


if __name__ == "__main__":
    sys.exit(main())
