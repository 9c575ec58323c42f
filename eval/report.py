"""Self-contained HTML reports: every image and plot is an inline base64 PNG, so one file can be mailed.

`write_report` renders the metrics of `eval` with the image material that eval.run collects
(`figures`): grids per label, closest real/synthetic pairs, histograms, spectra and metric tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1,h2,h3{font-weight:600} table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:0.9em} th{background:#f2f2f2}
td.text,th.text{text-align:left} .skip{color:#888;font-style:italic;text-align:left} .notes{font-size:0.85em;margin-top:-1em}
.grid{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:1em} figure{margin:0;text-align:center;font-size:0.75em}
img.thumb{background:#000;display:block} .pair{display:inline-block;margin:4px 12px 12px 0;border:1px solid #ddd;padding:4px}
"""


def png_data_uri(image: np.ndarray) -> str:
    """Encode (H, W) float in [0, 1] as an 8-bit greyscale PNG data URI."""
    pixels = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def pyplot() -> Any:
    """Return matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_data_uri(figure: Any) -> str:
    """Encode a matplotlib figure as a PNG data URI and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(image: np.ndarray, caption: str) -> str:
    """Return a <figure> with an inline image and an escaped caption."""
    return (f'<figure><img class="thumb" src="{png_data_uri(image)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def format_record(record: Any, notes: list[str] | None = None) -> str:
    """Return table-cell HTML for a metric record: value with CI or std, or the reason it was skipped.

    With `notes`, a skipped record shows a note number, and its reason is appended to `notes` once.
    `notes_html` renders them under the table. Without `notes`, the reason is written into the cell.
    """
    if not isinstance(record, dict):
        return f"<td>{html.escape(str(record))}</td>"
    if record.get("status") == "not_computed":
        reason = record["reason"]
        if notes is None:
            return f'<td class="skip">not computed: {html.escape(reason)}</td>'
        if reason not in notes:
            notes.append(reason)
        number = notes.index(reason) + 1
        return f'<td class="skip" title="{html.escape(reason)}">not computed ({number})</td>'
    text = f"{record['value']:.4g}"
    interval = record.get("ci95") or record.get("ci")
    if interval:
        text += f" [{interval[0]:.3g}, {interval[1]:.3g}]"
    if "std" in record:
        text += f" ± {record['std']:.2g}"
    return f"<td>{html.escape(text)}</td>"


def notes_html(notes: list[str]) -> str:
    """Return the numbered reasons collected by `format_record`."""
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return f"<ol class='skip notes'>{items}</ol>"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """Return an HTML table; the first column is text, cells are pre-rendered <td> strings or plain text."""
    head = "".join(f'<th class="{"text" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = [c if str(c).startswith("<td") else f'<td class="text">{html.escape(str(c))}</td>' for c in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


DISTANCE_COLUMNS = ("fid", "kid", "precision", "recall", "density", "coverage")


def distance_table(distances: dict[str, Any]) -> str:
    """Rows per extractor and group (all, each label) with FID, KID and PRDC cells."""
    rows, notes = [], []
    for extractor, groups in distances.items():
        for group, records in groups.items():
            rows.append([f"{extractor} / {group}", f"<td>{records['n_real']}</td>", f"<td>{records['n_synthetic']}</td>",
                         *[format_record(records[c], notes) for c in DISTANCE_COLUMNS]])
    return table(["extractor / label", "n real", "n synthetic", "FID", "KID", "precision", "recall", "density",
                  "coverage"], rows) + notes_html(notes)


def curves_figure(entries: dict[str, dict[str, Any]], kind: str) -> str:
    """Plot real vs synthetic histograms (kind "histogram") or spectra (kind "spectrum") per level."""
    figure, axes = pyplot().subplots(1, len(entries), figsize=(4 * len(entries), 3), squeeze=False)
    for axis, (name, entry) in zip(axes[0], entries.items()):
        data = entry[kind]
        if kind == "histogram":
            x = (np.arange(len(data["real"])) + 0.5) / len(data["real"])
            axis.plot(x, data["real"], label="real")
            axis.plot(x, data["synthetic"], label="synthetic")
            axis.set_xlabel("intensity (0 = dark, 1 = dense)")
            axis.set_ylabel("share of pixels")
        else:
            axis.plot(data["frequency_cycles_per_px"], data["real_log10_power"], label="real")
            axis.plot(data["frequency_cycles_per_px"], data["synthetic_log10_power"], label="synthetic")
            axis.set_xlabel("radial frequency (cycles/px)")
            axis.set_ylabel("log10 power")
        axis.set_title(name)
        axis.legend()
    return f'<img src="{figure_data_uri(figure)}" alt="{kind} per level">'


def _section_grids(figures: dict[str, Any]) -> str:
    parts = ["<h2>Images per label</h2>"]
    for label, sets in figures.get("grids", {}).items():
        for kind in ("real", "synthetic"):
            thumbs = "".join(thumbnail(image, name) for name, image in sets[kind])
            parts.append(f"<h3>{html.escape(label)}: {kind} ({len(sets[kind])})</h3><div class='grid'>"
                         f"{thumbs or '<span class=skip>none</span>'}</div>")
    return "".join(parts)


def _section_statistics(metrics: dict[str, Any]) -> str:
    entries = {"global view": metrics["global"]}
    entries.update({name.replace("_", " "): entry for name, entry in metrics["patch"].items()
                    if isinstance(entry, dict) and entry.get("status") == "computed"})
    rows = [[name, f"<td>{e['histogram']['wasserstein']:.4g}</td>", f"<td>{e['histogram']['jensen_shannon']:.4g}</td>",
             f"<td>{e['spectrum']['mean_abs_log10']:.4g}</td>",
             f"<td>{e['spectrum']['high_frequency_mean_abs_log10']:.4g}</td>"] for name, e in entries.items()]
    return ("<h2>Intensity histograms and power spectra</h2>"
            + table(["scale", "histogram W1", "histogram JS (bits)", "spectrum mean |Δlog10|",
                     "high-frequency |Δlog10|"], rows)
            + curves_figure(entries, "histogram") + curves_figure(entries, "spectrum"))


def _section_distances(metrics: dict[str, Any]) -> str:
    parts = [f"<h2>Global distances ({metrics['global']['view_size_px']} px views)</h2>",
             distance_table(metrics["global"]["distances"]),
             f"<h2>Patch distances ({metrics['patch']['patch_size_px']} px crops)</h2>"]
    for name, entry in metrics["patch"].items():
        if not name.startswith("level_"):
            continue
        parts.append(f"<h3>{html.escape(name.replace('_', ' '))}</h3>")
        if entry.get("status") == "computed":
            parts.append(distance_table(entry["distances"]))
        else:
            parts.append(f"<p class='skip'>not computed: {html.escape(entry['reason'])}</p>")
    return "".join(parts)


def _section_diversity_seams(metrics: dict[str, Any]) -> str:
    diversity = metrics["diversity"]
    rows = [[name, format_record(diversity[name]["ms_ssim"]), format_record(diversity[name]["lpips"])]
            for name in ("real", "synthetic")]
    seams = metrics["seams"]
    seam_rows = [[name, format_record(record)] for name, record in seams.get("per_image", {}).items()]
    return ("<h2>Diversity between pairs</h2><p>Lower MS-SSIM and higher LPIPS mean more diverse images.</p>"
            + table(["set", "MS-SSIM", "LPIPS"], rows)
            + "<h2>Seam score</h2><p>Mean gradient magnitude on tile edges divided by elsewhere; 1 = no seam.</p>"
            + table(["image", "seam score"], [["mean", format_record(seams["mean"])], *seam_rows]))


def _section_memorization(metrics: dict[str, Any], figures: dict[str, Any]) -> str:
    memorization = metrics["memorization"]
    if memorization.get("status") == "not_computed":
        return f"<h2>Memorization</h2><p class='skip'>not computed: {html.escape(memorization['reason'])}</p>"
    rows = []
    for name in ("ncc", "embedding"):
        entry = memorization[name]
        rows.append([f"{entry['similarity']} / all", format_record(entry["threshold"]), format_record(entry["share_above"])])
        rows.extend([f"{entry['similarity']} / {label}", "<td></td>", format_record(record)]
                    for label, record in entry.get("per_label", {}).items())
    pairs = "".join(
        f"<div class='pair'><div class='grid'>{thumbnail(fake, 'synthetic ' + pair['synthetic'])}"
        f"{thumbnail(real, 'train ' + pair['train_id'])}</div>NCC {pair['ncc']:.3f}, cosine {pair['cosine']:.3f}"
        f"{' <b>flagged</b>' if pair['synthetic'] in memorization['flagged'] else ''}</div>"
        for pair, fake, real in figures.get("pair_images", []))
    return (f"<h2>Memorization</h2><p>Threshold: quantile {metrics['config']['memorization']['threshold_quantile']} "
            f"of the nearest-training-image similarity of {memorization['n_calibration']} real "
            f"{memorization['calibration_split']} images; {memorization['n_train']} training images searched.</p>"
            + table(["similarity / label", "threshold", "share above"], rows)
            + f"<p>Flagged: {html.escape(', '.join(memorization['flagged']) or 'none')}</p>"
            + "<h3>Closest pairs (synthetic, nearest training image by NCC)</h3>" + pairs)


def write_report(path: Path, metrics: dict[str, Any], figures: dict[str, Any]) -> None:
    """Render report.html from the metrics of eval.run.evaluate and the collected image material."""
    counts = metrics["counts"]
    count_rows = [[label, *[f"<td>{splits.get(s, 0)}</td>" for s in ("train", "val", "test")],
                   f"<td>{counts['synthetic'].get(label, 0)}</td>"]
                  for label, splits in sorted(counts["real"].items())]
    body = [f"<h1>femurgen evaluation</h1><p>Real store: {html.escape(metrics['inputs']['real_store'])}<br>"
            f"Synthetic images: {html.escape(metrics['inputs']['synthetic_dir'])}<br>"
            f"Runtime: {metrics.get('runtime_s', 0)} s</p>",
            "<h2>Counts</h2>" + table(["label", "real train", "real val", "real test", "synthetic"], count_rows),
            _section_grids(figures), _section_distances(metrics), _section_statistics(metrics),
            _section_diversity_seams(metrics), _section_memorization(metrics, figures),
            "<h2>Configuration</h2><details><summary>show</summary><pre>"
            + html.escape(json.dumps(metrics["config"], indent=2)) + "</pre></details>"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>femurgen evaluation</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    Path(path).write_text(page, encoding="utf-8")
