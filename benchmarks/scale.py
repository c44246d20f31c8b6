"""Training throughput and peak memory of SPARTHA against data size (genes × spots).

Each row runs in a fresh subprocess (so its peak memory is its own): simulate sparse counts
(:func:`_common.synthetic_adata`, CSR built directly, ~10 % non-zero), build ``SPARTHA``,
then time ``--max-steps`` training steps (after ``--warmup`` untimed ones) exactly as
``spartha_pyro.train`` runs them: loader → both ELBOs → backward → ClippedAdam. Reported:

- ``spots_per_s``: minibatch spots per second of the timed steps;
- ``peak_host_mb``: peak RSS *during training* (the kernel's high-water mark is reset just
  before; in-memory data sets are resident, so this includes them), ``setup_peak_host_mb``:
  peak RSS before training (simulation, validation and model construction);
- ``peak_gpu_mb``: ``torch.cuda.max_memory_allocated`` during training (CUDA only);
- ``data_mb``: size of the CSR counts; ``loader``: ``device`` (data resident on the
  device) or ``host`` (``--backed``: h5ad opened with ``backed="r"``, rows read per step);
- ``svi_overhead``: Pyro / plain-torch step time from ``--overhead-json`` files written by
  ``svi_overhead.py`` (matched on device, genes and batch size), else ``null``.

Usage::

    python benchmarks/scale.py --device cpu --max-steps 5 --skip-above-nnz 1.5e8
    python benchmarks/scale.py --device cuda --batch-size 4096 --jit --max-steps 20
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spartha_pyro.config import ModelConfig  # light: the package imports its heavy parts lazily

HERE = Path(__file__).resolve().parent
GENES = (2000, 15000, 36000)
SPOTS = (1000, 10000, 100000)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """``VmHWM`` of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_row(args) -> dict:
    """One (genes, spots) row in this process; returns its record."""
    import anndata as ad
    import numpy as np
    import pyro
    import torch
    from pyro.optim.clipped_adam import ClippedAdam

    sys.path.insert(0, str(HERE))
    from _common import build_model, device_name, peak_host_mb, synthetic_adata, timed_steps

    from spartha_pyro.loaders import iterate_minibatches, make_loader

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    adata = synthetic_adata(args.n_spots, args.n_genes, density=args.density)
    data_mb = (adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes) / 2**20
    tmp = None
    if args.backed:
        tmp = tempfile.TemporaryDirectory()
        adata.write_h5ad(Path(tmp.name) / "data.h5ad")
        del adata
        gc.collect()
        adata = ad.read_h5ad(Path(tmp.name) / "data.h5ad", backed="r")
    model = build_model(adata, hidden=args.hidden)
    module, data = model.module.to(device).train(), model._data
    setup_s = time.perf_counter() - t0
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the simulator's temporaries must not count as used device memory
    setup_peak_mb = peak_host_mb()  # before the reset, which also resets getrusage's ru_maxrss
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = make_loader(data, device, module.model.n_genes, "host" if args.backed else "auto")
    optim = ClippedAdam(module.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(batch):
        with autocast:  # as SPARTHA.train(precision=...)
            loss_full, loss_hist = module.loss(batch)
        optim.zero_grad(set_to_none=True)
        (loss_full + module.histology_weight * loss_hist).backward()
        optim.step()

    def batches():
        while True:  # as many epochs as the timed steps need
            order = iterate_minibatches(data.n, args.batch_size, rng, drop_last=True)
            yield from loader.batches(order)

    with pyro.validation_enabled(False), pyro.settings.context(module_local_params=not args.jit):
        pyro.clear_param_store()
        module.configure(data.n, jit=args.jit)
        spots, seconds = timed_steps(step, batches(), device, args.warmup, args.max_steps)
    record = {
        "device": device_name(device),
        "n_genes": args.n_genes,
        "n_spots": args.n_spots,
        "spots_per_s": spots / seconds,
        "peak_host_mb": _peak_rss_mb() if reset else peak_host_mb(),
        "setup_peak_host_mb": setup_peak_mb,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "data_mb": data_mb,
        "nnz_per_spot": float(np.diff(np.asarray(adata.X.indptr if not args.backed else data.counts.matrix.group["indptr"][:])).mean()),
        "loader": type(loader).__name__.replace("Loader", "").lower(),
        "batch_size": min(args.batch_size, args.n_spots),
        "hidden": args.hidden,
        "elbo": "JitTrace_ELBO" if args.jit else "Trace_ELBO",
        "precision": args.precision,
        "timed_steps": args.max_steps,
        "step_s": seconds / args.max_steps,
        "setup_s": setup_s,
        "torch_threads": torch.get_num_threads(),
        "svi_overhead": None,
    }
    if tmp is not None:
        tmp.cleanup()
    return record


def attach_overhead(rows: list[dict], paths: list[str]) -> None:
    """Copy ``ratio_jit`` / ``ratio_trace`` of svi_overhead results with the same device, genes and batch."""
    for path in paths:
        if not Path(path).is_file():  # an unmatched shell glob, or a run that timed out
            continue
        res = json.loads(Path(path).read_text())
        for row in rows:
            same = (row["device"], row["n_genes"], row["batch_size"]) == (res["device"], res["n_genes"], res["batch_size"])
            if same:
                row["svi_overhead"] = res["ratio_jit" if row["elbo"] == "JitTrace_ELBO" else "ratio_trace"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--genes", type=int, nargs="*", default=list(GENES))
    ap.add_argument("--spots", type=int, nargs="*", default=list(SPOTS))
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    ap.add_argument("--density", type=float, default=0.1, help="mean share of detected genes per spot")
    ap.add_argument("--max-steps", type=int, default=10, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per row (JIT traces here)")
    ap.add_argument("--jit", action="store_true", help="JitTrace_ELBO instead of Trace_ELBO")
    ap.add_argument("--backed", action="store_true", help="h5ad opened backed='r', host loader")
    ap.add_argument("--precision", default="32", choices=["32", "bf16"], help="as SPARTHA.train(precision=...)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-above-nnz", type=float, default=None, help="skip rows with more expected non-zeros")
    ap.add_argument("--overhead-json", nargs="*", default=[], help="svi_overhead.py results to attach")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scale-<device>.json)")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds per row before it is skipped")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n-spots", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n-genes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return []

    passthrough = [
        "--device", args.device, "--batch-size", str(args.batch_size), "--hidden", str(args.hidden),
        "--density", str(args.density), "--max-steps", str(args.max_steps), "--warmup", str(args.warmup),
    ]
    passthrough += ["--jit"] * args.jit + ["--backed"] * args.backed + ["--precision", args.precision]
    passthrough += ["--threads", str(args.threads)] if args.threads else []
    device_tag = "cpu" if args.device == "cpu" else "cuda"
    suffix = ("-backed" if args.backed else "") + ("-bf16" if args.precision == "bf16" else "")
    out = Path(args.out or HERE / "results" / f"scale-{device_tag}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "n_spots", "n_genes", "out")}
    rows, skipped = [], []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        attach_overhead(rows, args.overhead_json)
        out.write_text(json.dumps({"settings": settings, "rows": rows, "skipped": skipped}, indent=1))

    for n_genes in args.genes:
        for n_spots in args.spots:
            if args.skip_above_nnz and n_genes * n_spots * args.density > args.skip_above_nnz:
                skipped.append({"n_genes": n_genes, "n_spots": n_spots, "why": "--skip-above-nnz"})
                continue
            cmd = [sys.executable, __file__, "--one", "--n-spots", str(n_spots), "--n-genes", str(n_genes), *passthrough]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
            except subprocess.TimeoutExpired:
                skipped.append({"n_genes": n_genes, "n_spots": n_spots, "why": f"timeout {args.row_timeout}s"})
                print(f"{n_genes:>7} genes {n_spots:>7} spots: timed out", flush=True)
                save()
                continue
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            if line is None:
                why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                skipped.append({"n_genes": n_genes, "n_spots": n_spots, "why": why})
                print(f"{n_genes:>7} genes {n_spots:>7} spots: failed: {why}", flush=True)
                save()
                continue
            row = json.loads(line[4:])
            rows.append(row)
            save()
            print(
                f"{n_genes:>7} genes {n_spots:>7} spots: {row['spots_per_s']:>9.0f} spots/s  "
                f"host {row['peak_host_mb']:>7.0f} MiB  gpu {row['peak_gpu_mb'] or 0:>7.0f} MiB  "
                f"data {row['data_mb']:>7.0f} MiB  loader {row['loader']}  setup {row['setup_s']:.0f} s",
                flush=True,
            )
    print_table(rows)
    print(f"wrote {out}")
    return rows


def print_table(rows: list[dict]) -> None:
    """Markdown table of the rows."""
    print("\n| device | genes | spots | loader | batch | spots/s | step s | peak host MiB | peak GPU MiB | data MiB | SVI overhead |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "–"
        ovh = f"{r['svi_overhead']:.2f}" if r["svi_overhead"] is not None else "–"
        print(
            f"| {r['device']} | {r['n_genes']} | {r['n_spots']} | {r['loader']} | {r['batch_size']} | "
            f"{r['spots_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_host_mb']:.0f} | {gpu} | {r['data_mb']:.0f} | {ovh} |"
        )


if __name__ == "__main__":
    main()
