"""Histograms, power spectra and the seam score on images built by hand."""

import numpy as np
import pytest

from eval.seams import seam_score, tile_edge_mask
from eval.spectra import histogram_distances, intensity_histogram, radial_power_spectrum, spectrum_distance


def test_histogram_sums_to_one():
    images = np.random.default_rng(0).random((3, 16, 16))
    histogram = intensity_histogram(images, 10)
    assert histogram.sum() == pytest.approx(1.0)
    assert histogram.shape == (10,)


def test_histogram_distance_shift():
    dark = intensity_histogram(np.full((1, 8, 8), 0.05), 10)
    bright = intensity_histogram(np.full((1, 8, 8), 0.55), 10)
    distances = histogram_distances(dark, bright)
    assert distances["wasserstein"] == pytest.approx(0.5)
    assert distances["jensen_shannon"] == pytest.approx(1.0)


def test_histogram_distance_self():
    histogram = intensity_histogram(np.random.default_rng(1).random((2, 8, 8)), 16)
    distances = histogram_distances(histogram, histogram)
    assert distances["wasserstein"] == 0.0
    assert distances["jensen_shannon"] == 0.0


def test_spectrum_white_noise_flat():
    noise = np.random.default_rng(0).normal(size=(16, 64, 64))
    freqs, log_power = radial_power_spectrum(noise, 16)
    assert freqs[0] > 0.0
    assert freqs[-1] < 0.5
    assert np.ptp(log_power[2:]) < 0.3  # flat within a factor of 2


def test_spectrum_smooth_images_fall():
    noise = np.random.default_rng(0).normal(size=(8, 64, 64))
    smooth = np.cumsum(np.cumsum(noise, axis=1), axis=2)  # integrated noise: power falls with frequency
    _, log_power = radial_power_spectrum(smooth, 16)
    assert log_power[1] > log_power[-1] + 2.0


def test_spectrum_distance_self():
    _, log_power = radial_power_spectrum(np.random.default_rng(2).random((4, 32, 48)), 8)
    assert spectrum_distance(log_power, log_power)["mean_abs_log10"] == 0.0


def test_spectrum_odd_small_sizes_finite():
    _, log_power = radial_power_spectrum(np.random.default_rng(3).random((2, 7, 9)), 16)
    assert np.isfinite(log_power).all()


GRID = {"level": 0, "tile_size": 32, "overlap": 8, "origins_yx": [[0, 0], [0, 24], [24, 0], [24, 24]]}


def test_edge_mask_inner_edges_only():
    mask = tile_edge_mask((56, 56), GRID, band=1)
    assert mask[24, 5]  # top edge of the lower tiles (row 24)
    assert mask[31, 5]  # bottom edge of the upper tiles, between rows 31 and 32
    assert mask[32, 5]
    assert not mask[10, 10]
    assert not mask[0, 10]  # image border is no seam


def test_seam_score_smooth_image_near_one():
    rng = np.random.default_rng(0)
    image = rng.random((56, 56)) * 0.1 + 0.45
    assert seam_score(image, GRID) == pytest.approx(1.0, abs=0.2)


def test_seam_score_detects_step():
    image = np.full((56, 56), 0.4) + np.random.default_rng(0).random((56, 56)) * 0.01
    image[32:, :] += 0.3  # a step where the upper tiles end
    assert seam_score(image, GRID) > 3.0


def test_seam_score_single_tile_undefined():
    grid = {"level": 0, "tile_size": 64, "overlap": 0, "origins_yx": [[0, 0]]}
    assert seam_score(np.random.default_rng(0).random((64, 64)), grid) is None
