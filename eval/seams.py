"""Seam score: gradient magnitude on tile borders divided by the gradient magnitude elsewhere.

A canvas assembled from overlapping tiles has its possible seams where a tile starts or ends. The
tile grid comes from the synthetic image's sidecar: {"level", "tile_size", "overlap", "origins_yx"},
origins in pixels of that level. A score near 1 means borders look like the rest of the image; a
visible seam raises it above 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def tile_edge_mask(shape: tuple[int, int], tile_grid: dict[str, Any], band: int) -> np.ndarray:
    """Boolean (H, W) mask of pixels within `band` px of a tile edge that lies inside the image.

    Grids at level l > 0 are scaled by 2^l to the native pixels of `shape`. Edges on the image
    border are not seams and are left out.
    """
    height, width = shape
    scale = 2 ** int(tile_grid.get("level", 0))
    tile = int(tile_grid["tile_size"]) * scale
    rows, cols = set(), set()
    for y0, x0 in tile_grid["origins_yx"]:
        y0, x0 = int(y0) * scale, int(x0) * scale
        rows.update(edge for edge in (y0, y0 + tile) if 0 < edge < height)
        cols.update(edge for edge in (x0, x0 + tile) if 0 < edge < width)
    mask = np.zeros(shape, bool)
    for edge in rows:  # a seam between rows edge-1 and edge
        mask[max(edge - band, 0):min(edge + band, height), :] = True
    for edge in cols:
        mask[:, max(edge - band, 0):min(edge + band, width)] = True
    return mask


def seam_score(image: np.ndarray, tile_grid: dict[str, Any], band: int = 1) -> float | None:
    """Mean central-difference gradient magnitude on tile edges / elsewhere, for (H, W) in [0, 1].

    Returns None when the grid has no inner edge (a single tile) or the image has no gradient off
    the edges (a flat image), because the ratio is undefined then.
    """
    mask = tile_edge_mask(image.shape, tile_grid, band)
    if not mask.any() or mask.all():
        return None
    gy, gx = np.gradient(image.astype(np.float64))
    magnitude = np.hypot(gy, gx)
    elsewhere = magnitude[~mask].mean()
    if elsewhere <= 1e-12:
        return None
    return float(magnitude[mask].mean() / elsewhere)
