"""Image access for evaluation: synthetic output folders, real pyramid stores, views and crops.

Every image here is float32 in [0, 1] with high = dense, as in the store. A "view" is an antialiased
square image of fixed side: the long side is resized to the side and the short side is zero-padded
symmetrically, so aspect ratio is kept and real and synthetic images go through the same function.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from preprocess.normalise import STORE_MAX
from preprocess.pyramid import downsample_2x, level_shapes, shape_at_level

logger = logging.getLogger(__name__)


class StoreLike(Protocol):
    """The part of preprocess.store.PyramidStore that eval uses."""

    def rows(self, split: str | None = None, label: str | None = None) -> list[Any]: ...
    def labels(self) -> list[str]: ...
    def level_shape(self, image_id: str, level: int) -> tuple[int, int]: ...
    def read_level(self, image_id: str, level: int) -> np.ndarray: ...
    def read_region(self, image_id: str, level: int, y0: int, x0: int, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class SyntheticImage:
    """One synthetic image of an output folder: its PNG, its sidecar and its pyramid (built on demand)."""

    name: str
    label: str
    path: Path
    sidecar: dict[str, Any]
    _levels: list[np.ndarray] = field(default_factory=list, repr=False)

    def level(self, level: int) -> np.ndarray:
        """Return pyramid level `level` (H_l, W_l) float32 in [0, 1]; level 0 is the PNG.

        Levels are built with the store's own 2x filter (preprocess.pyramid.downsample_2x) on 16-bit
        pixels, so real and synthetic pyramids differ only in content.
        """
        if not self._levels:
            self._levels.append(read_png_uint16(self.path))
        while len(self._levels) <= level:
            self._levels.append(downsample_2x(self._levels[-1]))
        return self._levels[level].astype(np.float32) / STORE_MAX

    def level_shape(self, level: int) -> tuple[int, int]:
        """Return (H, W) of a level without building it when the sidecar lists it."""
        shapes = self.sidecar.get("levels") or []
        if level < len(shapes):
            return int(shapes[level][0]), int(shapes[level][1])
        if self._levels or "height" not in self.sidecar:
            return self.level(level).shape
        return shape_at_level(int(self.sidecar["height"]), int(self.sidecar["width"]), level)

    @property
    def tile_grid(self) -> dict[str, Any] | None:
        """Return the sidecar's tile grid ({level, tile_size, overlap, origins_yx}) or None."""
        return self.sidecar.get("tile_grid")


def read_png_uint16(path: Path) -> np.ndarray:
    """Read an 8- or 16-bit greyscale PNG as (H, W) uint16 store pixels (8-bit values are scaled by 257)."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read the PNG ({error}); delete it and its .json "
                         f"sidecar, then rerun synthesize to write it again") from error
    if array.ndim == 3:
        raise ValueError(f"{path}: expected a greyscale PNG, got {array.shape[2]} channels")
    if array.dtype == np.uint8:
        return array.astype(np.uint16) * 257
    return np.clip(array, 0, STORE_MAX).astype(np.uint16)


def list_synthetic(directory: Path) -> list[SyntheticImage]:
    """List the synthetic images of an output folder (`<name>.png` with a `<name>.json` sidecar).

    PNGs without a sidecar are skipped with a warning, because their label is unknown.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--synthetic {directory}: folder not found; pass the --out folder of `synthesize`")
    images = []
    for png in sorted(directory.glob("*.png")):
        if png.name.endswith(".preview.png"):
            continue
        sidecar_path = png.with_suffix(".json")
        if not sidecar_path.is_file():
            logger.warning("skipping %s: no sidecar %s with its label", png, sidecar_path.name)
            continue
        sidecar = json.loads(sidecar_path.read_text())
        images.append(SyntheticImage(name=sidecar.get("name", png.stem), label=str(sidecar["label"]),
                                     path=png, sidecar=sidecar))
    if not images:
        raise ValueError(f"--synthetic {directory}: no <name>.png with a <name>.json sidecar found")
    return images


def square_view(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W) so that its long side is `size` (antialiased bilinear) and zero-pad to (size, size)."""
    height, width = image.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    view = torch.zeros(size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    view[top:top + new_h, left:left + new_w] = resized[0, 0].clamp(0.0, 1.0)
    return view.numpy()


def choose_level(shapes: list[tuple[int, int]], min_long_side: int) -> int:
    """Return the coarsest level whose long side is still >= `min_long_side` (level 0 when none is)."""
    chosen = 0
    for level, (height, width) in enumerate(shapes):
        if max(height, width) >= min_long_side:
            chosen = level
    return chosen


def real_view(store: StoreLike, image_id: str, levels: int, size: int) -> np.ndarray:
    """Return the square view of a stored image, read from the coarsest level that still has `size` px."""
    shapes = [store.level_shape(image_id, level) for level in range(levels)]
    level = choose_level(shapes, size)
    return square_view(store.read_level(image_id, level), size)


def pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """Return the level shapes that the store's pyramid rule gives a (height, width) image."""
    return level_shapes(height, width)


def synthetic_view(image: SyntheticImage, size: int) -> np.ndarray:
    """Return the square view of a synthetic image, from the same pyramid rule as real images."""
    height, width = image.level_shape(0)
    level = choose_level(pyramid_shapes(height, width), size)
    return square_view(image.level(level), size)


def sample_rows(store: StoreLike, split: str, count: int, rng: np.random.Generator,
                label: str | None = None) -> list[Any]:
    """Draw up to `count` catalog rows of a split ("all" = every split) without replacement, sorted by id."""
    rows = store.rows(split=None if split == "all" else split, label=label)
    rows = sorted(rows, key=lambda row: row.image_id)
    if len(rows) > count:
        index = np.sort(rng.choice(len(rows), size=count, replace=False))
        rows = [rows[i] for i in index]
    return rows


def crop_origins(shape: tuple[int, int], size: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Draw `count` top-left corners of size x size crops that lie fully inside `shape` ([] if it is smaller)."""
    height, width = shape
    if height < size or width < size:
        return []
    ys = rng.integers(0, height - size + 1, size=count)
    xs = rng.integers(0, width - size + 1, size=count)
    return list(zip(ys.tolist(), xs.tolist()))


def spread_counts(total: int, groups: int) -> list[int]:
    """Split `total` into `groups` near-equal non-negative counts."""
    base, extra = divmod(total, groups)
    return [base + (1 if i < extra else 0) for i in range(groups)]


def real_crops(store: StoreLike, rows: list[Any], level: int, size: int, count: int,
               rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Read `count` crops (N, size, size) at `level` from random rows whose level is at least size x size.

    Returns the crops and the label of each. Rows without that level or too small at it are skipped.
    """
    usable = [row for row in rows if level < row.levels and min(store.level_shape(row.image_id, level)) >= size]
    if not usable:
        return np.zeros((0, size, size), np.float32), []
    picks = rng.integers(0, len(usable), size=count)
    crops, labels = [], []
    for pick in picks:
        row = usable[pick]
        (y0, x0), = crop_origins(store.level_shape(row.image_id, level), size, 1, rng)
        pixels, _ = store.read_region(row.image_id, level, y0, x0, size, size)
        crops.append(pixels.astype(np.float32))
        labels.append(row.label)
    return np.stack(crops), labels


def synthetic_crops(images: list[SyntheticImage], level: int, size: int, count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Cut `count` crops (N, size, size) at `level`, spread evenly over the images large enough for them."""
    usable = [image for image in images if min(image.level_shape(level)) >= size]
    if not usable:
        return np.zeros((0, size, size), np.float32), []
    crops, labels = [], []
    for image, share in zip(usable, spread_counts(count, len(usable))):
        pixels = image.level(level)
        for y0, x0 in crop_origins(pixels.shape, size, share, rng):
            crops.append(pixels[y0:y0 + size, x0:x0 + size])
            labels.append(image.label)
    return np.stack(crops).astype(np.float32), labels
