"""A tiny fake legacy-ST folder (counts, spot files and images, nothing else) for the
benchmark tests: mouse gene names, and one section whose table lacks genes the others have."""
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

GENES = ["mt-Co1", "mt-Nd1"] + [f"Gm{i}" for i in range(30)]
#: genes missing from section S3's table (measured in S1 and S2)
NOT_IN_S3 = ["Gm28", "Gm29"]


def legacy_st_folder(root: Path, sections=("S1", "S2", "S3", "S4"), grid=(5, 4), seed=0) -> Path:
    """counts/<S>.tsv.gz, spots/<S>_selection.tsv and images/<S>.jpg, nothing else."""
    rng = np.random.default_rng(seed)
    for sub in ("counts", "spots", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    profile = rng.gamma(0.5, 1.0, len(GENES))
    for s in sections:
        genes = [g for g in GENES if not (s == "S3" and g in NOT_IN_S3)]
        xs, ys = np.meshgrid(np.arange(2, 2 + grid[0]), np.arange(2, 2 + grid[1]))
        xs, ys = xs.ravel(), ys.ravel()
        tone = rng.uniform(60, 200, xs.size)  # the image's colour carries the expression signal
        mean = np.outer(rng.lognormal(np.log(500), 0.3, xs.size), profile / profile.sum())
        mean[:, 2:8] *= (tone[:, None] / 120.0) ** 2
        counts = rng.poisson(mean[:, [GENES.index(g) for g in genes]])
        names = [f"{x}x{y}" for x, y in zip(xs, ys)]
        with gzip.open(root / "counts" / f"{s}.tsv.gz", "wt") as fh:
            fh.write("\t" + "\t".join(genes) + "\n")
            for n, row in zip(names, counts):
                fh.write(n + "\t" + "\t".join(map(str, row)) + "\n")
        px, py = 150.0 * xs, 150.0 * ys
        with open(root / "spots" / f"{s}_selection.tsv", "w") as fh:
            fh.write("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n")
            for x, y, a, b in zip(xs, ys, px, py):
                fh.write(f"{x}\t{y}\t{x}\t{y}\t{a}\t{b}\t1\n")
        img = np.full((int(py.max()) + 400, int(px.max()) + 400, 3), 235, np.uint8)
        for a, b, t in zip(px.astype(int), py.astype(int), tone):
            img[b - 70 : b + 70, a - 70 : a + 70] = (t, 0.6 * t, 0.8 * t)
        img += rng.integers(0, 15, img.shape, dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"{s}.jpg", quality=90)
    return root
