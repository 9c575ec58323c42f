"""Pyramid level shapes, antialiased halving and spacing resampling."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess import pyramid


def test_odd_shapes_keep_every_row():
    assert pyramid.level_shapes(13, 17, min_size=2) == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]


@pytest.mark.parametrize("shape", [(13, 17), (1, 5), (64, 64), (65, 3), (2, 1)])
def test_built_levels_match_shapes(shape):
    image = np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)
    levels = pyramid.build_levels(image, min_size=1)
    assert [level.shape for level in levels] == pyramid.level_shapes(*shape, min_size=1)
    assert all(level.dtype == np.uint16 for level in levels)


def test_stops_at_min_size():
    shapes = pyramid.level_shapes(2880, 2304)
    assert max(shapes[-1]) <= 64
    assert max(shapes[-2]) > 64
    assert pyramid.level_shapes(40, 50) == [(40, 50)]


def test_shape_at_level_matches_list():
    shapes = pyramid.level_shapes(1955, 1841, min_size=1)
    assert [pyramid.shape_at_level(1955, 1841, level) for level in range(len(shapes))] == shapes


def test_constant_stays_constant():
    level = pyramid.downsample_2x(np.full((13, 17), 40000, np.uint16))
    assert np.all(level == 40000)


def test_tent_weights_interior():
    image = np.zeros((8, 8), np.uint16)
    image[3, 3] = 64000
    half = pyramid.downsample_2x(image)
    # Pixel 3 is the second of output pixel 1's pair (weight 3/8) and the first outside output
    # pixel 2's pair (weight 1/8), in each axis.
    assert half[1, 1] == 64000 * 3 / 8 * 3 / 8
    assert half[2, 2] == 64000 * 1 / 8 * 1 / 8
    assert half[1, 2] == 64000 * 3 / 8 * 1 / 8


def test_odd_edge_repeats_last_row():
    image = np.zeros((3, 4), np.uint16)
    image[2] = 60000
    half = pyramid.downsample_2x(image)
    assert half.shape == (2, 2)
    # Output row 1 covers row 2 and its copy (3/8 each) and row 1 (1/8). Row 4 is outside the
    # image, so its weight is dropped and the rest renormalised.
    assert np.all(half[1] == round(60000 * 6 / 7))


def test_resample_to_spacing_shape():
    image = np.random.default_rng(0).integers(0, 65536, (100, 80)).astype(np.uint16)
    resampled = pyramid.resample_to_spacing(image, (0.1, 0.2), 0.4)
    assert resampled.shape == (25, 40)
