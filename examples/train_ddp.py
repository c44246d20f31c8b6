"""Data-parallel SPARTHA training with ``torchrun`` (one process per GPU, or CPU processes).

Each rank reads the same h5ad, trains on a disjoint shard of every epoch's minibatches and
averages gradients (see :mod:`spartha_pyro.distributed`); rank 0 saves the model. With ``R``
ranks and ``--batch-size b`` every update sees ``R * b`` spots.

Usage::

    torchrun --nproc_per_node 4 examples/train_ddp.py data.h5ad model_dir --epochs 50
    torchrun --nproc_per_node 2 examples/train_ddp.py data.h5ad model_dir --device cpu   # gloo
"""
from __future__ import annotations

import argparse
import os

import anndata as ad
import torch
import torch.distributed as dist

from spartha_pyro.model import SPARTHA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("h5ad", help="training AnnData (counts in X, histology in obsm, QC in obs)")
    ap.add_argument("out", help="folder for the saved model (written by rank 0)")
    ap.add_argument("--label-keys", nargs="*", default=["cell_type"])
    ap.add_argument("--batch-key", default="slide")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256, help="spots per rank and step")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backed", action="store_true", help="read counts from disk per minibatch")
    ap.add_argument("--jit", action="store_true")
    args = ap.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    device = torch.device(f"cuda:{local_rank}") if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        adata = ad.read_h5ad(args.h5ad, backed="r" if args.backed else None)
        model = SPARTHA(adata, label_keys=args.label_keys, batch_key=args.batch_key)
        model.train(
            max_epochs=args.epochs, batch_size=args.batch_size, device=device, jit=args.jit, progress=dist.get_rank() == 0
        )
        if dist.get_rank() == 0:
            model.save(args.out, overwrite=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
