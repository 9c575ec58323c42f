"""PNG, JPEG and other Pillow formats, and TIFF through tifffile, to store pixels.

- Pillow: the size comes from the header and is checked before any pixel is decoded; Pillow's
  own decompression-bomb limit is lifted during the read because ``--max-megapixels`` replaces it.
  The EXIF orientation is applied once, by ``ImageOps.exif_transpose``. 16-bit greyscale PNG is
  read at full depth (mode ``I;16``); 16-bit colour PNG is rejected, because Pillow decodes it to
  8 bits. A JPEG whose data ends early is rejected, never padded with grey.
- TIFF: strip and tiled files of any sample type through tifffile (compressed ones need the
  ``imagecodecs`` package). Pyramidal 8-bit files go through OpenSlide when it recognises them;
  deeper files always through tifffile, because OpenSlide returns 8-bit RGBA. BitsPerSample below
  the container width (12 bits in uint16) is scaled from its own range, MINISWHITE is inverted and
  the Orientation tag is applied. Further pages of the same shape (a stack) are frames.
- Pixel spacing of raster files is recorded as unknown: their resolution tags usually hold a
  print resolution (72 or 96 dpi), not a detector pixel size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocess import normalise
from preprocess.errors import IngestError
from preprocess.readers.common import (DecodedImage, ReadOptions, check_frame_count,
                                       check_megapixels)

EXIF_ORIENTATION_TAG = 0x0112
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES_WITH_COLOUR = (2, 6)
MODE_BITS = {"1": 1, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "CMYK": 8,
             "YCbCr": 8, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}


@contextlib.contextmanager
def _pillow_size_limit_lifted() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit; ``--max-megapixels`` is checked instead."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_pillow(path: Path, kind: str, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode a PNG, JPEG or other Pillow image; each frame of an animated file is one image.

    Yields:
        DecodedImage with (H, W) uint16 pixels after the EXIF orientation.
    """
    _reject_16_bit_colour_png(path)
    with _pillow_size_limit_lifted():
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise IngestError(f"not a readable {kind.upper()} image ({type(error).__name__})") \
                from None
        with image:
            width, height = image.size
            check_megapixels(height, width, options)
            frames = int(getattr(image, "n_frames", 1) or 1)
            check_frame_count(frames, options)
            for frame in range(frames):
                image.seek(frame)
                yield _decode_pillow_frame(image, kind, frame, frames)


def _reject_16_bit_colour_png(path: Path) -> None:
    """Raise IngestError for a 16-bit RGB(A) PNG, which Pillow would reduce to 8 bits."""
    with open(path, "rb") as stream:
        header = stream.read(33)
    if not header.startswith(PNG_SIGNATURE) or len(header) < 26:
        return
    bit_depth, colour_type = header[24], header[25]
    if bit_depth == 16 and colour_type in PNG_COLOUR_TYPES_WITH_COLOUR:
        raise IngestError("16-bit colour PNG: Pillow decodes it to 8 bits; save it as 16-bit "
                          "greyscale PNG")


def _decode_pillow_frame(image: Image.Image, kind: str, frame: int, frames: int) -> DecodedImage:
    """Load one frame, apply its orientation and convert it to store pixels."""
    orientation = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    try:
        image.load()
    except OSError as error:
        text = str(error)
        if "truncated" in text:
            raise IngestError(f"truncated {kind.upper()}: the image data ends before the last "
                              "row") from None
        raise IngestError(f"cannot decode the {kind.upper()} image data ({text})") from None
    upright = ImageOps.exif_transpose(image)
    pixels, intensity = pillow_to_store(upright)
    attributes = {"source_kind": kind, "photometric": image.mode,
                  "bits_stored": str(MODE_BITS.get(image.mode, "")), "orientation": str(orientation),
                  "intensity": intensity, "spacing_source": "unknown"}
    return DecodedImage(pixels=pixels, frame=frame, frames=frames, spacing_mm=None,
                        patient_id=None, attributes=attributes)


def pillow_to_store(image: Image.Image) -> tuple[np.ndarray, str]:
    """Convert a loaded Pillow image of any mode to ((H, W) uint16 store pixels, intensity)."""
    mode = image.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "F":
        return normalise.floats_to_store(np.asarray(image, dtype=np.float32))
    if mode == "I":
        values = np.asarray(image, dtype=np.int32)
        if values.min() >= 0 and values.max() <= normalise.STORE_MAX:
            return values.astype(np.uint16), "dtype"
        return normalise.integers_to_store(values), "dtype"
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16), "dtype"

    values = np.asarray(image)
    if values.ndim == 3 and values.shape[-1] == 2:
        values = normalise.to_greyscale(np.stack([values[..., 0]] * 3 + [values[..., 1]], -1),
                                        full_scale=255)
    elif values.ndim == 3:
        values = normalise.to_greyscale(values, full_scale=255)
    return normalise.integers_to_store(values), "dtype"


def apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels stored with a TIFF/EXIF Orientation value (1..8) upright, as Pillow does."""
    if orientation in (0, 1):
        return pixels
    operations = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=1),
    }
    if orientation not in operations:
        raise IngestError(f"Orientation value {orientation} is invalid (allowed: 1 to 8)")
    return np.ascontiguousarray(operations[orientation](pixels))


def read_tiff(path: Path, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode a TIFF file: level 0 of its first series, one image per page of a stack.

    Yields:
        DecodedImage with (H, W) uint16 pixels.
    """
    import tifffile

    try:
        tiff = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as error:
        raise IngestError(f"not a readable TIFF file ({type(error).__name__})") from None
    with tiff:
        series = tiff.series[0]
        level = series.levels[0] if series.levels else series
        page = level.keyframe
        height, width, frames = _tiff_geometry(level.axes, level.shape)
        check_megapixels(height, width, options)
        check_frame_count(frames, options)
        if _use_openslide(path, series, level.dtype):
            from preprocess.readers.slide import read_slide

            yield from read_slide(path, options)
            return
        data = _read_tiff_level(level)
        facts = _tiff_facts(page)
        for frame, plane in enumerate(_tiff_planes(data, level.axes)):
            pixels = _tiff_plane_to_store(plane, page, facts)
            yield DecodedImage(pixels=pixels, frame=frame, frames=frames, spacing_mm=None,
                               patient_id=None, attributes=dict(facts))


def _tiff_geometry(axes: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return (height, width, number of planes) from tifffile axes such as 'YX', 'IYXS'."""
    if "Y" not in axes or "X" not in axes:
        raise IngestError(f"TIFF series has axes {axes!r} without Y and X")
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    planes = int(np.prod([size for axis, size in zip(axes, shape) if axis not in "YXS"]))
    return height, width, max(planes, 1)


def _use_openslide(path: Path, series: object, dtype: np.dtype) -> bool:
    """Return True for an 8-bit pyramidal TIFF that OpenSlide can open."""
    pyramidal = bool(getattr(series, "is_pyramidal", False)) or len(getattr(series, "levels",
                                                                            [])) > 1
    if not pyramidal or np.dtype(dtype) != np.uint8:
        return False
    try:
        import openslide
    except ImportError:
        return False
    return openslide.OpenSlide.detect_format(str(path)) is not None


def _read_tiff_level(level: object) -> np.ndarray:
    """Read all pixels of a tifffile series level, mapping codec errors to IngestError."""
    try:
        return level.asarray()  # type: ignore[attr-defined]
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        raise IngestError(f"cannot decode the TIFF data ({type(error).__name__}: {error}); "
                          "compressed TIFF needs the imagecodecs package") from None


def _tiff_facts(page: object) -> dict[str, str]:
    """Return catalog facts of a TIFF page."""
    photometric = getattr(page, "photometric", None)
    return {"source_kind": "tiff",
            "photometric": getattr(photometric, "name", str(photometric)),
            "bits_stored": str(getattr(page, "bitspersample", "")),
            "orientation": str(_tiff_orientation(page)),
            "intensity": "dtype", "spacing_source": "unknown"}


def _tiff_orientation(page: object) -> int:
    """Return the Orientation tag value of a page (1 when absent)."""
    tag = page.tags.get("Orientation")  # type: ignore[attr-defined]
    return int(tag.value) if tag is not None else 1


def _tiff_planes(data: np.ndarray, axes: str) -> Iterator[np.ndarray]:
    """Yield (H, W) or (H, W, S) planes in file order from an array with tifffile ``axes``."""
    order = [i for i, axis in enumerate(axes) if axis not in "YXS"]
    order += [axes.index("Y"), axes.index("X")]
    if "S" in axes:
        order.append(axes.index("S"))
    arranged = np.transpose(data, order)
    spatial = 3 if "S" in axes else 2
    yield from arranged.reshape((-1, *arranged.shape[-spatial:]))


def _tiff_plane_to_store(plane: np.ndarray, page: object, facts: dict[str, str]) -> np.ndarray:
    """Convert one TIFF plane to upright store pixels, honouring bit depth and MINISWHITE."""
    photometric = facts["photometric"]
    if photometric == "PALETTE":
        raise IngestError("palette TIFF images are not radiographs; export them as greyscale")
    if plane.ndim == 3:
        full_scale = float(np.iinfo(plane.dtype).max) if plane.dtype.kind in "ui" else 1.0
        plane = normalise.to_greyscale(plane, full_scale=full_scale)

    bits = int(getattr(page, "bitspersample", 0) or 0)
    if plane.dtype.kind == "f":
        pixels, facts["intensity"] = normalise.floats_to_store(plane)
    elif plane.dtype.kind == "u" and 1 < bits < plane.dtype.itemsize * 8:
        pixels = normalise.rescale_to_store(plane, 0.0, float((1 << bits) - 1))
        facts["intensity"] = f"{bits}-bit"
    else:
        pixels = normalise.integers_to_store(plane)
    if photometric == "MINISWHITE":
        pixels = normalise.STORE_MAX - pixels
    return apply_orientation(pixels, _tiff_orientation(page))
