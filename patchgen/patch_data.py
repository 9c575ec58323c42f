"""Patches sampled from pyramid stores for the patch models.

A sample is drawn at (image, level, position). It contains the target patch at level ``l``
and the crop of level ``l + k`` under it, upsampled to the patch size. It also contains the
global coordinates of every pixel, a validity mask, the level, the pixel spacing and the
label. Only the patch's region (plus a one-pixel margin at level ``l + k``) is read, never
the whole image.

Sample keys ``(item, seed)`` fix everything a sample contains, so the same keys give the
same samples for any number of DataLoader workers, fork or spawn. A micro-batch shares one
patch size: ``PatchDataset.__getitems__`` (which ``torch.utils.data.DataLoader`` calls
with the keys of a whole micro-batch) draws the size from the batch's first key.

Patch origins along each axis (``data.position``):

* ``aligned``: uniform over the multiples of ``2 ** level_gap`` in the allowed range, so the
  coarse pixels of level ``l + k`` share edges with the patch, as the tiles of synthesis do.
* ``chunk``: a storage chunk is drawn first, then an aligned origin whose patch stays inside
  that chunk. Fewer chunks are read, but pixels near chunk edges are seen less often and
  no patch straddles a chunk edge (measured in ``benchmarks/patch_loader.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchgen.conditioning import coordinate_grid
from patchgen.config import ConfigError
from patchgen.data_order import derive_seed

POSITION_MODES = ("aligned", "chunk")
LARGE_BATCH_STREAM = 0x1A46E   # seed stream of the per-micro-batch patch size draw


@dataclass
class PatchDataConfig:
    """Settings of patch sampling from the store."""

    patch_size: int = 64           # P, pixels at the patch's level
    level_gap: int = 1             # k: conditioning comes from level l + k
    max_level: int = -1            # highest target level; -1 = every level that has a level above
    border_fraction: float = 0.25  # how far (in P) a patch may stick out of the image
    position: str = "aligned"      # "aligned" or "chunk", see the module docstring
    large_patch_size: int = 0      # pixels of the occasional larger patch; 0 disables it
    large_probability: float = 0.0  # share of micro-batches drawn at large_patch_size

    def validate(self) -> None:
        if self.level_gap not in (1, 2):
            raise ConfigError(f"data.level_gap={self.level_gap}; use 1 or 2")
        factor = 2 ** self.level_gap
        if self.patch_size < factor or self.patch_size % factor:
            raise ConfigError(f"data.patch_size={self.patch_size} must be a positive multiple "
                              f"of {factor} (2 ** data.level_gap)")
        if not 0.0 <= self.border_fraction <= 0.5:
            raise ConfigError(f"data.border_fraction={self.border_fraction} must be in [0, 0.5]")
        if self.position not in POSITION_MODES:
            raise ConfigError(f"data.position={self.position!r}; use one of {POSITION_MODES}")
        self._validate_large_patches(factor)

    def _validate_large_patches(self, factor: int) -> None:
        if not 0.0 <= self.large_probability <= 1.0:
            raise ConfigError(f"data.large_probability={self.large_probability} must be in [0, 1]")
        if self.large_patch_size == 0:
            if self.large_probability > 0:
                raise ConfigError(f"data.large_probability={self.large_probability} needs "
                                  f"data.large_patch_size > data.patch_size={self.patch_size}")
            return
        if self.large_patch_size <= self.patch_size or self.large_patch_size % factor:
            raise ConfigError(f"data.large_patch_size={self.large_patch_size} must be 0 (off) or a "
                              f"multiple of {factor} larger than data.patch_size={self.patch_size}")

    def patch_sizes(self) -> tuple[int, ...]:
        """Return every patch size a micro-batch can have, in pixels."""
        if self.large_patch_size and self.large_probability > 0:
            return (self.patch_size, self.large_patch_size)
        return (self.patch_size,)


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
    the crop of the whole upsampled level (``patchgen.conditioning.upsample_to``).
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


def origin_range(length: int, patch_size: int, border_fraction: float) -> tuple[int, int]:
    """Return the lowest and highest patch origin (both inclusive) on an axis of ``length`` px.

    A patch may stick out of the image by ``int(border_fraction * patch_size)`` pixels; an
    axis shorter than the patch always gets the whole axis plus padding.
    """
    overhang = int(border_fraction * patch_size)
    return min(0, length - patch_size) - overhang, max(0, length - patch_size) + overhang


def draw_aligned(rng: np.random.Generator, low: int, high: int, align: int) -> int:
    """Draw a uniform multiple of ``align`` in [low, high]. The range must contain one."""
    first, last = -(-low // align), high // align
    return int(rng.integers(first, last + 1)) * align


def chunk_origin_ranges(length: int, patch_size: int, chunk: int, low: int, high: int,
                        align: int) -> list[tuple[int, int]]:
    """Return, per storage chunk, the aligned origins whose patch reads only that chunk.

    Only pixels inside [0, length) are read, so a patch sticking out of the first or the last
    chunk still reads one chunk. Chunks where no aligned origin fits are left out.
    """
    ranges = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        first = start if start > 0 else low
        last = end - patch_size if end < length else high
        first, last = -(-first // align) * align, last // align * align
        if first <= last:
            ranges.append((first, last))
    return ranges


class PatchDataset(torch.utils.data.Dataset):
    """Random patches of the catalog rows, indexed by sample key ``(item, seed)``.

    The key's seed fixes the level and position, so any number of DataLoader workers (fork
    or spawn) gives the same samples. The dataset keeps only the store object, and a
    ``PyramidStore`` opens its arrays on first read, in the worker process that reads.

    Each sample is a dict: ``x0`` (1, P, P) target in [-1, 1] (-1 outside the image), ``cond``
    (1, P, P) upsampled crop of level ``l + k`` in [-1, 1], ``coords`` (2, P, P) global y/H
    and x/W in [-1, 1] inside the image, ``mask`` (1, P, P) 1 inside the image, ``level``
    and ``label`` long, ``spacing_mm`` float32 (0 = unknown), ``origin`` (2,) long (y0, x0)
    at level ``l``, and ``seed`` (the key's seed).
    """

    def __init__(self, store, rows, label_names: list[str], config: PatchDataConfig):
        self.store = store
        self.rows = rows
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.config = config
        self._chunk_shapes: dict[tuple[str, int], tuple[int, int]] = {}
        for row in rows:
            if row.levels <= config.level_gap:
                raise ConfigError(f"image {row.image_id} has {row.levels} levels; the patch "
                                  f"model needs more than data.level_gap={config.level_gap}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_chunk_shapes"] = {}
        return state

    def target_levels(self, row) -> int:
        """Return how many levels of ``row`` can be a target (level ``l + k`` exists)."""
        count = row.levels - self.config.level_gap
        if self.config.max_level >= 0:
            count = min(count, self.config.max_level + 1)
        return count

    def batch_patch_size(self, keys: list[tuple[int, int]]) -> int:
        """Draw the patch size of the micro-batch with ``keys`` from its first key's seed."""
        config = self.config
        if len(config.patch_sizes()) == 1 or not keys:
            return config.patch_size
        rng = np.random.default_rng(derive_seed(keys[0][1], LARGE_BATCH_STREAM))
        if rng.random() < config.large_probability:
            return config.large_patch_size
        return config.patch_size

    def _chunk_shape(self, image_id: str, level: int) -> tuple[int, int]:
        key = (image_id, level)
        if key not in self._chunk_shapes:
            self._chunk_shapes[key] = tuple(self.store.chunk_shape(image_id, level))
        return self._chunk_shapes[key]

    def draw_origin(self, rng: np.random.Generator, image_id: str, level: int,
                    shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
        """Draw the patch origin (y0, x0) at ``level`` as ``data.position`` sets."""
        align = 2 ** self.config.level_gap
        chunks = self._chunk_shape(image_id, level) if self.config.position == "chunk" else None
        origin = []
        for axis, length in enumerate(shape):
            low, high = origin_range(length, patch_size, self.config.border_fraction)
            ranges = []
            if chunks is not None:
                ranges = chunk_origin_ranges(length, patch_size, chunks[axis], low, high, align)
            if ranges:
                low, high = ranges[int(rng.integers(len(ranges)))]
            origin.append(draw_aligned(rng, low, high, align))
        return origin[0], origin[1]

    def patch_at(self, item: int, level: int, y0: int, x0: int, patch_size: int,
                 seed: int = 0) -> dict[str, torch.Tensor]:
        """Read the sample of catalog row ``item`` at ``level`` with top-left pixel (y0, x0)."""
        row = self.rows[item]
        height, width = self.store.level_shape(row.image_id, level)
        target, mask = self.store.read_region(row.image_id, level, y0, x0, patch_size, patch_size)
        cond = conditioning_crop(self.store, row.image_id, level, y0, x0, patch_size,
                                 self.config.level_gap)
        coords = coordinate_grid(y0, x0, patch_size, patch_size, height, width)
        return {"x0": torch.from_numpy(target * 2.0 - 1.0)[None],
                "cond": torch.from_numpy(cond * 2.0 - 1.0)[None],
                "coords": coords, "mask": torch.from_numpy(mask)[None],
                "level": torch.tensor(level), "label": torch.tensor(self.label_index[row.label]),
                "spacing_mm": torch.tensor(float(row.spacing_mm or 0.0), dtype=torch.float32),
                "origin": torch.tensor([y0, x0]), "seed": torch.tensor(seed)}

    def sample(self, key: tuple[int, int], patch_size: int) -> dict[str, torch.Tensor]:
        """Read the sample of ``key`` at ``patch_size``; the key's seed draws level and origin."""
        item, seed = key
        row = self.rows[item]
        rng = np.random.default_rng(seed)
        level = int(rng.integers(self.target_levels(row)))
        shape = self.store.level_shape(row.image_id, level)
        y0, x0 = self.draw_origin(rng, row.image_id, level, shape, patch_size)
        return self.patch_at(item, level, y0, x0, patch_size, seed)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.sample(key, self.config.patch_size)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        size = self.batch_patch_size(keys)
        return [self.sample(key, size) for key in keys]
