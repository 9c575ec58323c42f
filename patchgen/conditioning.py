"""Conditioning inputs shared by patch training and tiled synthesis.

The patch model sees, for every pixel of a patch at pyramid level ``l``:

* the image one level above (``l + k``), upsampled to level ``l``;
* two channels of global coordinates, ``y / H`` and ``x / W`` of the pixel in the
  whole level-``l`` image, mapped to [-1, 1] with each axis scaled by its own length;
* a validity mask, 1 inside the image and 0 in padding.

Training (``patchgen.data``) and synthesis (``stitching``) both call these
functions, so the model sees the same inputs in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pixel_centre(index: torch.Tensor, length: int) -> torch.Tensor:
    """Map pixel indices to normalised centre coordinates in [-1, 1].

    Pixel ``i`` of an axis of ``length`` pixels covers [i, i + 1), so its centre is at
    ``(i + 0.5) / length``; that fraction is mapped linearly from [0, 1] to [-1, 1].
    Indices outside [0, length) give values outside [-1, 1], which is what padded
    border patches get.
    """
    return (index.to(torch.float32) + 0.5) / float(length) * 2.0 - 1.0


def coordinate_grid(y0: int, x0: int, height: int, width: int,
                    full_height: int, full_width: int) -> torch.Tensor:
    """Return the global coordinate channels of a patch.

    Args:
        y0, x0: top-left pixel of the patch in the level image (may be negative or run
            past the border for padded patches).
        height, width: patch size in pixels.
        full_height, full_width: size of the whole level image in pixels.

    Returns:
        (2, height, width) float32: channel 0 is y / H, channel 1 is x / W, both in
        [-1, 1] for pixels inside the image.
    """
    if full_height <= 0 or full_width <= 0:
        raise ValueError(f"image size must be positive, got {full_height}x{full_width}")
    ys = pixel_centre(torch.arange(y0, y0 + height), full_height)
    xs = pixel_centre(torch.arange(x0, x0 + width), full_width)
    grid_y = ys[:, None].expand(height, width)
    grid_x = xs[None, :].expand(height, width)
    return torch.stack([grid_y, grid_x]).contiguous()


def level_shape(native_shape: tuple[int, int], level: int) -> tuple[int, int]:
    """Return the (H, W) of pyramid ``level`` for a native (level 0) size.

    Each level halves the previous one rounding up, so no row or column is lost:
    13 x 17 -> 7 x 9 -> 4 x 5 -> 2 x 3 -> 1 x 2.
    """
    height, width = native_shape
    for _ in range(level):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    return height, width


def upsample_to(image_above: torch.Tensor, shape: tuple[int, int], factor: int = 2) -> torch.Tensor:
    """Upsample a crop of level ``l + k`` to level ``l`` and crop it to ``shape``.

    Args:
        image_above: (B, C, h, w) tensor at the coarser level.
        shape: (H, W) wanted at the finer level; at most ``factor`` times (h, w).
        factor: ``2 ** k`` for a level gap of ``k``.

    Returns:
        (B, C, H, W) bilinear upsample (``align_corners=False``, so pixel centres of the two
        levels line up as in the pyramid), cropped at the bottom and right edge. Cropping
        is exact because level ``l + k`` was made by ceil-halving level ``l``.
    """
    height, width = shape
    up_height, up_width = image_above.shape[-2] * factor, image_above.shape[-1] * factor
    if height > up_height or width > up_width:
        raise ValueError(
            f"cannot upsample {tuple(image_above.shape[-2:])} by {factor} to {shape}: "
            f"the target is larger than {up_height}x{up_width}")
    upsampled = F.interpolate(image_above, size=(up_height, up_width), mode="bilinear",
                              align_corners=False, antialias=False)
    return upsampled[..., :height, :width]
