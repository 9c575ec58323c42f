"""Types shared by the readers: read options and one decoded image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from preprocess.errors import IngestError

VOI_CHOICES = ("first", "none")
MULTIFRAME_CHOICES = ("each", "refuse")


@dataclass(frozen=True)
class ReadOptions:
    """How readers decode files.

    Attributes:
        voi: "first" applies the first VOI LUT or window of a DICOM file as pydicom does.
            "none" keeps the modality values, scaled from the range the stored bits allow.
        max_megapixels: images above this many pixels (per frame, in millions) are rejected from
            their header, before any pixel is decoded.
        h5_dataset: path of the dataset inside HDF5 files; None picks the only image dataset.
        multiframe: "each" makes every frame (or leading index) its own image, "refuse" fails
            files with more than one.
        salt: key of the pseudonymous patient ids (never stored).
    """

    voi: str = "first"
    max_megapixels: float = 60.0
    h5_dataset: str | None = None
    multiframe: str = "each"
    salt: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.voi not in VOI_CHOICES:
            raise ValueError(f"voi={self.voi!r} is invalid; use one of {VOI_CHOICES}")
        if self.multiframe not in MULTIFRAME_CHOICES:
            raise ValueError(f"multiframe={self.multiframe!r} is invalid; use one of "
                             f"{MULTIFRAME_CHOICES}")
        if not self.max_megapixels > 0:
            raise ValueError(f"max_megapixels={self.max_megapixels} is invalid; use a value > 0")


@dataclass
class DecodedImage:
    """One decoded radiograph (one frame of a file), in store conventions.

    Attributes:
        pixels: (H, W) uint16, 0..65535 for [0, 1], high = dense.
        frame: index of this image in its file (0 for single-image files).
        frames: number of images the file holds.
        spacing_mm: (row, column) pixel spacing in mm, or None when unknown.
        patient_id: pseudonymous patient id from the file (DICOM PatientID), or None.
        attributes: catalog facts about the decoding (source kind, photometric, VOI, ...); no
            value here identifies a patient or names the file.
    """

    pixels: np.ndarray
    frame: int
    frames: int
    spacing_mm: tuple[float, float] | None
    patient_id: str | None
    attributes: dict[str, str]


def check_megapixels(height: int, width: int, options: ReadOptions) -> None:
    """Raise IngestError when a (height, width) image exceeds ``options.max_megapixels``."""
    megapixels = height * width / 1e6
    if megapixels > options.max_megapixels:
        raise IngestError(
            f"image is {width} x {height} pixels ({megapixels:.1f} megapixels), above "
            f"--max-megapixels {options.max_megapixels:g}; raise the limit to ingest it")
    if height < 1 or width < 1:
        raise IngestError(f"image has an empty shape ({height} x {width})")


def check_frame_count(frames: int, options: ReadOptions) -> None:
    """Raise IngestError for a multi-image file when ``options.multiframe`` is "refuse"."""
    if frames > 1 and options.multiframe == "refuse":
        raise IngestError(f"file contains {frames} frames and --multiframe is refuse; use "
                          "--multiframe each to store every frame as its own image")


def valid_spacing(values: object) -> tuple[float, float] | None:
    """Return (row, column) spacing from a 1- or 2-value sequence, or None when not all > 0."""
    try:
        numbers = [float(value) for value in values]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or not all(np.isfinite(number) and number > 0 for number in numbers):
        return None
    return numbers[0], numbers[1]
