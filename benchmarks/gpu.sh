#!/usr/bin/env bash
# One bounded GPU session on one H100/H200: CUDA tests, SVI overhead, scale table.
# Typically ~6 min; every stage has a timeout, worst case ~8.6 min.
#
#   OUT=/path/to/out bash benchmarks/gpu.sh          # run from the repository root
#   WHEELS=/path/to/wheels OUT=... bash benchmarks/gpu.sh   # install missing wheels first
#
# Needs python with torch (CUDA), numpy, scipy, pandas, xarray, tqdm, h5py and the wheels of
# pyro-ppl, pyro-api, opt-einsum, anndata (+ array-api-compat, legacy-api-wrap, natsort,
# scverse-misc, zarr, numcodecs, donfig, google-crc32c, typing-extensions, packaging) and
# pytest (+ iniconfig, pluggy), and pillow if absent (spartha_pyro.io imports PIL). scanpy is
# not needed. Writes logs and JSON into $OUT.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
START=$(date +%s)
stamp() { echo "== $(( $(date +%s) - START ))s: $*"; }

nvidia-smi
if [ -n "${WHEELS:-}" ]; then
  stamp "installing wheels from $WHEELS"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" pyro-ppl anndata pytest || echo "pip install failed"
  "$PY" -c "import PIL" 2>/dev/null || "$PY" -m pip install -q --no-index --find-links "$WHEELS" pillow || echo "no pillow"
fi

# Import spartha_pyro from this checkout without installing it: the package maps the
# top-level models/ and guides/ to spartha_pyro.models / spartha_pyro.guides.
PKGROOT="$(mktemp -d)"
PKG="$PKGROOT/spartha_pyro"
mkdir -p "$PKG"
for f in "$REPO"/spartha_pyro/*; do ln -s "$f" "$PKG/"; done
ln -s "$REPO/models" "$PKG/models"
ln -s "$REPO/guides" "$PKG/guides"
export PYTHONPATH="$PKGROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$OUT"  # not the repository root: `python -m` would put its bare spartha_pyro/ first on sys.path
"$PY" -c "import torch, pyro, anndata, spartha_pyro.model; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), '| pyro', pyro.__version__, '| anndata', anndata.__version__)"

stamp "GPU tests"
timeout 75 "$PY" -m pytest -q -m gpu "$REPO/tests/test_scale.py" -p no:cacheprovider --durations=5 2>&1 | tail -15

stamp "SVI overhead (Pyro vs plain torch, same ELBO)"
for cfg in "2000 4096" "36000 4096" "1000 256"; do
  set -- $cfg
  timeout 50 "$PY" "$REPO/benchmarks/svi_overhead.py" --device cuda --n-genes "$1" --batch-size "$2" \
    --n-spots 8192 --max-steps 10 --warmup 5 --repeats 2 --json "$OUT/svi_overhead-cuda-$1g-b$2.json" 2>&1 \
    | grep -v -i warn | tail -5
done

stamp "scale: 2k/15k/36k genes x 1k/10k/100k spots, batch 4096, JitTrace_ELBO"
timeout 200 "$PY" "$REPO/benchmarks/scale.py" --device cuda --jit --batch-size 4096 --max-steps 15 --warmup 5 \
  --row-timeout 60 --overhead-json "$OUT"/svi_overhead-cuda-*.json --out "$OUT/scale-cuda.json" 2>&1 | grep -v -i warn

stamp "scale, bf16 autocast: 2k/36k genes x 10k spots"
timeout 80 "$PY" "$REPO/benchmarks/scale.py" --device cuda --jit --precision bf16 --batch-size 4096 --max-steps 15 \
  --warmup 5 --genes 2000 36000 --spots 10000 --row-timeout 35 --out "$OUT/scale-cuda-bf16.json" 2>&1 | grep -v -i warn

stamp "done"
