"""`eval classify`: train on real, synthetic and real + synthetic images; test on the real test split.

The real test split is patient-disjoint from the training split that the generators saw, because the
store assigns splits by patient. Results go to `classify.json` and `classify.html` in the output folder.
"""

from __future__ import annotations

import html
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval import report
from eval.classify import label_fidelity, metrics_with_ci, predict_proba, train_classifier
from eval.config import EvalConfig, resolve_device
from eval.data import list_synthetic, real_view, sample_rows, synthetic_view
from eval.records import not_computed, write_json

logger = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def choose_positive(config_label: str | None, train_labels: list[str], classes: list[str]) -> str:
    """Return the configured positive label, or the least frequent label of the real training split."""
    if config_label is not None:
        if config_label not in classes:
            raise ValueError(f"classify.positive_label {config_label!r} is not a label of the store ({classes})")
        return config_label
    counts = {label: train_labels.count(label) for label in classes}
    return min(classes, key=lambda label: (counts[label], label))


def _tensor(views: list[np.ndarray], size: int) -> torch.Tensor:
    if not views:
        return torch.zeros(0, 1, size, size)
    return torch.from_numpy(np.stack(views))[:, None]


def load_sets(store: Any, synthetic_dir: Path, config: EvalConfig) -> dict[str, Any]:
    """Views and class indices of real train (subsampled), real test (all) and synthetic images."""
    settings = config.classify
    size = settings.image_size
    rng = np.random.default_rng(config.seed)
    classes = store.labels()
    index = {label: i for i, label in enumerate(classes)}
    synthetic = list_synthetic(synthetic_dir)
    unknown = sorted({image.label for image in synthetic} - set(classes))
    if unknown:
        raise ValueError(f"--synthetic {synthetic_dir}: labels {unknown} do not occur in the store ({classes})")
    train_rows = sample_rows(store, "train", settings.max_real_train, rng)
    test_rows = sorted(store.rows(split="test"), key=lambda row: row.image_id)
    if not test_rows:
        raise ValueError("the store has no test split; rebuild it with a test fraction (`pyramid build --split`)")
    return {
        "classes": classes,
        "real": (_tensor([real_view(store, r.image_id, r.levels, size) for r in train_rows], size),
                 torch.tensor([index[r.label] for r in train_rows], dtype=torch.long)),
        "synthetic": (_tensor([synthetic_view(image, size) for image in synthetic], size),
                      torch.tensor([index[image.label] for image in synthetic], dtype=torch.long)),
        "test": (_tensor([real_view(store, r.image_id, r.levels, size) for r in test_rows], size),
                 np.array([index[r.label] for r in test_rows])),
        "train_labels": [r.label for r in train_rows],
    }


def training_set(name: str, sets: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and targets of a training set name: real, synthetic or real+synthetic."""
    parts = [sets[part] for part in name.split("+")]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def run_classification(real_store: Path, synthetic_dir: Path, out_dir: Path, config: EvalConfig) -> dict:
    """Train one classifier per configured training set, test each on the real test split, write the results."""
    from preprocess.store import PyramidStore

    started = time.perf_counter()
    settings = config.classify
    device = resolve_device(config.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = load_sets(PyramidStore(real_store), synthetic_dir, config)
    classes = sets["classes"]
    positive_label = choose_positive(settings.positive_label, sets["train_labels"], classes)
    positive = classes.index(positive_label)
    test_images, test_truth = sets["test"]
    rng = np.random.default_rng(config.seed)

    runs: dict[str, Any] = {}
    models = {}
    for name in settings.train_sets:
        images, targets = training_set(name, sets)
        if len(images) < 2:
            runs[name] = {metric: not_computed(f"the {name} training set has {len(images)} images") for metric in METRICS}
            continue
        logger.info("training on %s: %d images", name, len(images))
        missing = [classes[c] for c in range(len(classes)) if not (targets == c).any()]
        if missing:
            logger.warning("the %s training set has no image of %s; its test metrics show that", name, missing)
        models[name] = train_classifier(images, targets, len(classes), settings, config.seed, device)
        probabilities = predict_proba(models[name], test_images)
        runs[name] = metrics_with_ci(probabilities, test_truth, positive, settings.bootstrap, settings.confidence, rng)
        runs[name]["n_train"] = int(len(images))
        runs[name]["n_train_per_label"] = {classes[c]: int((targets == c).sum()) for c in range(len(classes))}
        runs[name]["labels_missing_in_training"] = missing

    fidelity = {"overall": not_computed("no classifier was trained on the real training split")}
    if "real" in models:
        synthetic_images, intended = sets["synthetic"]
        fidelity = label_fidelity(predict_proba(models["real"], synthetic_images), intended.numpy(), classes,
                                  settings.bootstrap, settings.confidence, rng)
    result = {"inputs": {"real_store": str(Path(real_store).resolve()),
                         "synthetic_dir": str(Path(synthetic_dir).resolve())},
              "classes": classes, "positive_label": positive_label,
              "test": {"n": int(len(test_truth)),
                       "per_label": {classes[c]: int((test_truth == c).sum()) for c in range(len(classes))}},
              "runs": runs, "label_fidelity": fidelity, "config": {"classify": vars(settings), "seed": config.seed},
              "runtime_s": round(time.perf_counter() - started, 2)}
    write_json(out_dir / "classify.json", result)
    write_classify_report(out_dir / "classify.html", result)
    return result


def write_classify_report(path: Path, result: dict[str, Any]) -> None:
    """Write a one-table HTML page of the classification results with their intervals."""
    rows = [[name, f"<td>{run.get('n_train', 0)}</td>", ", ".join(run.get("labels_missing_in_training", [])) or "none",
             *[report.format_record(run[m]) for m in METRICS]] for name, run in result["runs"].items()]
    fidelity_rows = [[name, report.format_record(record)] for name, record in result["label_fidelity"].items()]
    confidence = result["config"]["classify"]["confidence"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>femurgen classifier utility</title>"
            f"<style>{report.STYLE}</style></head><body><h1>Classifier utility (train on X, test on real)</h1>"
            f"<p>Test split: {result['test']['n']} real images {html.escape(str(result['test']['per_label']))}; "
            f"positive label: {html.escape(result['positive_label'])}; intervals: {confidence:.0%} bootstrap.</p>"
            + report.table(["trained on", "n train", "labels missing in training", "AUC", "accuracy", "sensitivity",
                            "specificity"], rows)
            + "<h2>Label fidelity</h2><p>Share of synthetic images that the real-trained classifier assigns to the "
              "label they were generated for.</p>" + report.table(["label", "agreement"], fidelity_rows)
            + "</body></html>")
    Path(path).write_text(page, encoding="utf-8")
