"""Small input files written by the tests themselves: DICOM through pydicom, rasters, stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "radiographs"
SALT = "test-salt"


def dicom_dataset(stored: np.ndarray, bits_stored: int = 12, bits_allocated: int = 16,
                  high_bit: int | None = None, signed: bool = False,
                  photometric: str = "MONOCHROME2", **attributes) -> Dataset:
    """Return a CR dataset whose Pixel Data are the bytes of ``stored`` as given.

    ``stored`` is written unmasked, so tests can put junk into the unused high bits.
    """
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientName = "Doe^Jane"
    dataset.PatientID = "MRN-4711"
    dataset.PatientBirthDate = "19420101"
    dataset.InstitutionName = "Saint Example Hospital"
    frames = stored.shape[0] if stored.ndim == 3 else 1
    dataset.Rows, dataset.Columns = stored.shape[-2:]
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1 if high_bit is None else high_bit
    dataset.PixelRepresentation = 1 if signed else 0
    container = f"{'i' if signed else 'u'}{bits_allocated // 8}"
    dataset.PixelData = np.ascontiguousarray(stored).astype(f"<{container}").tobytes()
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return dataset


def write_dicom(path: Path, stored: np.ndarray, **options) -> Path:
    """Write :func:`dicom_dataset` to ``path`` as a DICOM file with preamble and meta header."""
    dataset = dicom_dataset(stored, **options)
    dataset.save_as(path, enforce_file_format=True)
    return path


def ramp(height: int = 16, width: int = 24, high: int = 4095, seed: int = 0) -> np.ndarray:
    """Return an (H, W) int64 image with every value 0..high likely present (shuffled ramp)."""
    values = np.linspace(0, high, height * width).round().astype(np.int64)
    return np.random.default_rng(seed).permutation(values).reshape(height, width)


def ct_like(dataset: Dataset) -> Dataset:
    """Mark a dataset as CT (signed data with rescale is common there)."""
    dataset.SOPClassUID = CTImageStorage
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.Modality = "CT"
    return dataset


def read_dicom_file(path: Path) -> Dataset:
    """Read a DICOM file with pydicom (for checks in tests)."""
    return pydicom.dcmread(path, force=True)
