"""Blending weights for overlapping tiles.

Each tile carries a separable window ``w(y, x) = v(y) * v(x)`` with the raised cosine

    v(i) = floor + (1 - floor) * sin^2(pi * (i + 0.5) / T),   i = 0 .. T - 1,

which is smooth, largest at the tile centre and at least ``floor`` > 0 at the tile edge.
The normalised weight of tile ``k`` at pixel ``p`` is ``w_k(p) / sum_j w_j(p)``, so the
weights of all tiles covering a pixel sum to one. Because every tile grid is the Cartesian
product of its row and column origins, the denominator is separable too:
``sum_j w_j(y, x) = Y(y) * X(x)`` with ``Y`` and ``X`` the sums of ``v`` along each axis.
Only those two vectors are stored, never a canvas of weights.
"""

from __future__ import annotations

import numpy as np

from stitching.tiles import TileGrid

DEFAULT_FLOOR = 0.01


def raised_cosine(tile_size: int, floor: float = DEFAULT_FLOOR) -> np.ndarray:
    """Return the 1-D window ``v``: (T,) float64 in [floor, 1]."""
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"window floor must be in (0, 1], got {floor}; the weights must stay "
                         f"strictly positive")
    centres = (np.arange(tile_size, dtype=np.float64) + 0.5) / tile_size
    return floor + (1.0 - floor) * np.sin(np.pi * centres) ** 2


def axis_window_sum(origins: tuple[int, ...], length: int, window: np.ndarray) -> np.ndarray:
    """Return the sum of the 1-D windows of all tiles along an axis: (length,) float64 > 0."""
    total = np.zeros(length, dtype=np.float64)
    for origin in origins:
        total[origin:origin + window.size] += window
    if not np.all(total > 0):
        raise ValueError("tile origins leave pixels uncovered; build them with tile_grid()")
    return total


class BlendWeights:
    """Normalised blending weights of the tiles of one grid.

    ``tile_weight(k)`` is the (T, T) float32 weight of tile ``k``; summed over all tiles
    covering a pixel, the weights are one (up to float32 rounding).
    """

    def __init__(self, grid: TileGrid, floor: float = DEFAULT_FLOOR):
        self.grid = grid
        self.window = raised_cosine(grid.tile_size, floor)
        self.row_sum = axis_window_sum(grid.ys, grid.canvas_shape[0], self.window)
        self.col_sum = axis_window_sum(grid.xs, grid.canvas_shape[1], self.window)

    def tile_weight(self, index: int) -> np.ndarray:
        """Return the normalised (T, T) float32 weight of tile ``index``; every value is > 0."""
        rows, cols = self.grid.tile_slices(index)
        weight_y = self.window / self.row_sum[rows]  # (T,)
        weight_x = self.window / self.col_sum[cols]  # (T,)
        return np.outer(weight_y, weight_x).astype(np.float32)

    def weight_sum(self) -> np.ndarray:
        """Return the sum of all normalised tile weights on the canvas: (H', W') float64, all ones.

        Builds a full canvas, so it is meant for tests and diagnostics.
        """
        total = np.zeros(self.grid.canvas_shape, dtype=np.float64)
        for index in range(len(self.grid)):
            rows, cols = self.grid.tile_slices(index)
            total[rows, cols] += self.tile_weight(index)
        return total
