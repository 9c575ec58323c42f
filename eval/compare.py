"""`eval compare`: several evaluation output folders side by side in one table and one plot.

Each folder contains the metrics.json of `eval` and, when it was run, the classify.json of
`eval classify`. Every computed scalar becomes one row keyed by its path in the JSON
(`global/radiomics/all/fid`), so runs with different settings still line up where they overlap.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from eval import report

logger = logging.getLogger(__name__)

SKIPPED_KEYS = {"config", "inputs", "per_image", "nearest_similarity", "nearest_train_id", "synthetic_names",
                "above", "closest_pairs", "flagged", "real", "synthetic", "frequency_cycles_per_px",
                "real_log10_power", "synthetic_log10_power", "counts"}
SCALAR_KEYS = {"wasserstein", "jensen_shannon", "mean_abs_log10", "high_frequency_mean_abs_log10", "runtime_s"}
HEADLINE_SUFFIXES = ("/all/fid", "/all/kid", "/all/precision", "/all/recall", "ncc/share_above",
                     "seams/mean", "/auc")


def flatten_metrics(data: Any, prefix: str = "") -> dict[str, float]:
    """Map 'a/b/c' paths to values of computed records and of the known scalar fields."""
    flat: dict[str, float] = {}
    if not isinstance(data, dict):
        return flat
    if data.get("status") == "computed" and "value" in data:
        flat[prefix.rstrip("/")] = float(data["value"])
        return flat
    for key, value in data.items():
        if key in SKIPPED_KEYS and not (key in ("real", "synthetic") and prefix.startswith("diversity")):
            continue
        if key in SCALAR_KEYS and isinstance(value, (int, float)):
            flat[f"{prefix}{key}"] = float(value)
        elif isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}/"))
    return flat


def read_run(directory: Path) -> dict[str, float]:
    """Flattened metrics of one evaluation folder (metrics.json, plus classify.json under classify/)."""
    directory = Path(directory)
    metrics_file, classify_file = directory / "metrics.json", directory / "classify.json"
    if not metrics_file.is_file() and not classify_file.is_file():
        raise FileNotFoundError(f"{directory}: neither metrics.json nor classify.json found; pass the --out "
                                f"folder of `eval` or `eval classify`")
    flat = {}
    if metrics_file.is_file():
        flat.update(flatten_metrics(json.loads(metrics_file.read_text())))
    if classify_file.is_file():
        flat.update(flatten_metrics(json.loads(classify_file.read_text()), "classify/"))
    return flat


def run_names(directories: list[Path]) -> list[str]:
    """Short unique column names: folder names, with the parent added where two collide."""
    names = [Path(d).name for d in directories]
    if len(set(names)) < len(names):
        names = [f"{Path(d).parent.name}/{Path(d).name}" for d in directories]
    if len(set(names)) < len(names):
        names = [f"{i + 1}:{name}" for i, name in enumerate(names)]
    return names


def headline_plot(table: dict[str, dict[str, float]], names: list[str]) -> str:
    """Bar chart per headline metric with one bar per run; returns an <img> tag or a note."""
    keys = [k for k in table if k.endswith(HEADLINE_SUFFIXES)][:12]
    if not keys:
        return "<p class='skip'>no headline metric is computed in these runs</p>"
    columns = min(4, len(keys))
    rows = int(np.ceil(len(keys) / columns))
    figure, axes = report.pyplot().subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    for axis, key in zip(axes.ravel(), keys):
        values = [table[key].get(name, np.nan) for name in names]
        axis.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        axis.set_title(key, fontsize=8)
    for axis in axes.ravel()[len(keys):]:
        axis.axis("off")
    return f'<img src="{report.figure_data_uri(figure)}" alt="headline metrics per run">'


def compare_runs(directories: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write compare.csv and compare.html for the given evaluation folders; returns {metric: {run: value}}."""
    if len(directories) < 2:
        raise ValueError(f"eval compare needs at least 2 folders, got {len(directories)}")
    names = run_names(directories)
    runs = {name: read_run(directory) for name, directory in zip(names, directories)}
    keys = sorted({key for flat in runs.values() for key in flat})
    table = {key: {name: runs[name][key] for name in names if key in runs[name]} for key in keys}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", *names])
        for key in keys:
            writer.writerow([key, *[f"{table[key][n]:.6g}" if n in table[key] else "" for n in names]])
    rows = [[key, *[f"<td>{table[key][n]:.4g}</td>" if n in table[key] else "<td>–</td>" for n in names]]
            for key in keys]
    sources = "".join(f"<li>{html.escape(n)}: {html.escape(str(Path(d).resolve()))}</li>"
                      for n, d in zip(names, directories))
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>femurgen comparison</title>"
            f"<style>{report.STYLE}</style></head><body><h1>Evaluation runs side by side</h1><ul>{sources}</ul>"
            f"{headline_plot(table, names)}{report.table(['metric', *names], rows)}</body></html>")
    (out_dir / "compare.html").write_text(page, encoding="utf-8")
    return {"runs": names, "metrics": table}
