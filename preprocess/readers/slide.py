"""Whole-slide and pyramidal 8-bit images through OpenSlide.

OpenSlide returns level 0 as 8-bit RGBA. Pixels outside the scanned area are transparent
(alpha 0); they become 0 (no density) before the greyscale check. Spacing comes from the
``openslide.mpp-x`` / ``openslide.mpp-y`` properties (micrometres per pixel) when present.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from preprocess import normalise
from preprocess.errors import IngestError
from preprocess.readers.common import DecodedImage, ReadOptions, check_megapixels, valid_spacing

MICROMETRES_PER_MM = 1000.0


def read_slide(path: Path, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode level 0 of a slide that OpenSlide can open.

    Yields:
        One DecodedImage with (H, W) uint16 pixels.
    """
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as error:
        raise IngestError(f"OpenSlide cannot open the file ({type(error).__name__})") from None
    with slide:
        width, height = slide.dimensions
        check_megapixels(height, width, options)
        try:
            rgba = np.asarray(slide.read_region((0, 0), 0, (width, height)))
        except openslide.OpenSlideError as error:
            raise IngestError(f"OpenSlide cannot read level 0 ({error})") from None
        spacing = _slide_spacing(slide.properties)
        vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "")

    rgb = np.where(rgba[..., 3:4] == 0, 0, rgba[..., :3]).astype(np.uint8)
    pixels = normalise.integers_to_store(normalise.to_greyscale(rgb, full_scale=255))
    attributes = {"source_kind": "openslide", "photometric": f"RGBA ({vendor})",
                  "bits_stored": "8", "intensity": "dtype",
                  "spacing_source": "openslide.mpp" if spacing else "unknown"}
    yield DecodedImage(pixels=pixels, frame=0, frames=1, spacing_mm=spacing, patient_id=None,
                       attributes=attributes)


def _slide_spacing(properties: dict[str, str]) -> tuple[float, float] | None:
    """Return (row, column) spacing in mm from OpenSlide's micrometre-per-pixel properties."""
    try:
        microns = (float(properties["openslide.mpp-y"]), float(properties["openslide.mpp-x"]))
    except (KeyError, ValueError):
        return None
    return valid_spacing([value / MICROMETRES_PER_MM for value in microns])
