"""Benchmark records -> mean ± sd over seeds -> a poster-like text table."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._errors import InputError

#: how metric names print in tables
LABELS = {
    "pcc_gene": "PCC(gene)",
    "pcc_spot": "PCC(spot)",
    "r2": "R²",
    "r2_pooled": "R²(pooled)",
    "mae": "MAE",
    "mse": "MSE",
    "qcpr3": "QCPR3",
    "qcpr4": "QCPR4",
    "qcpr5": "QCPR5",
    "qc_energy_distance": "QC energy dist.",
}


def summarize(records, by: Sequence[str] = ("method", "panel", "metric")) -> pd.DataFrame:
    """Mean ± sd over seeds of benchmark records.

    Within each seed, values are first averaged over every other key (e.g. the held-out
    sections of a leave-one-section-out run); the mean and sample sd are then taken over
    seeds.

    Parameters
    ----------
    records
        A list of dicts or a DataFrame with the columns of ``by``, ``value`` and, optionally,
        ``seed`` and ``section``.
    by
        Columns that identify one summary row.

    Returns
    -------
    DataFrame with the ``by`` columns and ``mean``, ``sd`` (NaN with one seed), ``n_seeds``.
    """
    df = pd.DataFrame(records)
    missing = [c for c in (*by, "value") if c not in df]
    if missing:
        raise InputError(f"records lack the columns {missing}")
    df = df.assign(seed=df["seed"] if "seed" in df else 0)
    per_seed = df.groupby([*by, "seed"], sort=False, dropna=False)["value"].mean().reset_index()
    out = per_seed.groupby(list(by), sort=False, dropna=False)["value"].agg(
        mean="mean", sd=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan, n_seeds="count"
    )
    return out.reset_index()


def _cell(mean: float, sd: float, digits: int) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if np.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def format_table(
    records,
    panels: Sequence[str] = ("all", "hvg"),
    metrics: Sequence[str] = ("pcc_gene", "pcc_spot", "r2", "mae", "mse"),
    qc_metrics: Sequence[str] = ("qcpr3", "qcpr4", "qcpr5"),
    methods: Sequence[str] | None = None,
    digits: int = 4,
) -> str:
    """Poster-like text tables: one block per gene panel, then a QCPR block.

    Parameters
    ----------
    records
        Raw records (passed through :func:`summarize`) or the output of :func:`summarize`.
    panels
        Panels to show, one block each, in this order (absent panels are skipped).
    metrics
        Regression metrics, the columns of each panel block.
    qc_metrics
        Columns of the QCPR block (from whatever panel they were recorded on).
    methods
        Row order; default: order of first appearance.
    digits
        Decimals.

    Returns
    -------
    The tables as one string; cells are ``mean ± sd`` over seeds, ``—`` when missing.
    """
    summary = pd.DataFrame(records)
    if "mean" not in summary:
        summary = summarize(summary)
    rows = list(methods) if methods is not None else list(pd.unique(summary["method"]))
    cell = {
        (r.method, r.panel, r.metric): _cell(r.mean, r.sd, digits) for r in summary.itertuples(index=False)
    }
    blocks = []
    for panel in panels:
        if not (summary["panel"] == panel).any():
            continue
        table = pd.DataFrame(
            {LABELS.get(m, m): [cell.get((meth, panel, m), "—") for meth in rows] for m in metrics}, index=rows
        )
        blocks.append(f"[{panel}]\n{table.to_string()}")
    qc = summary[summary["metric"].isin(qc_metrics)]
    for panel in pd.unique(qc["panel"]):
        qrows = [m for m in rows if ((qc["method"] == m) & (qc["panel"] == panel)).any()]
        table = pd.DataFrame(
            {LABELS.get(m, m): [cell.get((meth, panel, m), "—") for meth in qrows] for m in qc_metrics}, index=qrows
        )
        blocks.append(f"[QCPR, {panel}]\n{table.to_string()}")
    return "\n\n".join(blocks)
