"""Memorization: the nearest training image of every synthetic image, and a calibrated threshold.

Similarities are normalised cross-correlation (NCC) of low-resolution views, computed for all
pairs in batches, and cosine similarity of feature embeddings. The threshold is a quantile of the
nearest-training-image similarity of real test images, which are other patients: a synthetic image
closer to a training image than almost every real test image is flagged as a likely copy.
"""

from __future__ import annotations

import numpy as np
import torch

from eval.records import TooFewSamplesError, bootstrap_ci, computed, not_computed


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm rows (N, P) as float32; a constant row becomes all zeros."""
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    return (centred / np.maximum(norm, 1e-12)).astype(np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-norm rows (N, D) as float32 (for cosine similarity); a zero row stays zero."""
    norm = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norm, 1e-12)).astype(np.float32)


def nearest_neighbours(queries: np.ndarray, references: np.ndarray, batch_size: int = 256
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Max inner product of every query row (Q, P) over reference rows (R, P), batched over queries.

    With `normalise_rows` inputs this is the NCC, with `unit_rows` inputs the cosine similarity.
    Returns (similarity (Q,) float64, index of the nearest reference (Q,) int64).
    """
    if len(references) == 0:
        raise TooFewSamplesError("nearest-neighbour search needs at least 1 reference image, got 0")
    reference = torch.from_numpy(references)
    best, index = [], []
    for start in range(0, len(queries), batch_size):
        similarity = torch.from_numpy(queries[start:start + batch_size]) @ reference.T  # (q, R)
        value, position = similarity.max(dim=1)
        best.append(value.double().numpy())
        index.append(position.numpy())
    if not best:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(best), np.concatenate(index)


def calibrate_threshold(test_similarity: np.ndarray, quantile: float) -> float:
    """Return the `quantile` of real test-vs-train nearest-neighbour similarities."""
    if len(test_similarity) < 2:
        raise TooFewSamplesError(f"threshold calibration needs at least 2 real test images, got {len(test_similarity)}")
    return float(np.quantile(test_similarity, quantile))


def share_above(similarity: np.ndarray, threshold: float, rng: np.random.Generator,
                resamples: int = 1000) -> dict:
    """Share of images whose similarity exceeds the threshold, with a 95% bootstrap interval."""
    if len(similarity) == 0:
        return not_computed("no synthetic images")
    above = (similarity > threshold).astype(np.float64)
    interval = bootstrap_ci(above, lambda x: float(x.mean()), resamples, 0.95, rng)
    return computed(above.mean(), ci95=list(interval) if interval else None, count=int(above.sum()), n=len(above))


def memorization_table(name: str, synthetic: np.ndarray, train: np.ndarray, test: np.ndarray,
                       synthetic_labels: list[str], quantile: float, rng: np.random.Generator) -> dict:
    """Nearest training image of each synthetic row, the calibrated threshold and shares above it.

    All inputs are prepared rows (normalised for NCC or unit for cosine): synthetic (S, P), train
    (T, P), test (E, P). Returns a JSON-ready dict with per-image nearest neighbours, the overall share
    and the share per label.
    """
    similarity, nearest = nearest_neighbours(synthetic, train)
    test_similarity, _ = nearest_neighbours(test, train) if len(test) else (np.zeros(0), None)
    result: dict = {"similarity": name, "nearest_similarity": similarity.tolist(), "nearest_index": nearest.tolist()}
    try:
        threshold = calibrate_threshold(test_similarity, quantile)
    except TooFewSamplesError as error:
        result.update(threshold=not_computed(str(error)), share_above=not_computed(str(error)), per_label={})
        return result

    result["threshold"] = computed(threshold, quantile=quantile, n_test=len(test_similarity),
                                   test_nearest_mean=float(test_similarity.mean()),
                                   test_nearest_max=float(test_similarity.max()))
    result["share_above"] = share_above(similarity, threshold, rng)
    labels = np.asarray(synthetic_labels)
    result["per_label"] = {label: share_above(similarity[labels == label], threshold, rng)
                           for label in sorted(set(synthetic_labels))}
    result["above"] = (similarity > threshold).tolist()
    return result
