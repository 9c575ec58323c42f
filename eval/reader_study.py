"""Blinded reader study: a shuffled set of real and synthetic images, an HTML form, a hidden key, scoring.

`make_reader_study` writes `<out>/reader/` (give only this folder to the readers: `index.html` and
`cases/case_NNN.png`) and `<out>/key.csv` (keep it). The form runs in any browser without a server
and saves the answers as a CSV file: reader, case_id, source (real | synthetic), label, confidence (1-5).
`score_reader_study` compares answer files with the key.
"""

from __future__ import annotations

import csv
import html
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.classify import roc_auc
from eval.config import EvalConfig
from eval.data import choose_level, list_synthetic, pyramid_shapes
from eval.records import computed, not_computed, write_json

ANSWER_COLUMNS = ("reader", "case_id", "source", "label", "confidence")


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """Resize (H, W) in [0, 1] so that its long side is `long_side` (antialiased bilinear)."""
    height, width = image.shape
    scale = long_side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _save_case(image: np.ndarray, path: Path) -> None:
    """Write an 8-bit PNG with no text chunks, so no file metadata hints at the source."""
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").save(path, format="PNG")


def _pick_real_rows(store: Any, count: int, rng: np.random.Generator) -> list[Any]:
    """Real rows from the test split, topped up from val and then train when the test split is too small."""
    chosen: list[Any] = []
    for split in ("test", "val", "train"):
        rows = sorted(store.rows(split=split), key=lambda row: row.image_id)
        need = count - len(chosen)
        if need <= 0:
            break
        picks = rng.choice(len(rows), size=min(need, len(rows)), replace=False) if rows else []
        chosen.extend(rows[i] for i in sorted(picks))
    return chosen


def make_reader_study(real_store: Path, synthetic_dir: Path, out_dir: Path, config: EvalConfig) -> dict[str, Any]:
    """Write the blinded reader folder and the hidden key; returns counts and paths."""
    from preprocess.store import PyramidStore

    settings = config.reader_study
    rng = np.random.default_rng(config.seed)
    store = PyramidStore(real_store)
    synthetic = list_synthetic(synthetic_dir)
    cases = []
    # NOTE: every case is resized to display_long_side, so a real image smaller than that is upsampled
    # and may look softer than a large synthetic one; readers can still tell sources apart by sharpness.
    for row in _pick_real_rows(store, settings.n_real, rng):
        shapes = [store.level_shape(row.image_id, level) for level in range(row.levels)]
        level = choose_level(shapes, settings.display_long_side)
        cases.append(("real", row.label, row.image_id, store.read_level(row.image_id, level)))
    for i in sorted(rng.choice(len(synthetic), size=min(settings.n_synthetic, len(synthetic)), replace=False)):
        image = synthetic[i]
        level = choose_level(pyramid_shapes(*image.level_shape(0)), settings.display_long_side)
        cases.append(("synthetic", image.label, image.name, image.level(level)))
    order = rng.permutation(len(cases))

    reader_dir = Path(out_dir) / "reader"
    (reader_dir / "cases").mkdir(parents=True, exist_ok=True)
    key_rows = []
    for number, index in enumerate(order, start=1):
        source, label, origin, pixels = cases[index]
        case_id = f"case_{number:03d}"
        _save_case(resize_long_side(pixels, settings.display_long_side), reader_dir / "cases" / f"{case_id}.png")
        key_rows.append({"case_id": case_id, "source": source, "label": label, "origin": origin})
    with open(Path(out_dir) / "key.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case_id", "source", "label", "origin"])
        writer.writeheader()
        writer.writerows(key_rows)
    (reader_dir / "index.html").write_text(reader_form([row["case_id"] for row in key_rows], store.labels()),
                                           encoding="utf-8")
    return {"cases": len(key_rows), "real": sum(r["source"] == "real" for r in key_rows),
            "synthetic": sum(r["source"] == "synthetic" for r in key_rows),
            "reader_dir": str(reader_dir), "key": str(Path(out_dir) / "key.csv")}


FORM_SCRIPT = """
function download(){
  const reader=document.getElementById('reader').value.trim();
  if(!reader){alert('Please enter your reader name or initials first.');return;}
  const rows=[['reader','case_id','source','label','confidence']];
  for(const id of CASES){
    const pick=n=>{const c=document.querySelector('input[name="'+id+'_'+n+'"]:checked');return c?c.value:'';};
    rows.push([reader,id,pick('source'),document.getElementById(id+'_label').value,pick('confidence')]);
  }
  const text=rows.map(r=>r.map(v=>'"'+String(v).replace(/"/g,'""')+'"').join(',')).join('\\n')+'\\n';
  const link=document.createElement('a');
  link.href=URL.createObjectURL(new Blob([text],{type:'text/csv'}));
  link.download='answers_'+reader.replace(/[^A-Za-z0-9_-]/g,'_')+'.csv';
  link.click();
}
"""


def reader_form(case_ids: list[str], labels: list[str]) -> str:
    """Return the self-contained HTML form: per case the image, real or synthetic, class and confidence 1-5."""
    options = "".join(f"<option>{html.escape(label)}</option>" for label in labels)
    blocks = []
    for case_id in case_ids:
        source = "".join(f"<label><input type='radio' name='{case_id}_source' value='{v}'> {v}</label> "
                         for v in ("real", "synthetic"))
        confidence = "".join(f"<label><input type='radio' name='{case_id}_confidence' value='{v}'> {v}</label> "
                             for v in range(1, 6))
        blocks.append(f"<section><h2>{case_id}</h2><a href='cases/{case_id}.png' target='_blank'>"
                      f"<img src='cases/{case_id}.png' alt='{case_id}' style='max-width:100%;max-height:80vh'></a>"
                      f"<p>Source: {source}</p><p>Class: <select id='{case_id}_label'><option></option>{options}"
                      f"</select></p><p>Confidence (1 = guess, 5 = certain): {confidence}</p></section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Reader study</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}section{border-top:1px solid "
            "#ccc;padding:1em 0}img{background:#000}</style></head><body><h1>Reader study</h1>"
            "<p>Each image is a real radiograph or a synthetic one, in random order. For each, choose real or "
            "synthetic, the class, and your confidence. Click an image to open it at full size. At the end, "
            "save your answers and send the CSV file back.</p><p>Reader: <input id='reader'></p>"
            + "".join(blocks)
            + "<p><button onclick='download()'>Save answers (CSV)</button></p>"
            + f"<script>const CASES={json.dumps(case_ids)};{FORM_SCRIPT}</script></body></html>")


def read_answers(paths: list[Path]) -> dict[str, dict[str, dict[str, str]]]:
    """Answers per reader and case from one or more CSV files (columns ANSWER_COLUMNS)."""
    answers: dict[str, dict[str, dict[str, str]]] = {}
    for path in paths:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = set(ANSWER_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}; expected {', '.join(ANSWER_COLUMNS)}")
            for row in reader:
                answers.setdefault(row["reader"], {})[row["case_id"]] = row
    return answers


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters over the same items; None when chance agreement is 1."""
    categories = sorted(set(first) | set(second))
    observed = np.mean([a == b for a, b in zip(first, second)])
    expected = sum((first.count(c) / len(first)) * (second.count(c) / len(second)) for c in categories)
    if expected >= 1.0:
        return None
    return float((observed - expected) / (1.0 - expected))


def score_reader(key: dict[str, dict[str, str]], answers: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Accuracy and AUC of real-vs-synthetic, class accuracy and kappa against the key for one reader."""
    cases = [c for c in key if answers.get(c, {}).get("source") in ("real", "synthetic")]
    if not cases:
        return {"answered": 0, "source_accuracy": not_computed("no case has a real/synthetic answer")}
    truth = np.array([key[c]["source"] == "synthetic" for c in cases])
    responses = [answers[c]["source"] for c in cases]
    confidence = np.array([float(answers[c].get("confidence") or 3) for c in cases])
    signed = np.where(np.array(responses) == "synthetic", confidence, -confidence)  # belief that the case is synthetic
    auc = roc_auc(signed, truth)
    labelled = [c for c in cases if answers[c].get("label")]
    kappa = cohen_kappa([key[c]["source"] for c in cases], responses)
    return {"answered": len(cases),
            "source_accuracy": computed(np.mean([s == key[c]["source"] for s, c in zip(responses, cases)])),
            "source_auc": computed(auc) if np.isfinite(auc) else not_computed("the answered cases lack real or synthetic ones"),
            "label_accuracy": computed(np.mean([answers[c]["label"] == key[c]["label"] for c in labelled]),
                                       n=len(labelled)) if labelled else not_computed("no class was answered"),
            "kappa_vs_key": computed(kappa) if kappa is not None else not_computed("one category only")}


def score_reader_study(key_path: Path, answer_paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """Score every reader against the key and the readers against each other; writes reader_scores.json."""
    with open(key_path, newline="") as handle:
        key = {row["case_id"]: row for row in csv.DictReader(handle)}
    answers = read_answers(answer_paths)
    result: dict[str, Any] = {"cases": len(key), "readers": {r: score_reader(key, a) for r, a in answers.items()}}
    agreement = {}
    for first, second in itertools.combinations(sorted(answers), 2):
        shared = [c for c in key if answers[first].get(c, {}).get("source") and answers[second].get(c, {}).get("source")]
        kappa = cohen_kappa([answers[first][c]["source"] for c in shared],
                            [answers[second][c]["source"] for c in shared]) if shared else None
        agreement[f"{first} vs {second}"] = computed(kappa, n=len(shared)) if kappa is not None else \
            not_computed("no shared answered case, or one category only")
    result["agreement_between_readers"] = agreement
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(out_dir) / "reader_scores.json", result)
    return result
