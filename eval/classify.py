"""Classifier utility: train on real, synthetic or both, test on the real test split (TSTR).

The classifier is a MONAI ResNet or DenseNet121 on square views (long side resized, short side
zero-padded), random init by default or initialised from a local weights file. Metrics on the real
test split: AUC of the positive label against the rest, accuracy, sensitivity and specificity, each
with a percentile bootstrap interval over test images. Label fidelity: how often the real-trained
classifier predicts the label that a synthetic image was generated for.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from safetensors.torch import load_file
from torch import nn

from eval.config import ClassifyConfig
from eval.records import bootstrap_ci, computed, not_computed

logger = logging.getLogger(__name__)


def build_classifier(arch: str, classes: int, pretrained_path: str | Path | None = None) -> nn.Module:
    """Return a 2-D one-channel MONAI network with `classes` outputs, optionally initialised from a file."""
    from monai.networks import nets

    if arch == "densenet121":
        model = nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=classes)
    elif arch in ("resnet10", "resnet18", "resnet34"):
        model = getattr(nets, arch)(spatial_dims=2, n_input_channels=1, num_classes=classes)
    else:
        raise ValueError(f"classify.arch {arch!r}: expected resnet10, resnet18, resnet34 or densenet121")
    if pretrained_path:
        load_pretrained(model, Path(pretrained_path))
    return model


def load_pretrained(model: nn.Module, path: Path) -> None:
    """Copy every tensor of a safetensors or weights-only torch file whose name and shape match `model`.

    Tensors of a different shape (the class head, a 3-channel stem) are left at random init.
    """
    if not path.is_file():
        raise FileNotFoundError(f"classify.pretrained_path {path}: file not found")
    if path.suffix == ".safetensors":
        weights = load_file(str(path))
    else:
        weights = torch.load(path, map_location="cpu", weights_only=True)
        weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
    state = model.state_dict()
    matched = {k: v for k, v in weights.items() if k in state and state[k].shape == v.shape}
    if not matched:
        raise ValueError(f"classify.pretrained_path {path}: no tensor matches the {type(model).__name__} "
                         f"parameter names and shapes; pass weights of the same architecture")
    state.update(matched)
    model.load_state_dict(state)
    logger.info("loaded %d of %d tensors from %s", len(matched), len(state), path)


def augment_batch(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and gamma in [0.8, 1.25] of a batch (B, 1, S, S) in [0, 1]."""
    flip = torch.rand(len(batch), generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    gamma = torch.exp((torch.rand(len(batch), 1, 1, 1, generator=generator) - 0.5) * 0.45)
    return batch.clamp(0.0, 1.0) ** gamma


def train_classifier(images: torch.Tensor, targets: torch.Tensor, classes: int, config: ClassifyConfig,
                     seed: int, device: torch.device | str = "cpu") -> nn.Module:
    """Train a classifier on `device` from images (N, 1, S, S) in [0, 1] with integer targets (N,).

    Images stay on the host and go to the device batch by batch.

    The cross-entropy is weighted by inverse class frequency so a minority class is not ignored.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Module initialisation draws from the global RNG
        torch.manual_seed(seed)
        model = build_classifier(config.arch, classes, config.pretrained_path).to(device)
    counts = torch.bincount(targets, minlength=classes).double()
    class_weight = (counts.sum() / torch.clamp(counts, min=1.0) / classes).float().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            batch = images[index]
            if config.augment:
                batch = augment_batch(batch, generator)
            logits = model(batch.to(device) * 2.0 - 1.0)
            loss = F.cross_entropy(logits, targets[index].to(device), weight=class_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        logger.info("classifier epoch %d/%d mean loss %.4f", epoch + 1, config.epochs, total / steps_per_epoch)
    recalibrate_batchnorm(model, images, config.batch_size, device)
    return model.eval()


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int,
                          device: torch.device | str = "cpu") -> None:
    """Replace BatchNorm running statistics by their exact average over the training images.

    After a short training run the exponential running averages lag behind the weights, which skews
    eval-mode predictions; one pass without gradients fixes that.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device) * 2.0 - 1.0)


def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) of images (N, 1, S, S) in [0, 1], on the model's device."""
    device = next(model.parameters()).device
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size].to(device) * 2.0 - 1.0)
            outputs.append(F.softmax(logits, dim=1).double().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank sum (ties count half); NaN with one class only."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _rate(hits: np.ndarray, mask: np.ndarray) -> float:
    return float(hits[mask].mean()) if mask.any() else float("nan")


def classification_metrics(probabilities: np.ndarray, truth: np.ndarray, positive: int) -> dict[str, float]:
    """AUC, accuracy, sensitivity and specificity of the positive class (NaN where undefined)."""
    predicted = probabilities.argmax(axis=1)
    is_positive = truth == positive
    called_positive = predicted == positive
    return {"auc": roc_auc(probabilities[:, positive], is_positive),
            "accuracy": float((predicted == truth).mean()),
            "sensitivity": _rate(called_positive, is_positive),
            "specificity": _rate(~called_positive, ~is_positive)}


def metrics_with_ci(probabilities: np.ndarray, truth: np.ndarray, positive: int, resamples: int,
                    confidence: float, rng: np.random.Generator) -> dict[str, dict]:
    """Return each test metric as a record with a bootstrap interval over test images."""
    point = classification_metrics(probabilities, truth, positive)
    table = np.concatenate([probabilities, truth[:, None].astype(np.float64)], axis=1)  # resampled together
    records = {}
    for name, value in point.items():
        if not math.isfinite(value):
            records[name] = not_computed("undefined: the test split lacks a class this metric needs")
            continue

        def statistic(sample: np.ndarray, name: str = name) -> float:
            return classification_metrics(sample[:, :-1], sample[:, -1].astype(np.int64), positive)[name]

        interval = bootstrap_ci(table, statistic, resamples, confidence, rng)
        records[name] = computed(value, ci=list(interval) if interval else None, confidence=confidence)
    return records


def label_fidelity(probabilities: np.ndarray, intended: np.ndarray, class_names: list[str], resamples: int,
                   confidence: float, rng: np.random.Generator) -> dict:
    """Share of synthetic images whose predicted class is the one they were generated for, overall and per label."""
    if len(intended) == 0:
        return {"overall": not_computed("no synthetic images")}
    agree = (probabilities.argmax(axis=1) == intended).astype(np.float64)
    result = {}
    groups = {"overall": np.ones(len(agree), bool)}
    groups.update({class_names[c]: intended == c for c in sorted(set(intended.tolist()))})
    for name, mask in groups.items():
        interval = bootstrap_ci(agree[mask], lambda x: float(x.mean()), resamples, confidence, rng)
        result[name] = computed(agree[mask].mean(), ci=list(interval) if interval else None,
                                confidence=confidence, n=int(mask.sum()))
    return result
