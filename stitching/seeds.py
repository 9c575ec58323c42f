"""Random generators derived from (seed, image index, level, tile index).

Every random draw of synthesis has a key ``(seed, image_index, level, stream, *more)``:
``stream`` names the purpose of the numbers and ``more`` contains the step and tile indices.
A key is mixed into one 63-bit integer with ``numpy.random.SeedSequence`` and seeds a fresh
generator, so a draw never depends on how tiles are batched, ordered or spread over devices.

Pixel noise on a canvas is drawn cell by cell: each tile of the base grid draws the noise
of the cell it owns (:meth:`stitching.tiles.TileGrid.owned_cells`) from its own generator.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

from patchgen.data_order import derive_seed
from stitching.tiles import TileGrid


class Stream(enum.IntEnum):
    """Purpose of a random draw; part of every key."""

    LABEL_AND_SIZE = 1
    LAYOUT = 2
    INITIAL_NOISE = 3
    STEP_NOISE = 4
    GAN_NOISE = 5
    GRID_SHIFT = 6
    SCHEDULER_STEP = 7


def key_seed(seed: int, image_index: int, level: int, stream: Stream, *more: int) -> int:
    """Return the 63-bit seed of one key."""
    if seed < 0 or image_index < 0 or level < 0:
        raise ValueError(f"seed, image index and level must be >= 0, got {seed}, {image_index}, "
                         f"{level}")
    return derive_seed(seed, image_index, level, int(stream), *more)


def numpy_rng(seed: int, image_index: int, level: int, stream: Stream, *more: int) -> np.random.Generator:
    """Return a numpy Generator for one key."""
    return np.random.default_rng(key_seed(seed, image_index, level, stream, *more))


def torch_generator(seed: int, image_index: int, level: int, stream: Stream, *more: int,
                    device: str | torch.device = "cpu") -> torch.Generator:
    """Return a torch.Generator on ``device`` for one key."""
    generator = torch.Generator(device=device)
    generator.manual_seed(key_seed(seed, image_index, level, stream, *more))
    return generator


def cell_noise(grid: TileGrid, rows: slice, key: tuple[int, ...], channels: int = 1) -> np.ndarray:
    """Draw standard normal noise for canvas rows ``rows`` from the owners' generators.

    Args:
        grid: base tile grid of the level; its owned cells define which generator draws
            which pixel.
        rows: canvas rows to fill (``start`` and ``stop`` set, step 1).
        key: ``(seed, image_index, level, stream, *more)``; the owner's tile index is appended.
        channels: number of noise channels C.

    Returns:
        (C, rows, W') float32. A pixel's value depends only on the key and its position, not
        on which rows are requested together.
    """
    start, stop = rows.start, rows.stop
    width = grid.canvas_shape[1]
    noise = np.empty((channels, stop - start, width), dtype=np.float32)
    for index, cell_rows, cell_cols in grid.owned_cells():
        top, bottom = max(cell_rows.start, start), min(cell_rows.stop, stop)
        if top >= bottom:
            continue

        generator = torch_generator(*key, index)
        cell_shape = (channels, cell_rows.stop - cell_rows.start, cell_cols.stop - cell_cols.start)
        cell = torch.randn(cell_shape, generator=generator).numpy()  # whole cell, then crop
        noise[:, top - start:bottom - start, cell_cols] = cell[:, top - cell_rows.start:bottom - cell_rows.start]
    return noise
