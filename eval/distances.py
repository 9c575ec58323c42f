"""Distances between real and synthetic feature sets: FID, KID and precision/recall/density/coverage.

Inputs are feature tables (N, D) from eval.features. KID is computed by torchmetrics with a
pass-through `feature` module. FID is computed here in float64 from the singular values of a
cross-product matrix: torchmetrics' FID takes the eigenvalues of a general D x D matrix, which took
41 s for D = 2048 on 2 CPU cores (torch 2.14), and the result is the same to round-off
(tests/eval/test_distances.py compares both). Precision, recall, density and coverage follow
Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models", with
k-nearest-neighbour balls in feature space.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from torchmetrics.image.kid import KernelInceptionDistance

from eval.features import PrecomputedFeatures
from eval.records import TooFewSamplesError

logger = logging.getLogger(__name__)


def check_sample_count(metric: str, count: int, required: int, which: str, allow_small: bool,
                       hard_minimum: int) -> None:
    """Raise TooFewSamplesError when `count` < `required` (a warning with allow_small, down to `hard_minimum`)."""
    if count >= required:
        return
    message = f"{metric} needs at least {required} {which} samples, got {count}"
    if allow_small and count >= hard_minimum:
        logger.warning("%s; computing anyway because --allow-small is set (the value is biased)", message)
        return
    fix = "" if count < hard_minimum else "; pass --allow-small to compute a biased value anyway"
    raise TooFewSamplesError(message + fix)


def standardize(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both feature sets with the real set's mean and standard deviation (std 0 -> 1)."""
    mean = real.mean(axis=0)
    std = real.std(axis=0)
    std[std < 1e-12] = 1.0
    return (real - mean) / std, (fake - mean) / std


def trace_sqrt_product(first: torch.Tensor, second: torch.Tensor) -> float:
    """Tr((S1 S2)^(1/2)) for S1 = first^T first and S2 = second^T second, first (n1, D), second (n2, D).

    The nonzero eigenvalues of S1 S2 are those of M M^T with M = first second^T, so the trace is the
    sum of the singular values of M (its nuclear norm): exact, real and non-negative. When both sets
    are larger than D, M is replaced by R1 R2^T from QR factors, which has the same singular values.
    """
    if min(len(first), len(second)) > first.shape[1]:
        first = torch.linalg.qr(first, mode="r").R  # (D, D)
        second = torch.linalg.qr(second, mode="r").R
    return float(torch.linalg.svdvals(first @ second.T).sum())


def frechet_distance(real: np.ndarray, fake: np.ndarray, allow_small: bool = False,
                     device: torch.device | str = "cpu") -> float:
    """Fréchet distance between Gaussians fitted to real (N, D) and fake (M, D) features.

    d^2 = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) (Heusel et al. 2017), in float64 with
    unbiased covariances, on `device`. Each set needs D + 1 samples for a full-rank covariance (2 with
    allow_small). Returns a value >= 0: round-off below zero is clipped.
    """
    dim = real.shape[1]
    check_sample_count("FID", len(real), dim + 1, f"real (feature dimension {dim})", allow_small, 2)
    check_sample_count("FID", len(fake), dim + 1, f"synthetic (feature dimension {dim})", allow_small, 2)
    return frechet_value(real, fake, device)


def frechet_value(real: np.ndarray, fake: np.ndarray, device: torch.device | str = "cpu") -> float:
    """FID of two feature tables with at least 2 rows each, without the sample-count check."""
    real64 = torch.from_numpy(np.asarray(real, np.float64)).to(device)
    fake64 = torch.from_numpy(np.asarray(fake, np.float64)).to(device)
    mean_term = float((real64.mean(0) - fake64.mean(0)).square().sum())
    # Scaled centred data X with X^T X = S (unbiased covariance).
    real_x = (real64 - real64.mean(0)) / np.sqrt(len(real64) - 1)
    fake_x = (fake64 - fake64.mean(0)) / np.sqrt(len(fake64) - 1)
    trace_term = float(real_x.square().sum() + fake_x.square().sum())
    value = mean_term + trace_term - 2.0 * trace_sqrt_product(real_x, fake_x)
    if not np.isfinite(value):
        raise ValueError(f"FID is not finite ({value}) for {len(real)} real and {len(fake)} synthetic samples")
    return max(value, 0.0)


def frechet_interval(real: np.ndarray, fake: np.ndarray, resamples: int, rng: np.random.Generator,
                     device: torch.device | str = "cpu") -> list[float] | None:
    """95% percentile bootstrap interval of the FID, resampling real and synthetic sets with replacement.

    Returns None when `resamples` is 0. Resamples repeat samples, which lowers the covariance rank,
    so they skip the sample-count check that the point estimate has already passed. FID is biased
    upward on resamples, so the interval shows the sampling spread and may lie above the estimate.
    """
    if resamples <= 0:
        return None
    values = []
    for _ in range(resamples):
        real_sample = real[rng.integers(0, len(real), len(real))]
        fake_sample = fake[rng.integers(0, len(fake), len(fake))]
        values.append(frechet_value(real_sample, fake_sample, device))
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(low), float(high)]


def kernel_distance(real: np.ndarray, fake: np.ndarray, subset_size: int, subsets: int, seed: int,
                    allow_small: bool = False) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, mean and std over subsets.

    Raises TooFewSamplesError when `subset_size` exceeds either set; with allow_small the subset size
    shrinks to the smaller set (at least 2).
    """
    smallest = min(len(real), len(fake))
    if subset_size > smallest:
        which = "real" if len(real) < len(fake) else "synthetic"
        message = f"KID subset size {subset_size} is larger than the {which} set ({smallest} samples)"
        if not allow_small or smallest < 2:
            fix = "; lower eval.distance.kid_subset_size or pass --allow-small" if smallest >= 2 else ""
            raise TooFewSamplesError(message + fix)
        logger.warning("%s; using subsets of %d because --allow-small is set", message, smallest)
        subset_size = smallest
    dim = real.shape[1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(dim), subsets=subsets,
                                         subset_size=subset_size, normalize=False)
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(fake, np.float64)), real=False)
    # torchmetrics draws the subsets from the global torch RNG; fork it so the seed applies here only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radius(features: np.ndarray, k: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour within the same set (self excluded)."""
    distances = torch.cdist(torch.from_numpy(features), torch.from_numpy(features))
    return distances.kthvalue(k + 1, dim=1).values.numpy()  # k + 1: the smallest is the sample itself


def equalize_counts(real: np.ndarray, fake: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Subsample the larger set without replacement so both have the same count."""
    count = min(len(real), len(fake))
    if len(real) > count:
        real = real[np.sort(rng.choice(len(real), count, replace=False))]
    if len(fake) > count:
        fake = fake[np.sort(rng.choice(len(fake), count, replace=False))]
    return real, fake


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int,
                                      allow_small: bool = False) -> dict[str, float]:
    """Precision, recall, density and coverage of fake (M, D) against real (N, D) with k-NN balls.

    Callers pass sets of equal size (see `equalize_counts`). Each set needs k + 1 samples; with
    allow_small k shrinks to the set size - 1 (at least 1).
    """
    smallest = min(len(real), len(fake))
    if smallest < k + 1:
        check_sample_count(f"precision/recall/density/coverage with k={k}", smallest, k + 1,
                           "real and synthetic", allow_small, 2)
        k = smallest - 1
    real64, fake64 = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    real_radius = _kth_neighbour_radius(real64, k)  # (N,)
    fake_radius = _kth_neighbour_radius(fake64, k)  # (M,)
    cross = torch.cdist(torch.from_numpy(real64), torch.from_numpy(fake64)).numpy()  # (N, M)

    inside_real_balls = cross < real_radius[:, None]  # fake j inside the ball of real i
    precision = inside_real_balls.any(axis=0).mean()
    recall = (cross < fake_radius[None, :]).any(axis=1).mean()
    density = inside_real_balls.sum(axis=0).mean() / k
    coverage = (cross.min(axis=1) < real_radius).mean()
    return {"precision": float(precision), "recall": float(recall), "density": float(density),
            "coverage": float(coverage), "k": int(k), "n": int(smallest)}
