"""Reading a pyramid store: layout, Zarr format checks and :class:`PyramidStore`.

Layout of ``STORE.zarr`` (a Zarr v3 group)::

    zarr.json                     root group; attribute "femurgen" stores the build options
    images/<image_id>/            OME-NGFF 0.5 multiscale group, arrays "0".."L-1", uint16 (y, x)
    catalog.csv, failed.csv       see ``preprocess.catalog``
    .partial/                     images being written (moved into images/ when complete)

Pixel values: uint16 0..65535 stand for [0, 1], high = dense. ``PyramidStore`` reads them as
float32 in [0, 1].
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from preprocess import pyramid
from preprocess.catalog import CATALOG_NAME, CatalogRow, read_catalog
from preprocess.chunk_reader import ChunkReader
from preprocess.errors import StoreError
from preprocess.normalise import from_store_uint16

IMAGES_GROUP = "images"
PARTIAL_FOLDER = ".partial"
ZARR_V3_METADATA = "zarr.json"
ZARR_V2_METADATA = (".zgroup", ".zarray", ".zattrs", ".zmetadata")
OPEN_ARRAY_CACHE = 256


def check_zarr_format(path: Path, deep: bool = False) -> None:
    """Raise StoreError unless ``path`` is a Zarr v3 store without any Zarr v2 metadata.

    Args:
        path: the store folder.
        deep: walk every folder (``verify``); otherwise only the root and ``images/``.
    """
    if not path.is_dir():
        raise StoreError(f"store {path} not found; build it with `pyramid build --out {path}`")
    folders = _metadata_folders(path, deep)
    v2_files = [folder / name for folder in folders for name in ZARR_V2_METADATA
                if (folder / name).exists()]
    has_v3 = (path / ZARR_V3_METADATA).exists()
    if v2_files and has_v3:
        example = v2_files[0].relative_to(path)
        raise StoreError(f"store {path} mixes Zarr v2 metadata ({len(v2_files)} files such as "
                         f"{example}) with Zarr v3 metadata; it was written by two tools or "
                         "damaged. Rebuild it into a new --out folder")
    if v2_files:
        raise StoreError(f"store {path} is a Zarr v2 store; femurgen reads and writes Zarr v3 "
                         "(OME-NGFF 0.5). Rebuild it with `pyramid build` into a new --out folder")
    if not has_v3:
        raise StoreError(f"store {path} has no {ZARR_V3_METADATA}; it is not a Zarr v3 store")


def _metadata_folders(path: Path, deep: bool) -> list[Path]:
    """Return the folders whose metadata files are checked."""
    if not deep:
        return [path, path / IMAGES_GROUP]
    folders = []
    for folder, children, _ in os.walk(path):
        children[:] = [child for child in children if child != PARTIAL_FOLDER]
        folders.append(Path(folder))
    return folders


def image_group_path(store: Path, image_id: str) -> Path:
    """Return the folder of one image group."""
    return store / IMAGES_GROUP / image_id


class PyramidStore:
    """Read access to a pyramid store by image id, level and region.

    Construction reads nothing, and the catalog and arrays open on first use. Pickling keeps only
    the path, so each DataLoader worker (fork or spawn) opens its own handles. Pixels are read by
    ``chunk_reader.ChunkReader`` (falling back to zarr for other array layouts).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._rows: dict[str, CatalogRow] | None = None
        self._arrays: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._readers: OrderedDict[tuple[str, int], ChunkReader | None] = OrderedDict()

    def __getstate__(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"PyramidStore({str(self.path)!r})"

    def _catalog(self) -> dict[str, CatalogRow]:
        """Return the catalog rows by image id, reading catalog.csv on first use."""
        if self._rows is None:
            check_zarr_format(self.path)
            try:
                rows = read_catalog(self.path / CATALOG_NAME)
            except FileNotFoundError as error:
                raise StoreError(str(error)) from None
            self._rows = {row.image_id: row for row in rows}
        return self._rows

    def rows(self, split: str | None = None, label: str | None = None) -> list[CatalogRow]:
        """Return catalog rows in catalog order, optionally only one split and/or label."""
        return [row for row in self._catalog().values()
                if (split is None or row.split == split) and (label is None or row.label == label)]

    def labels(self) -> list[str]:
        """Return the sorted unique labels of all rows."""
        return sorted({row.label for row in self._catalog().values()})

    def row(self, image_id: str) -> CatalogRow:
        """Return the catalog row of one image; KeyError names the id and the store."""
        try:
            return self._catalog()[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the catalog of {self.path}") from None

    def level_shape(self, image_id: str, level: int) -> tuple[int, int]:
        """Return (H, W) of a level, computed from the catalog (no array is opened)."""
        row = self.row(image_id)
        if not 0 <= level < row.levels:
            raise IndexError(f"level {level} is out of range for image {image_id!r} "
                             f"(levels 0..{row.levels - 1})")
        return pyramid.shape_at_level(row.height, row.width, level)

    def chunk_shape(self, image_id: str, level: int) -> tuple[int, int]:
        """Return the (cy, cx) read chunk shape of a level (the inner chunk when sharded)."""
        self._read(image_id, level, 0, 1, 0, 1)
        reader = self._readers[(image_id, level)]
        chunks = reader.layout.chunk if reader is not None else self._array(image_id, level).chunks
        return int(chunks[0]), int(chunks[1])

    def read_level(self, image_id: str, level: int) -> np.ndarray:
        """Return a whole level as (H, W) float32 in [0, 1]."""
        height, width = self.level_shape(image_id, level)
        return from_store_uint16(self._read(image_id, level, 0, height, 0, width))

    def read_region(self, image_id: str, level: int, y0: int, x0: int, height: int,
                    width: int) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of a level; parts outside the image are 0 with mask 0.

        Args:
            y0, x0: top-left corner in level pixels (may be negative or past the image).
            height, width: window size in pixels (>= 1).
        Returns:
            (pixels (height, width) float32 in [0, 1], mask (height, width) float32, 1 inside).
        """
        if height < 1 or width < 1:
            raise ValueError(f"region size {height} x {width} is invalid; use at least 1 x 1")
        level_height, level_width = self.level_shape(image_id, level)
        pixels = np.zeros((height, width), dtype=np.float32)
        mask = np.zeros((height, width), dtype=np.float32)
        top, bottom = max(y0, 0), min(y0 + height, level_height)
        left, right = max(x0, 0), min(x0 + width, level_width)
        if top < bottom and left < right:
            inside = (slice(top - y0, bottom - y0), slice(left - x0, right - x0))
            pixels[inside] = from_store_uint16(self._read(image_id, level, top, bottom, left,
                                                          right))
            mask[inside] = 1.0
        return pixels, mask

    def _read(self, image_id: str, level: int, top: int, bottom: int, left: int,
              right: int) -> np.ndarray:
        """Return stored uint16 pixels [top:bottom, left:right] of a level (inside the image)."""
        key = (image_id, level)
        if key not in self._readers:
            path = image_group_path(self.path, image_id) / str(level)
            if not (path / ZARR_V3_METADATA).exists():
                raise StoreError(f"level {level} of image {image_id!r} is missing in {self.path}; "
                                 "run `pyramid verify` and rebuild the store")
            self._readers[key] = ChunkReader.open(path)
            if len(self._readers) > OPEN_ARRAY_CACHE:
                self._readers.popitem(last=False)
        self._readers.move_to_end(key)
        reader = self._readers[key]
        if reader is None:
            return self._array(image_id, level)[top:bottom, left:right]
        return reader.read(top, bottom, left, right)

    def _array(self, image_id: str, level: int) -> Any:
        """Return the opened Zarr array of a level, keeping the most recent ones open."""
        key = (image_id, level)
        array = self._arrays.get(key)
        if array is None:
            import zarr

            path = image_group_path(self.path, image_id) / str(level)
            if not (path / ZARR_V3_METADATA).exists():
                raise StoreError(f"level {level} of image {image_id!r} is missing in {self.path}; "
                                 "run `pyramid verify` and rebuild the store")
            array = zarr.open_array(str(path), mode="r", zarr_format=3)
            self._arrays[key] = array
            if len(self._arrays) > OPEN_ARRAY_CACHE:
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end(key)
        return array

