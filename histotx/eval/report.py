"""The evaluation's outputs: one table (printed with rich), ``results.csv``, ``pearson.png``, ``results.json``.

The table has one row per model × embedding mode; ``results.json`` holds every number behind it (per
gene, per fold, the folds' patients and sizes, the settings), so any figure can be recomputed.
"""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from histotx.eval.hestbench import ClassificationResult, RegressionResult
from histotx.files import atomic_write_bytes

CSV_NAME = "results.csv"
PNG_NAME = "pearson.png"
JSON_NAME = "results.json"


def build_table(
    regression: dict[tuple[str, str], RegressionResult],
    labels: dict[tuple[str, str], ClassificationResult],
    gene_groups: Mapping[str, Sequence[str]] | None,
    n_rows: int,
) -> pd.DataFrame:
    """One row per model × mode: Pearson mean ± sd over folds, per gene group, the label probe, sizes."""
    rows = []
    for (model, mode), res in regression.items():
        row: dict[str, Any] = {"model": model, "mode": mode, "pearson_mean": res.mean, "pearson_sd": res.sd}
        for group, genes in (gene_groups or {}).items():
            mean, sd, _ = res.group_mean(genes)
            row[f"pearson_{group}_mean"], row[f"pearson_{group}_sd"] = mean, sd
        if (model, mode) in labels:
            lab = labels[(model, mode)].to_json()
            row["label_bal_acc_mean"], row["label_bal_acc_sd"] = (
                lab["balanced_accuracy_mean"],
                lab["balanced_accuracy_sd"],
            )
        row.update({"n_folds": len(res.folds), "n_genes": len(res.genes), "n_tiles": n_rows, "n_nan": res.n_nan})
        row["protocol"] = "HEST" if res.off_protocol is None else "off-protocol"  # why: results.json
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(mean: float, sd: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {sd:.3f}"


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The table for people: mean ± sd in one cell, groups by name, sizes last (the CSV keeps every column)."""
    pairs = [("Pearson", "pearson_mean", "pearson_sd")]
    pairs += [
        (c[len("pearson_") : -len("_mean")], c, c[: -len("_mean")] + "_sd")
        for c in table.columns
        if c.startswith("pearson_") and c.endswith("_mean") and c != "pearson_mean"
    ]
    if "label_bal_acc_mean" in table.columns:
        pairs.append(("label bal. acc.", "label_bal_acc_mean", "label_bal_acc_sd"))
    sizes = [("folds", "n_folds"), ("genes", "n_genes"), ("tiles", "n_tiles"), ("NaN r", "n_nan")]
    lead = [c for c in ("task", "model", "mode") if c in table.columns]
    header = lead + [p[0] for p in pairs] + [s[0] for s in sizes]
    rows = [
        [str(r[c]) for c in lead]
        + [_pm(float(r[m]), float(r[sd])) for _, m, sd in pairs]
        + [str(int(r[c])) for _, c in sizes]
        for _, r in table.iterrows()
    ]
    return header, rows


def print_table(table: pd.DataFrame, header: str, console=None) -> None:
    """The table under a header that states the protocol (and the leakage guard)."""
    from rich.console import Console
    from rich.table import Table

    columns, rows = display_rows(table)
    needed = sum(max(len(c), *(len(r[i]) for r in rows)) + 3 for i, c in enumerate(columns)) + 1
    console = console or Console(width=max(needed, Console().width))  # never squeeze a number into "0…"
    rich_table = Table()
    for col in columns:
        rich_table.add_column(col, justify="left" if col in ("task", "model", "mode") else "right", no_wrap=True)
    for row in rows:
        rich_table.add_row(*row)
    console.print(textwrap.fill(header, min(console.width, 120)), markup=False, highlight=False)
    console.print(rich_table)


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, table.to_csv(index=False, float_format="%.6g").encode())
    return path


def plot_bars(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Mean Pearson (± sd over folds) per model, grouped by mode; one panel per gene group when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("pearson_mean", "pearson_sd", "all target genes")]
    panels += [
        (c, c.replace("_mean", "_sd"), c[len("pearson_") : -len("_mean")])
        for c in table.columns
        if c.startswith("pearson_") and c.endswith("_mean") and c != "pearson_mean" and table[c].notna().any()
    ]  # a group without target genes has no panel
    models = list(dict.fromkeys(table["model"]))
    modes = list(dict.fromkeys(table["mode"]))
    width = 0.8 / max(len(models), 1)
    panel_w = max(2.5, 0.5 * len(modes) * len(models) + 1.0)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_w * len(panels) + 1.0, 4.0), squeeze=False, sharey=True)
    for ax, (mean_col, sd_col, name) in zip(axes[0], panels, strict=True):
        for i, model in enumerate(models):
            rows = table[table["model"] == model].set_index("mode")
            xs = [m + (i - (len(models) - 1) / 2) * width for m in range(len(modes))]
            means = [rows[mean_col].get(mode, np.nan) for mode in modes]
            sds = [rows[sd_col].get(mode, np.nan) if sd_col in rows else 0.0 for mode in modes]
            ax.bar(xs, means, width, yerr=sds, capsize=2, label=model)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(name, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0][0].set_ylabel("Pearson r (mean over genes, folds)")
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(textwrap.fill(title, int(18 * panel_w * len(panels))), fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Strict JSON (NaN written as null)."""
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n").encode())
    return path


def write_all(table: pd.DataFrame, results: dict[str, Any], out: str | Path, header: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(table, out / CSV_NAME),
        "png": plot_bars(table, out / PNG_NAME, header),
        "json": write_json(results, out / JSON_NAME),
    }


def publish(table: pd.DataFrame, results: dict, header: str, out: Path | None, show: bool) -> pd.DataFrame:
    """Attach the results to the table (``attrs``), print it, and write CSV/PNG/JSON under ``out`` when given."""
    table.attrs["results"], table.attrs["header"] = results, header
    if show:
        print_table(table, header)
    if out is not None:
        paths = write_all(table, results, out, header)
        table.attrs["paths"] = {k: str(v) for k, v in paths.items()}
        if show:
            print("wrote " + ", ".join(str(p) for p in paths.values()))
    return table
