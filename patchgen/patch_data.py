"""Patches sampled from pyramid stores for the patch models.

A sample is (image, level, position): the target patch at level ``l``, the crop of level
``l + k`` under it upsampled to the patch size, the global coordinates of every pixel, a
validity mask, the level and the label. Only the patch's region (plus a one-pixel margin at
level ``l + k``) is read, never the whole image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchgen.conditioning import coordinate_grid
from patchgen.config import ConfigError


@dataclass
class PatchDataConfig:
    """How patches are drawn from the store."""

    patch_size: int = 64          # P, pixels at the patch's level
    level_gap: int = 1            # k: conditioning comes from level l + k
    max_level: int = -1           # highest target level; -1 = every level that has a level above
    border_fraction: float = 0.25  # how far (in P) a patch may stick out of the image

    def validate(self) -> None:
        if self.level_gap not in (1, 2):
            raise ConfigError(f"data.level_gap={self.level_gap}; use 1 or 2")
        factor = 2 ** self.level_gap
        if self.patch_size % factor:
            raise ConfigError(f"data.patch_size={self.patch_size} must be divisible by {factor}")
        if not 0.0 <= self.border_fraction <= 0.5:
            raise ConfigError(f"data.border_fraction={self.border_fraction} must be in [0, 0.5]")


def read_edge_padded(store, image_id: str, level: int, y0: int, x0: int, height: int,
                     width: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a region; pixels outside the image repeat the nearest edge pixel.

    Returns (pixels (h, w) float32 in [0, 1], mask (h, w) float32 with 1 inside the image).
    Edge repetition matches the edge handling of bilinear upsampling of a whole level.
    """
    pixels, mask = store.read_region(image_id, level, y0, x0, height, width)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return pixels, mask
    inside = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    padding = ((rows[0], height - rows[-1] - 1), (cols[0], width - cols[-1] - 1))
    return np.pad(inside, padding, mode="edge"), mask


def conditioning_crop(store, image_id: str, level: int, y0: int, x0: int, patch_size: int,
                      level_gap: int) -> np.ndarray:
    """Crop of level ``level + level_gap`` under a patch, upsampled to (P, P) in [0, 1].

    ``y0`` and ``x0`` must be multiples of ``2 ** level_gap`` so both levels share pixel
    edges. A margin of one coarse pixel on each side makes the bilinear upsample equal to
    the crop of the whole upsampled level.
    """
    factor = 2 ** level_gap
    if y0 % factor or x0 % factor:
        raise ValueError(f"patch origin ({y0}, {x0}) is not a multiple of {factor}")
    size = patch_size // factor + 2
    coarse, _ = read_edge_padded(store, image_id, level + level_gap,
                                 y0 // factor - 1, x0 // factor - 1, size, size)
    tensor = torch.from_numpy(coarse)[None, None]
    upsampled = F.interpolate(tensor, scale_factor=factor, mode="bilinear", align_corners=False)
    return upsampled[0, 0, factor:factor + patch_size, factor:factor + patch_size].numpy()


class PatchDataset(torch.utils.data.Dataset):
    """Random patches of the catalog rows, indexed by sample key ``(item, seed)``.

    The key's seed fixes the level and position, so any number of DataLoader workers (fork
    or spawn) gives the same samples. ``store`` opens its arrays lazily in each worker.
    """

    def __init__(self, store, rows, label_names: list[str], config: PatchDataConfig):
        self.store = store
        self.rows = rows
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.config = config
        for row in rows:
            if row.levels <= config.level_gap:
                raise ConfigError(f"image {row.image_id} has {row.levels} levels; the patch "
                                  f"model needs more than data.level_gap={config.level_gap}")

    def __len__(self) -> int:
        return len(self.rows)

    def target_levels(self, row) -> int:
        """Number of levels of ``row`` that can be a target (a level ``l + k`` exists)."""
        count = row.levels - self.config.level_gap
        if self.config.max_level >= 0:
            count = min(count, self.config.max_level + 1)
        return count

    def draw_position(self, rng: np.random.Generator, length: int) -> int:
        """Patch origin along one axis: even-aligned, allowed to stick out by a border fraction."""
        patch = self.config.patch_size
        factor = 2 ** self.config.level_gap
        overhang = int(self.config.border_fraction * patch)
        low = min(0, length - patch) - overhang
        high = max(0, length - patch) + overhang
        return int(rng.integers(low, high + 1)) // factor * factor

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        item, seed = key
        row = self.rows[item]
        rng = np.random.default_rng(seed)
        patch = self.config.patch_size
        level = int(rng.integers(self.target_levels(row)))
        height, width = self.store.level_shape(row.image_id, level)
        y0, x0 = self.draw_position(rng, height), self.draw_position(rng, width)

        target, mask = self.store.read_region(row.image_id, level, y0, x0, patch, patch)
        cond = conditioning_crop(self.store, row.image_id, level, y0, x0, patch, self.config.level_gap)
        coords = coordinate_grid(y0, x0, patch, patch, height, width)
        return {"x0": torch.from_numpy(target * 2.0 - 1.0)[None],
                "cond": torch.from_numpy(cond * 2.0 - 1.0)[None],
                "coords": coords, "mask": torch.from_numpy(mask)[None],
                "level": torch.tensor(level), "label": torch.tensor(self.label_index[row.label]),
                "seed": torch.tensor(seed)}
