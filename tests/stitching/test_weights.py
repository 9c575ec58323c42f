"""Blending weights: positive, smooth and normalised to one per pixel."""

import numpy as np
import pytest

from stitching.tiles import tile_grid
from stitching.weights import BlendWeights, raised_cosine


def test_raised_cosine_by_hand():
    window = raised_cosine(4, floor=0.1)
    # sin^2(pi * (i + 0.5) / 4) for i = 0..3 is 0.1464, 0.8536, 0.8536, 0.1464.
    expected = 0.1 + 0.9 * np.array([0.14644661, 0.85355339, 0.85355339, 0.14644661])
    np.testing.assert_allclose(window, expected, rtol=1e-7)


def test_raised_cosine_floor_must_be_positive():
    with pytest.raises(ValueError, match="floor"):
        raised_cosine(8, floor=0.0)


@pytest.mark.parametrize("shape", [(101, 70), (70, 101), (33, 33), (5, 7), (257, 129)])
@pytest.mark.parametrize("overlap", [0, 4, 16])
def test_weights_normalise_to_one(shape, overlap):
    grid = tile_grid(shape, tile_size=32, overlap=overlap)
    total = BlendWeights(grid).weight_sum()
    assert np.abs(total - 1.0).max() < 1e-6


@pytest.mark.parametrize("shape", [(101, 70), (5, 7)])
def test_weights_strictly_positive(shape):
    grid = tile_grid(shape, tile_size=32, overlap=8)
    weights = BlendWeights(grid, floor=1e-3)
    smallest = min(weights.tile_weight(index).min() for index in range(len(grid)))
    assert smallest > 0.0


def test_shifted_grid_weights_normalise():
    grid = tile_grid((101, 70), tile_size=32, overlap=8, shift=(3, 17))
    total = BlendWeights(grid).weight_sum()
    assert np.abs(total - 1.0).max() < 1e-6


def test_weights_smooth_across_tile_edge():
    grid = tile_grid((101, 70), tile_size=32, overlap=8)
    weights = BlendWeights(grid)
    # Tile 0 along its middle row: 1 where it is alone, tapering to near 0 over the 8-pixel
    # overlap with tile 1. A hard cut would step by 1 between two pixels.
    row = weights.tile_weight(0)[16]
    assert row[:24].min() > 0.99
    assert row[-1] < 0.05
    assert np.abs(np.diff(row)).max() < 0.25
