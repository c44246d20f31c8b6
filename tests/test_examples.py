"""Each example script runs end to end, in a subprocess, with tiny settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: small models are slower with many threads on a shared CPU
ENV = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<name>`` with ``args``; returns stdout, fails with stderr's tail."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_svi_spartha(tmp_path):
    out = run_example("svi_spartha.py", "--n-spots", "150", "--n-genes", "40", "--num-epochs", "2",
                      "--num-samples", "2", cwd=tmp_path)
    assert "epoch   1" in out and "held-out section: PCC per gene" in out


def test_predict_from_histology(tmp_path):
    out_file = tmp_path / "pred.h5ad"
    out = run_example("predict_from_histology.py", "--n-spots", "150", "--n-genes", "40", "--num-epochs", "2", "--num-samples", "3", "--out", str(out_file),
                      cwd=tmp_path)
    assert out_file.exists() and out_file.with_suffix(".nc").exists()
    assert "inside the 90% interval" in out


def test_ablation(tmp_path):
    out = run_example("ablation.py", "--n-spots", "150", "--n-genes", "40", "--num-epochs", "2",
                      "--num-samples", "2", cwd=tmp_path)
    for row in ("spartha", "spatialdiva", "ridge", "QCPR"):
        assert row in out
