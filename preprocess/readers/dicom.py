"""DICOM radiographs to store pixels, with pydicom's pixel pipeline.

Steps for each frame (DICOM PS3.3 C.11 grayscale pipeline):

1. Decode with pydicom (``pydicom.pixels.pixel_array``). pylibjpeg, GDCM and pydicom's own RLE
   decoder handle the compressed transfer syntaxes. pydicom's unused-bit correction is turned off,
   so step 2 gets the container values.
2. Stored values: take BitsStored bits ending at HighBit (junk in the other bits is dropped) and
   sign-extend them when PixelRepresentation is 1. This runs for every transfer syntax.
3. A decoder result with one value everywhere is a failure, never a blank image.
4. Modality transform: ``apply_modality_lut`` (Rescale Slope/Intercept in float64, or the Modality
   LUT Sequence).
5. VOI: with ``voi="first"``, the first VOI LUT (preferred) or window is applied, chosen as
   ``apply_voi_lut`` chooses and run through ``apply_voi`` or ``apply_windowing``. Its output is
   scaled from pydicom's output range to [0, 1]. With ``voi="none"`` or without a VOI module, the
   modality values are scaled from the range the modality transform gives over all storable
   values.
6. Polarity: inverted once when the image is MONOCHROME1 or its Presentation LUT Shape is INVERSE
   (the DX and MG modules require INVERSE exactly for MONOCHROME1, so both mean one inversion).

Catalog facts per image: modality, photometric, bits_stored, transfer_syntax, modality_transform,
voi, inversion, spacing_source, meta_header. No identifying attribute is copied; values of the
attributes in ``privacy.IDENTIFYING_KEYWORDS`` are scrubbed from every error message.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom.datadict import dictionary_has_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (apply_modality_lut, apply_presentation_lut, apply_voi, apply_windowing,
                            pixel_array)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000TransferSyntaxes, RLELossless)

from preprocess import normalise, privacy
from preprocess.errors import IngestError
from preprocess.readers.common import (DecodedImage, ReadOptions, check_frame_count,
                                       check_megapixels, valid_spacing)

log = logging.getLogger(__name__)

# Elements larger than this are read from the file only when accessed (the pixel data).
DEFER_SIZE = "256 KB"
# Spacing attributes in order of preference: calibrated at the patient, at the detector, scanned.
SPACING_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing")
# Stored ranges up to this many values run the grayscale pipeline once per value (a lookup).
MAX_LOOKUP_VALUES = 1 << 17


def read_dicom(path: Path, options: ReadOptions) -> Iterator[DecodedImage]:
    """Decode every frame of a DICOM file.

    Args:
        path: the file; files without preamble or File Meta header are read with ``force``.
        options: VOI choice, size limit, multi-frame policy and salt.
    Yields:
        One DecodedImage per frame, (H, W) uint16 pixels.
    Raises:
        IngestError: with the transfer syntax in the message for undecodable pixel data.
    """
    with quiet_pydicom():
        dataset = read_dataset(path)
        secrets = identifying_values(dataset)
        try:
            yield from _decode_frames(dataset, options)
        except IngestError as error:
            raise IngestError(privacy.scrub(str(error), secrets)) from None
        except Exception as error:  # noqa: BLE001 - decoders raise many types
            message = f"{type(error).__name__}: {error}"
            raise IngestError(privacy.scrub(message, secrets)) from None


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while a file is read.

    pydicom reports invalid element values with the value in the text. That value can be a name
    or a birth date, so none of these messages may reach the logs.
    """
    settings = pydicom.config.settings
    previous_mode = settings.reading_validation_mode
    pydicom_log = logging.getLogger("pydicom")
    previous_level = pydicom_log.level
    settings.reading_validation_mode = pydicom.config.IGNORE
    # A level on the parent logger also silences pydicom's child loggers (decoder plugins).
    pydicom_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode = previous_mode
        pydicom_log.setLevel(previous_level)


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file with deferred pixel data and make sure it has a transfer syntax."""
    try:
        dataset = pydicom.dcmread(path, force=True, defer_size=DEFER_SIZE)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise IngestError(f"not a readable DICOM file ({type(error).__name__})") from None
    if not _has_dicom_content(dataset):
        raise IngestError("not a DICOM file: no DICM preamble and no valid data elements")
    if "PixelData" not in dataset:
        float_data = "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset
        what = "float pixel data is not supported" if float_data else "no Pixel Data element"
        sop_class = dataset.get("SOPClassUID", None)
        raise IngestError(f"{what} (SOP Class {UID(sop_class).name if sop_class else 'unknown'})")
    _ensure_transfer_syntax(dataset)
    return dataset


def _has_dicom_content(dataset: Dataset) -> bool:
    """Return True when a dataset read with ``force`` has a preamble, File Meta or a standard tag.

    pydicom 3.0 reads any bytes with ``force``. A text file gives no elements, and random bytes
    usually give elements whose tags are not in the DICOM data dictionary.
    """
    if dataset.preamble is not None or len(getattr(dataset, "file_meta", None) or ()):
        return True
    return any(dictionary_has_tag(tag) for tag in dataset.keys())


def _ensure_transfer_syntax(dataset: Dataset) -> None:
    """Set TransferSyntaxUID of a file without File Meta header from the encoding it was read with."""
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        return
    is_implicit, is_little_endian = dataset.original_encoding
    if is_implicit is None:
        raise IngestError("cannot tell the transfer syntax of a file without File Meta header")
    if is_implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if is_little_endian else ExplicitVRBigEndian
    if file_meta is None:
        dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax


def identifying_values(dataset: Dataset) -> list[str]:
    """Return the text of every identifying attribute present, for scrubbing messages."""
    values: list[str] = []
    for source in (dataset, getattr(dataset, "file_meta", Dataset())):
        for keyword in privacy.IDENTIFYING_KEYWORDS:
            with contextlib.suppress(Exception):
                value = source.get(keyword)
                if value is None or isinstance(value, pydicom.Sequence):
                    continue
                items = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
                values.extend(str(item) for item in items if str(item).strip())
    return values


def transfer_syntax(dataset: Dataset) -> UID:
    """Return the transfer syntax UID of a dataset read by :func:`read_dataset`."""
    return UID(dataset.file_meta.TransferSyntaxUID)


def _decode_frames(dataset: Dataset, options: ReadOptions) -> Iterator[DecodedImage]:
    """Check the header and the pixel data length, then decode frame by frame."""
    rows, columns, frames = _geometry(dataset)
    check_megapixels(rows, columns, options)
    check_frame_count(frames, options)
    _check_frames_present(dataset, rows, columns, frames)

    spacing, spacing_source = dicom_spacing(dataset)
    patient = str(dataset.get("PatientID", "") or "").strip()
    patient_id = privacy.patient_id(patient, "dicom", options.salt) if patient else None
    for frame in range(frames):
        pixels, facts = decode_frame(dataset, frame, options)
        facts.update(_file_facts(dataset, spacing_source))
        yield DecodedImage(pixels=pixels, frame=frame, frames=frames, spacing_mm=spacing,
                           patient_id=patient_id, attributes=facts)


def _geometry(dataset: Dataset) -> tuple[int, int, int]:
    """Return (rows, columns, frames) from the header, validating presence and sign."""
    rows = int(dataset.get("Rows", 0) or 0)
    columns = int(dataset.get("Columns", 0) or 0)
    if rows < 1 or columns < 1:
        raise IngestError(f"Rows ({rows}) or Columns ({columns}) is missing or zero")
    frames_value = dataset.get("NumberOfFrames", 1)
    try:
        frames = int(frames_value) if frames_value not in (None, "") else 1
    except (TypeError, ValueError):
        raise IngestError(f"NumberOfFrames {frames_value!r} is not a number") from None
    return rows, columns, max(frames, 1)


def _file_facts(dataset: Dataset, spacing_source: str) -> dict[str, str]:
    """Return the catalog facts shared by all frames of a file."""
    has_meta_header = bool(getattr(dataset, "preamble", None)) or "MediaStorageSOPClassUID" in \
        getattr(dataset, "file_meta", {})
    syntax = transfer_syntax(dataset)
    return {
        "source_kind": "dicom",
        "modality": str(dataset.get("Modality", "") or ""),
        "photometric": str(dataset.get("PhotometricInterpretation", "") or ""),
        "bits_stored": str(dataset.get("BitsStored", "") or ""),
        "transfer_syntax": f"{syntax.name} ({syntax})",
        "spacing_source": spacing_source,
        "meta_header": "present" if has_meta_header else "missing",
    }


def dicom_spacing(dataset: Dataset) -> tuple[tuple[float, float] | None, str]:
    """Return ((row, column) spacing in mm or None, the attribute it came from or why unknown).

    Zero, negative and malformed values count as unknown, never as 0.
    """
    candidates: list[tuple[str, object]] = []
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            candidates.append(("PixelMeasuresSequence.PixelSpacing",
                               measures[0].get("PixelSpacing")))
    candidates.extend((keyword, dataset.get(keyword)) for keyword in SPACING_KEYWORDS)

    invalid = []
    for keyword, value in candidates:
        if value is None or value == "":
            continue
        spacing = valid_spacing(value)
        if spacing is not None:
            return spacing, keyword
        invalid.append(keyword)
    if invalid:
        return None, f"unknown ({', '.join(invalid)} zero or invalid)"
    return None, "unknown"


def _check_frames_present(dataset: Dataset, rows: int, columns: int, frames: int) -> None:
    """Raise IngestError when the pixel data contains fewer frames than NumberOfFrames declares."""
    data = dataset.PixelData
    if transfer_syntax(dataset).is_encapsulated:
        available = _encapsulated_frame_count(dataset, data, frames)
    else:
        frame_bytes = get_expected_length(dataset, "bytes") // frames
        available = len(data) // frame_bytes if frame_bytes else 0
    if available < frames:
        if frames == 1:
            raise IngestError(f"pixel data is truncated ({len(data)} bytes hold no complete "
                              f"{columns} x {rows} frame)")
        raise IngestError(f"NumberOfFrames is {frames} but the pixel data contains only "
                          f"{available} frames; the file is truncated or NumberOfFrames is wrong")


def _encapsulated_frame_count(dataset: Dataset, data: bytes, frames: int) -> int:
    """Return how many frames encapsulated pixel data can hold (offset tables, then fragments)."""
    if "ExtendedOffsetTable" in dataset:
        return len(dataset.ExtendedOffsetTable) // 8
    stream = BytesIO(data)
    try:
        offsets = parse_basic_offsets(stream)
        fragments, _ = parse_fragments(stream)
    except Exception as error:  # noqa: BLE001 - pydicom also raises struct.error here
        raise IngestError(f"encapsulated pixel data is malformed ({error})") from None
    if offsets:
        return len(offsets)
    return frames if fragments >= frames else fragments


def decode_frame(dataset: Dataset, frame: int, options: ReadOptions) -> tuple[np.ndarray,
                                                                                dict[str, str]]:
    """Decode one frame to store pixels.

    Returns:
        ((H, W) uint16 store pixels, facts: modality_transform, voi, inversion).
    """
    raw = _decode_raw(dataset, frame)
    stored = stored_values(raw, dataset)
    normalise.require_varying(stored, f"decoded pixel data ({transfer_syntax(dataset).name})")

    photometric = str(dataset.get("PhotometricInterpretation", "")).strip().upper()
    if stored.ndim == 3:
        return _colour_to_store(stored, dataset, photometric)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise IngestError(f"PhotometricInterpretation {photometric or 'missing'} is not a "
                          "greyscale or RGB radiograph")
    return _greyscale_to_store(stored, dataset, photometric, options)


def _decode_raw(dataset: Dataset, frame: int) -> np.ndarray:
    """Run pydicom's decoder for one frame, with the container bits left as decoded.

    JPEG 2000 tries pylibjpeg (OpenJPEG) first, because it decoded the test radiographs 1.6 to 1.7
    times faster than GDCM, pydicom's first choice. Any failure falls back to all plugins.
    """
    syntax = transfer_syntax(dataset)
    if syntax in JPEG2000TransferSyntaxes:
        with contextlib.suppress(Exception):
            return pixel_array(dataset, index=frame, correct_unused_bits=False,
                               decoding_plugin="pylibjpeg")
    try:
        return pixel_array(dataset, index=frame, correct_unused_bits=False)
    except NotImplementedError as error:
        raise IngestError(f"no decoder is installed for transfer syntax {syntax.name} ({syntax}): "
                          f"{error}") from None
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise IngestError(f"no decoder could decode the {syntax.name} ({syntax}) pixel data: "
                          f"{detail}") from None


def stored_values(raw: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Extract BitsStored bits ending at HighBit and sign-extend them for signed data.

    Args:
        raw: decoded pixels, (H, W) or (H, W, samples), any integer container.
        dataset: gives BitsStored, HighBit and PixelRepresentation.
    Returns:
        array of the same shape: the unsigned container type, or int32/int64 for signed data.
    """
    bits_stored = int(dataset.get("BitsStored", raw.dtype.itemsize * 8))
    high_bit = int(dataset.get("HighBit", bits_stored - 1))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    container_bits = raw.dtype.itemsize * 8
    low_bit = high_bit + 1 - bits_stored
    if low_bit < 0 or high_bit >= container_bits or bits_stored < 1:
        raise IngestError(f"BitsStored {bits_stored} and HighBit {high_bit} do not fit "
                          f"{container_bits}-bit samples")
    syntax = transfer_syntax(dataset)
    if low_bit and syntax.is_encapsulated and syntax != RLELossless:
        raise IngestError(f"HighBit {high_bit} with BitsStored {bits_stored} (data not in the low "
                          f"bits) is not supported for {syntax.name}")

    native = raw.astype(raw.dtype.newbyteorder("="), copy=False)  # big endian syntaxes
    values = native.view(f"u{raw.dtype.itemsize}")
    if low_bit:
        values = values >> low_bit
    if bits_stored < container_bits:
        values = values & values.dtype.type((1 << bits_stored) - 1)
    if not signed:
        return values
    sign_bit = 1 << (bits_stored - 1)
    extended = values.astype(np.int64 if container_bits > 16 else np.int32)
    return (extended ^ sign_bit) - sign_bit


def stored_range(dataset: Dataset) -> tuple[int, int]:
    """Return the smallest and largest value BitsStored and PixelRepresentation allow."""
    bits_stored = int(dataset.get("BitsStored", 16))
    if int(dataset.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def _colour_to_store(stored: np.ndarray, dataset: Dataset, photometric: str) -> tuple[
        np.ndarray, dict[str, str]]:
    """Reduce RGB-encoded greyscale to one channel and scale it from its stored range."""
    if photometric.startswith("PALETTE"):
        raise IngestError("PALETTE COLOR images are not radiographs; export them as greyscale")
    low, high = stored_range(dataset)
    grey = normalise.to_greyscale(stored, full_scale=float(high - low))
    facts = {"modality_transform": "none", "voi": "none:colour", "inversion": "none"}
    return normalise.rescale_to_store(grey, low, high), facts


def _greyscale_to_store(stored: np.ndarray, dataset: Dataset, photometric: str,
                        options: ReadOptions) -> tuple[np.ndarray, dict[str, str]]:
    """Run the grayscale pipeline and look every pixel up in its result.

    Every step maps each stored value on its own. So for up to 17 stored bits the pipeline runs
    once over every storable value, and the image is a lookup in that table. The result equals
    running the pipeline on the image.
    """
    low, high = stored_range(dataset)
    if high - low >= MAX_LOOKUP_VALUES:
        pixels, facts = grayscale_pipeline(stored, dataset, photometric, options)
    else:
        table, facts = grayscale_pipeline(np.arange(low, high + 1, dtype=np.int64), dataset,
                                          photometric, options)
        pixels = table[stored - low] if low else table[stored]
    normalise.require_varying(pixels, f"image after the VOI transform {facts['voi']} "
                                      "(try --voi none)")
    return pixels, facts


def grayscale_pipeline(stored: np.ndarray, dataset: Dataset, photometric: str,
                       options: ReadOptions) -> tuple[np.ndarray, dict[str, str]]:
    """Apply modality and VOI transforms and the polarity; scale to store values.

    Args:
        stored: stored values (any shape).
    Returns:
        (uint16 store values of the same shape, facts: modality_transform, voi, inversion).
    """
    modality_kind = modality_transform_kind(dataset)
    values = apply_modality_lut(stored, dataset)

    voi = choose_voi(dataset) if options.voi == "first" else None
    if voi is None:
        low, high = modality_range(dataset)
        voi = "none:requested" if options.voi == "none" else "none:absent"
    else:
        values, low, high = _apply_voi(values, dataset, voi)

    if dataset.get("PresentationLUTSequence"):
        pixels, inversion = _presentation_lut_to_store(values, low, high, dataset)
    else:
        invert, inversion = polarity(dataset, photometric)
        pixels = normalise.rescale_to_store(values, high, low) if invert else \
            normalise.rescale_to_store(values, low, high)
    return pixels, {"modality_transform": modality_kind, "voi": voi, "inversion": inversion}


def modality_transform_kind(dataset: Dataset) -> str:
    """Return "lut", "rescale" or "none": the modality transform pydicom applies."""
    if dataset.get("ModalityLUTSequence"):
        return "lut"
    if "RescaleSlope" in dataset and "RescaleIntercept" in dataset:
        return "rescale"
    return "none"


def modality_range(dataset: Dataset) -> tuple[float, float]:
    """Return (min, max) of the modality transform over every value BitsStored allows."""
    low, high = stored_range(dataset)
    if high - low < MAX_LOOKUP_VALUES:
        inputs = np.arange(low, high + 1, dtype=np.int64)
    else:
        inputs = np.array([low, high], dtype=np.int64)
    outputs = np.asarray(apply_modality_lut(inputs, dataset), dtype=np.float64)
    out_low, out_high = float(outputs.min()), float(outputs.max())
    if out_low == out_high:
        raise IngestError(f"the modality transform maps every stored value to {out_low:g}")
    return out_low, out_high


def choose_voi(dataset: Dataset) -> str | None:
    """Return the VOI transform pydicom's ``apply_voi_lut`` would apply, or None.

    Returns:
        "lut:0" for the first VOI LUT Sequence item, "window:0:FUNCTION" for the first window
        (FUNCTION is LINEAR, LINEAR_EXACT or SIGMOID), None when the file has no VOI module.
    """
    items = dataset.get("VOILUTSequence")
    if items and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None:
        return "lut:0"
    if dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        return f"window:0:{function}"
    return None


def _apply_voi(values: np.ndarray, dataset: Dataset, voi: str) -> tuple[np.ndarray, float,
                                                                         float]:
    """Apply the chosen VOI transform with pydicom; return (output, y_min, y_max)."""
    if voi.startswith("lut"):
        depth = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        integer_values = np.rint(values).astype(np.int64)
        return apply_voi(integer_values, dataset, index=0), 0.0, float((1 << depth) - 1)
    try:
        output = apply_windowing(values, dataset, index=0)
    except ValueError as error:
        raise IngestError(f"invalid VOI window: {error}") from None
    y_min, y_max = window_output_range(dataset)
    return output, y_min, y_max


def window_output_range(dataset: Dataset) -> tuple[float, float]:
    """Return the (y_min, y_max) that ``apply_windowing`` maps below and above the window to.

    pydicom 3.0 passes the stored range through the rescale, so with a negative slope y_min is
    the larger number. Scaling with (y - y_min) / (y_max - y_min) still maps values below the
    window to 0, as the LINEAR function of DICOM PS3.3 C.11.2.1.2 does.
    """
    if dataset.get("ModalityLUTSequence"):
        depth = int(dataset.ModalityLUTSequence[0].LUTDescriptor[2])
        y_min, y_max = 0.0, float((1 << depth) - 1)
    else:
        low, high = stored_range(dataset)
        y_min, y_max = float(low), float(high)
    if dataset.get("RescaleSlope") is not None and dataset.get("RescaleIntercept") is not None:
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    if y_min == y_max:
        raise IngestError("the window output range is empty because RescaleSlope is 0")
    return y_min, y_max


def polarity(dataset: Dataset, photometric: str) -> tuple[bool, str]:
    """Return (invert, fact): one inversion for MONOCHROME1 and/or Presentation LUT Shape INVERSE."""
    shape = str(dataset.get("PresentationLUTShape", "") or "").strip().upper()
    reasons = [reason for reason, applies in (("MONOCHROME1", photometric == "MONOCHROME1"),
                                              ("INVERSE", shape == "INVERSE")) if applies]
    return bool(reasons), "+".join(reasons) or "none"


def _presentation_lut_to_store(values: np.ndarray, low: float, high: float,
                               dataset: Dataset) -> tuple[np.ndarray, str]:
    """Map VOI output through the Presentation LUT Sequence to store values (P-values).

    pydicom's ``apply_presentation_lut`` scales its input by the image's own minimum and maximum.
    So it is applied to the full input ramp, and each VOI output value picks its table entry by
    its position in [low, high].
    """
    # NOTE: the LUT output is taken as P-values (high = bright) with no further inversion for
    # MONOCHROME1; no file with a Presentation LUT Sequence was available to check this.
    item = dataset.PresentationLUTSequence[0]
    entries = int(item.LUTDescriptor[0]) or 1 << 16
    depth = int(item.LUTDescriptor[2])
    table = apply_presentation_lut(np.arange(entries, dtype=np.float32), dataset)
    position = normalise.rescale_to_store(values, low, high).astype(np.float64) / normalise.STORE_MAX
    indices = np.rint(position * (entries - 1)).astype(np.int64)
    return normalise.rescale_to_store(table[indices], 0.0, float((1 << depth) - 1)), \
        "presentation-lut"
