"""Intensity histograms and radially averaged power spectra of image sets, and distances between them.

Images are (N, H, W) float32 in [0, 1]. Frequencies are in cycles per pixel of the level the images
come from (0 to 0.5, the Nyquist frequency).
"""

from __future__ import annotations

import numpy as np


def intensity_histogram(images: np.ndarray, bins: int) -> np.ndarray:
    """Probability of each of `bins` equal bins on [0, 1] over all pixels of the set (sums to 1)."""
    counts, _ = np.histogram(np.asarray(images).ravel(), bins=bins, range=(0.0, 1.0))
    total = counts.sum()
    return counts / total if total else counts.astype(np.float64)


def histogram_distances(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Wasserstein-1 (in intensity units) and Jensen-Shannon divergence (bits, in [0, 1]) of two histograms."""
    bins = len(real)
    wasserstein = np.abs(np.cumsum(real) - np.cumsum(fake)).sum() / bins
    middle = (real + fake) / 2.0

    def kl(p: np.ndarray, q: np.ndarray) -> float:
        mask = p > 0
        return float((p[mask] * np.log2(p[mask] / q[mask])).sum())

    jensen_shannon = 0.5 * kl(real, middle) + 0.5 * kl(fake, middle)
    return {"wasserstein": float(wasserstein), "jensen_shannon": float(max(jensen_shannon, 0.0))}


def radial_power_spectrum(images: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean radially averaged power spectrum of square-or-not images (N, H, W).

    Each image has its mean removed and is multiplied by a 2-D Hann window before the FFT, so borders
    add no spurious high frequencies. Power |F|^2 / (H W) is averaged over rings of radial frequency.
    Returns (bin centres in cycles/px (bins,), mean log10 power (bins,)); empty rings repeat their
    neighbour so that the curve has no gaps.
    """
    count, height, width = images.shape
    window = np.outer(np.hanning(height), np.hanning(width))
    centred = (images - images.mean(axis=(1, 2), keepdims=True)) * window
    power = np.abs(np.fft.fft2(centred)) ** 2 / (height * width)  # (N, H, W)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.fftfreq(width)[None, :]
    radius = np.hypot(fy, fx)
    edges = np.linspace(0.0, 0.5, bins + 1)
    ring = np.clip(np.digitize(radius, edges) - 1, 0, bins - 1)
    inside = radius <= 0.5
    sums = np.bincount(ring[inside], weights=power.mean(axis=0)[inside], minlength=bins)
    sizes = np.bincount(ring[inside], minlength=bins)
    mean_power = np.where(sizes > 0, sums / np.maximum(sizes, 1), np.nan)
    for index in range(bins):  # fill empty rings (tiny images) from the nearest filled one
        if np.isnan(mean_power[index]):
            filled = np.flatnonzero(~np.isnan(mean_power))
            mean_power[index] = mean_power[filled[np.abs(filled - index).argmin()]]
    centres = (edges[:-1] + edges[1:]) / 2.0
    return centres, np.log10(np.maximum(mean_power, 1e-20))


def spectrum_distance(real_log_power: np.ndarray, fake_log_power: np.ndarray) -> dict[str, float]:
    """Mean and maximum absolute difference of two log10 spectra, skipping the DC bin (decades of power)."""
    difference = np.abs(real_log_power[1:] - fake_log_power[1:])
    high = difference[len(difference) // 2:]
    return {"mean_abs_log10": float(difference.mean()), "max_abs_log10": float(difference.max()),
            "high_frequency_mean_abs_log10": float(high.mean())}
