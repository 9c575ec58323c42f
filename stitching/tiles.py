"""Tile grids that cover a level canvas with overlapping square tiles.

Names: ``T`` = ``tile_size``, ``O`` = ``overlap``, ``S`` = ``stride`` = T - O, all in pixels
of the level being sampled.

Along each axis the first tile starts at 0 and the last one ends flush with the canvas
border, so every pixel is covered for any length. Origins are multiples of ``align``
(``2 ** level_gap``), the alignment of the patches the model was trained on, so a tile's
conditioning crop has the same bilinear phase as in training. The canvas is the image padded
to a multiple of ``align`` and to at least one tile (:func:`padded_shape`). The padding carries
a validity mask of 0.

Ownership: the base (unshifted) grid partitions the canvas into cells. Tile ``(r, c)`` owns
rows ``[ys[r], ys[r + 1])`` and columns ``[xs[c], xs[c + 1])``; the last tile of an axis
owns up to the border. Per-pixel random numbers (initial noise, GAN noise) are drawn cell by
cell from the owner's generator, so they do not depend on tile batches or tile order.
"""

from __future__ import annotations

from dataclasses import dataclass


def stride_of(tile_size: int, overlap: int, align: int = 1) -> int:
    """Return the stride ``T - O`` after checking that the tile and overlap are valid."""
    if tile_size < 1:
        raise ValueError(f"tile_size must be at least 1 pixel, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}) pixels, got {overlap}; "
                         f"lower it, e.g. --set canvas.overlap={tile_size // 4}")
    if align < 1 or tile_size % align or overlap % align:
        raise ValueError(f"tile_size={tile_size} and overlap={overlap} must be multiples of the "
                         f"tile alignment {align} (2 ** level_gap of the patch model)")
    return tile_size - overlap


def axis_origins(length: int, tile_size: int, overlap: int, shift: int = 0,
                 align: int = 1) -> tuple[int, ...]:
    """Return sorted tile start positions along one canvas axis of ``length`` pixels.

    The first origin is 0 and the last is ``length - T``, so tiles cover [0, length). With
    ``shift`` in [0, S), the interior origins move to ``shift + k * S``. Neighbouring
    origins are then at most ``S`` apart, so the overlap never drops below ``O``.
    An axis of at most ``T`` pixels gets the single origin 0. ``length`` (when above ``T``),
    ``shift`` and the returned origins are multiples of ``align``.
    """
    stride = stride_of(tile_size, overlap, align)
    if not 0 <= shift < stride or shift % align:
        raise ValueError(f"shift must be a multiple of {align} in [0, stride={stride}), got {shift}")
    if length > tile_size and length % align:
        raise ValueError(f"canvas length {length} is not a multiple of the alignment {align}; "
                         f"pad it with padded_shape()")
    if length <= tile_size:
        return (0,)

    last = length - tile_size
    interior = range(shift if shift > 0 else stride, last, stride)
    return tuple(sorted({0, *interior, last}))


def padded_shape(shape: tuple[int, int], tile_size: int, align: int = 1) -> tuple[int, int]:
    """Return the canvas shape: ``shape`` rounded up to a multiple of ``align`` and to one tile."""
    return tuple(max(-(-length // align) * align, tile_size) for length in shape)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one level canvas, indexed row-major.

    Attributes:
        image_shape: (H, W) of the level image in pixels.
        canvas_shape: (H', W') of the canvas: (H, W) padded to a multiple of ``align`` and
            to at least one tile.
        tile_size: T in pixels.
        overlap: O in pixels.
        align: every origin is a multiple of it.
        ys, xs: tile origins along each axis (sorted, first 0, last flush with the canvas).
    """

    image_shape: tuple[int, int]
    canvas_shape: tuple[int, int]
    tile_size: int
    overlap: int
    align: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def origins(self) -> list[tuple[int, int]]:
        """(y, x) top-left corners of all tiles, row-major."""
        return [(y, x) for y in self.ys for x in self.xs]

    def origin(self, index: int) -> tuple[int, int]:
        """Return the (y, x) top-left corner of tile ``index``."""
        row, col = divmod(index, len(self.xs))
        return self.ys[row], self.xs[col]

    def tile_slices(self, index: int) -> tuple[slice, slice]:
        """Return the canvas rows and columns of tile ``index``."""
        y, x = self.origin(index)
        return slice(y, y + self.tile_size), slice(x, x + self.tile_size)

    def owned_cells(self) -> list[tuple[int, slice, slice]]:
        """Return (tile index, rows, columns) of the cell each tile owns; cells partition the canvas."""
        row_ends = (*self.ys[1:], self.canvas_shape[0])
        col_ends = (*self.xs[1:], self.canvas_shape[1])
        cells = []
        for r, (y0, y1) in enumerate(zip(self.ys, row_ends)):
            for c, (x0, x1) in enumerate(zip(self.xs, col_ends)):
                cells.append((r * len(self.xs) + c, slice(y0, y1), slice(x0, x1)))
        return cells


def tile_grid(image_shape: tuple[int, int], tile_size: int, overlap: int,
              shift: tuple[int, int] = (0, 0), align: int = 1) -> TileGrid:
    """Cover an (H, W) level image with tiles of ``tile_size`` overlapping by ``overlap``.

    ``shift`` (dy, dx), each a multiple of ``align`` in [0, S), moves the interior tiles;
    (0, 0) is the base grid that defines pixel ownership.
    """
    height, width = image_shape
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {height}x{width}")
    canvas_shape = padded_shape(image_shape, tile_size, align)
    ys = axis_origins(canvas_shape[0], tile_size, overlap, shift[0], align)
    xs = axis_origins(canvas_shape[1], tile_size, overlap, shift[1], align)
    return TileGrid((height, width), canvas_shape, tile_size, overlap, align, ys, xs)
