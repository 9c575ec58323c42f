"""Canvas arrays in host memory or on disk, and the conditioning canvas of a level.

A canvas array is a 2-D float32 array indexed ``[rows, cols]``: a numpy array, or a Zarr v3
array on disk once the canvas has at least ``disk_min_pixels`` pixels. Code that touches a
canvas reads and writes whole row bands, which both kinds serve efficiently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import numpy as np
import torch
import zarr

from patchgen.conditioning import upsample_to

CanvasArray = Union[np.ndarray, zarr.Array]

# Zarr chunk rows of disk canvases; tile-row bands of 64 to 512 rows touch few chunks.
DISK_CHUNK_ROWS = 128
DISK_CHUNK_COLS = 4096


class CanvasStore:
    """Allocate canvas arrays in host memory or, from ``disk_min_pixels`` on, as Zarr arrays.

    Args:
        work_dir: folder for disk arrays; ``None`` keeps every canvas in host memory.
        disk_min_pixels: canvases with at least this many pixels go to disk.
        band_rows: rows per band when a disk canvas is filled or read band by band.
    """

    def __init__(self, work_dir: Path | None = None, disk_min_pixels: float = math.inf,
                 band_rows: int = 1024):
        if band_rows < 1:
            raise ValueError(f"band_rows must be at least 1, got {band_rows}")
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.disk_min_pixels = disk_min_pixels
        self.band_rows = band_rows

    def uses_disk(self, shape: tuple[int, int]) -> bool:
        """Return whether a canvas of ``shape`` lives on disk."""
        return self.work_dir is not None and shape[0] * shape[1] >= self.disk_min_pixels

    def full(self, name: str, shape: tuple[int, int], value: float = 0.0) -> CanvasArray:
        """Allocate a float32 canvas of ``shape`` filled with ``value``; ``name`` names the Zarr array."""
        if not self.uses_disk(shape):
            return np.full(shape, value, dtype=np.float32)

        self.work_dir.mkdir(parents=True, exist_ok=True)
        chunks = (min(DISK_CHUNK_ROWS, shape[0]), min(DISK_CHUNK_COLS, shape[1]))
        return zarr.create_array(store=str(self.work_dir / f"{name}.zarr"), shape=shape,
                                 dtype="float32", chunks=chunks, compressors=None,
                                 fill_value=value, overwrite=True)

    def row_bands(self, shape: tuple[int, int]) -> list[slice]:
        """Split the rows of a canvas into bands: one band in memory, ``band_rows`` rows on disk."""
        rows = shape[0] if not self.uses_disk(shape) else self.band_rows
        return [slice(top, min(top + rows, shape[0])) for top in range(0, shape[0], rows)]


def conditioning_canvas(above: CanvasArray, above_shape: tuple[int, int],
                        image_shape: tuple[int, int], canvas_shape: tuple[int, int],
                        factor: int, store: CanvasStore) -> CanvasArray:
    """Upsample the level above to ``image_shape`` on a canvas padded by edge repetition.

    Args:
        above: canvas of the level above; its top-left ``above_shape`` region is the image,
            float32 in [-1, 1].
        above_shape: (h, w) of the image at the level above.
        image_shape: (H, W) of the image at this level, at most ``factor`` * (h, w).
        canvas_shape: (H', W') >= (H, W) of this level's canvas.
        factor: 2 ** level gap.

    Returns:
        (H', W') float32 canvas. Pixels outside the image repeat the nearest image pixel, as
        the patch training data pads conditioning crops. A host canvas is one band, so it
        equals :func:`upsample_to` on the whole image. A disk canvas is computed band by band
        with a halo of one row of the level above. One row is enough because bilinear
        interpolation with ``align_corners=False`` reads at most one neighbouring row on each
        side. Torch's kernel rounds differently for different input heights, so bands match
        the whole image to about 1e-7.
    """
    height, width = image_shape
    cond = store.full("cond", canvas_shape)
    for rows in store.row_bands(canvas_shape):
        # Image rows this band shows; rows below the image repeat the last one.
        top = min(rows.start, height - 1)
        bottom = max(min(rows.stop, height), top + 1)

        # Rows of the level above that those rows read, one row of halo on each side.
        first = max(top // factor - 1, 0)
        last = min(-(-bottom // factor) + 1, above_shape[0])
        band_above = np.asarray(above[first:last, :above_shape[1]], dtype=np.float32)
        upsampled_height = min((last - first) * factor, height - first * factor)
        band = upsample_to(torch.from_numpy(band_above)[None, None], (upsampled_height, width), factor)
        band = band[0, 0].numpy()  # (rows from first * factor, W)

        source_rows = np.minimum(np.arange(rows.start, rows.stop), height - 1) - first * factor
        values = band[source_rows]
        cond[rows] = np.pad(values, ((0, 0), (0, canvas_shape[1] - width)), mode="edge")
    return cond


def read_image(canvas: CanvasArray, image_shape: tuple[int, int]) -> np.ndarray:
    """Return the image region (H, W) of a canvas as a numpy float32 array."""
    height, width = image_shape
    return np.asarray(canvas[:height, :width], dtype=np.float32)
