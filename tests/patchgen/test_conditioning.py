"""Global coordinates and level upsampling shared by training and synthesis."""

import pytest
import torch

from patchgen.conditioning import coordinate_grid, level_shape, upsample_to


@pytest.mark.parametrize("shape", [(13, 17), (101, 70), (1, 2), (64, 64)])
def test_grid_spans_minus_one_to_one(shape):
    height, width = shape
    grid = coordinate_grid(0, 0, height, width, height, width)
    assert grid.shape == (2, height, width)
    assert grid[0, 0, 0] == pytest.approx(1 / height - 1)
    assert grid[0, -1, 0] == pytest.approx(1 - 1 / height)
    assert grid[1, 0, -1] == pytest.approx(1 - 1 / width)


def test_patch_grid_is_slice_of_whole_grid():
    whole = coordinate_grid(0, 0, 45, 61, 45, 61)
    patch = coordinate_grid(10, 23, 16, 16, 45, 61)
    assert torch.equal(patch, whole[:, 10:26, 23:39])


def test_grid_axes_use_their_own_length():
    grid = coordinate_grid(0, 0, 10, 40, 10, 40)
    assert grid[0, :, 0].max() == pytest.approx(0.9)
    assert grid[1, 0, :].max() == pytest.approx(1 - 1 / 40)


def test_padded_patch_coordinates_leave_range():
    grid = coordinate_grid(-4, 0, 8, 8, 20, 20)
    assert grid[0, 0, 0] < -1
    assert grid[0, 4, 0] == pytest.approx(1 / 20 - 1)


def test_level_shapes_keep_odd_rows():
    shapes = [level_shape((13, 17), level) for level in range(5)]
    assert shapes == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]


def test_upsample_crops_to_odd_shape():
    above = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    up = upsample_to(above, (5, 7))
    assert up.shape == (1, 1, 5, 7)
    assert up[0, 0, 0, 0] == above[0, 0, 0, 0]


def test_upsample_of_constant_is_constant():
    above = torch.full((1, 1, 4, 5), 0.25)
    assert torch.allclose(upsample_to(above, (8, 9)), torch.full((1, 1, 8, 9), 0.25))


def test_upsample_rejects_too_large_target():
    with pytest.raises(ValueError, match="larger than"):
        upsample_to(torch.zeros(1, 1, 3, 3), (7, 6))

