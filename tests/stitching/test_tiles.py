"""Tile grids: coverage, flush borders, alignment and ownership."""

import numpy as np
import pytest

from stitching.tiles import axis_origins, padded_shape, tile_grid

SIZES = [(1, 1), (5, 70), (31, 32), (32, 32), (33, 33), (64, 64), (65, 200), (101, 70),
         (127, 129), (300, 47), (513, 257)]


def coverage(grid):
    count = np.zeros(grid.canvas_shape, dtype=int)
    for index in range(len(grid)):
        rows, cols = grid.tile_slices(index)
        count[rows, cols] += 1
    return count


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("align", [1, 2, 4])
def test_tiles_cover_every_pixel(shape, align):
    grid = tile_grid(shape, tile_size=32, overlap=8, align=align)
    count = coverage(grid)
    assert count.min() >= 1
    assert grid.canvas_shape[0] >= shape[0]
    assert grid.canvas_shape[1] >= shape[1]


@pytest.mark.parametrize("shape", SIZES)
def test_tiles_stay_inside_canvas(shape):
    grid = tile_grid(shape, tile_size=32, overlap=8, align=2)
    for y, x in grid.origins:
        assert 0 <= y <= grid.canvas_shape[0] - 32
        assert 0 <= x <= grid.canvas_shape[1] - 32


@pytest.mark.parametrize("shape", SIZES)
def test_last_tile_flush_with_canvas(shape):
    grid = tile_grid(shape, tile_size=32, overlap=8)
    assert grid.ys[0] == 0
    assert grid.xs[0] == 0
    assert grid.ys[-1] + 32 == grid.canvas_shape[0]
    assert grid.xs[-1] + 32 == grid.canvas_shape[1]


def test_canvas_equals_image_when_large():
    grid = tile_grid((101, 70), tile_size=32, overlap=8)
    assert grid.canvas_shape == (101, 70)


def test_canvas_padded_to_one_tile():
    grid = tile_grid((5, 70), tile_size=32, overlap=8)
    assert grid.canvas_shape == (32, 70)
    assert grid.ys == (0,)


def test_padded_shape_rounds_to_alignment():
    assert padded_shape((101, 70), 32, align=4) == (104, 72)
    assert padded_shape((3, 3), 32, align=4) == (32, 32)


@pytest.mark.parametrize("length", [34, 64, 100, 202, 1000])
@pytest.mark.parametrize("shift", [0, 2, 10, 22])
def test_neighbour_overlap_at_least_overlap(length, shift):
    origins = axis_origins(length, tile_size=32, overlap=8, shift=shift, align=2)
    gaps = np.diff(origins)
    assert gaps.max() <= 24
    assert origins[-1] == length - 32


@pytest.mark.parametrize("shift", [(0, 0), (2, 6), (22, 14)])
def test_shifted_origins_keep_alignment(shift):
    grid = tile_grid((301, 157), tile_size=32, overlap=8, shift=shift, align=2)
    assert all(y % 2 == 0 and x % 2 == 0 for y, x in grid.origins)
    assert coverage(grid).min() >= 1


def test_shift_moves_interior_tiles():
    base = tile_grid((300, 300), tile_size=32, overlap=8)
    shifted = tile_grid((300, 300), tile_size=32, overlap=8, shift=(5, 11))
    assert 5 in shifted.ys
    assert 11 in shifted.xs
    assert 5 not in base.ys


@pytest.mark.parametrize("shape", SIZES)
def test_owned_cells_partition_canvas(shape):
    grid = tile_grid(shape, tile_size=32, overlap=8, align=2)
    owners = np.full(grid.canvas_shape, -1)
    for index, rows, cols in grid.owned_cells():
        assert np.all(owners[rows, cols] == -1)
        owners[rows, cols] = index
    assert owners.min() == 0
    assert sorted(np.unique(owners)) == list(range(len(grid)))


def test_owned_cell_inside_its_tile():
    grid = tile_grid((300, 170), tile_size=32, overlap=8)
    for index, rows, cols in grid.owned_cells():
        tile_rows, tile_cols = grid.tile_slices(index)
        assert tile_rows.start <= rows.start
        assert rows.stop <= tile_rows.stop
        assert tile_cols.start <= cols.start
        assert cols.stop <= tile_cols.stop


def test_overlap_must_be_below_tile():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((100, 100), tile_size=32, overlap=32)


def test_overlap_must_match_alignment():
    with pytest.raises(ValueError, match="multiples"):
        tile_grid((100, 100), tile_size=32, overlap=7, align=2)


def test_shift_must_be_below_stride():
    with pytest.raises(ValueError, match="shift"):
        axis_origins(100, tile_size=32, overlap=8, shift=24)
