"""DICOM decoding: every grayscale pipeline case on small files written with pydicom.

Expected store values are computed here from the DICOM formulas (PS3.3 C.11), not with pydicom's
own functions, so a mistake in how the reader calls pydicom shows up.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders.base import get_encoder
from pydicom.sequence import Sequence
from pydicom.dataset import Dataset
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGLSLossless, RLELossless)

from preprocess.errors import IngestError
from preprocess.readers import ReadOptions, detect_kind, read_images
from tests.preprocess.factory import dicom_dataset, ramp, write_dicom

SALT = b"salt"


def decode(path, **options):
    """Return all DecodedImages of a file."""
    return list(read_images(path, "dicom", ReadOptions(salt=SALT, **options)))


def expected_store(values, low, high):
    """Return round((values - low) / (high - low) * 65535) clipped to uint16."""
    scaled = (np.asarray(values, dtype=np.float64) - low) / (high - low) * 65535
    return np.rint(np.clip(scaled, 0, 65535)).astype(np.uint16)


def test_monochrome2_scaled_by_bits_stored(tmp_path):
    stored = ramp()
    image, = decode(write_dicom(tmp_path / "a.dcm", stored))
    assert image.pixels.dtype == np.uint16
    assert np.array_equal(image.pixels, expected_store(stored, 0, 4095))
    assert image.attributes["voi"] == "none:absent"
    assert image.attributes["inversion"] == "none"


def test_monochrome1_inverted_once(tmp_path):
    stored = ramp()
    image, = decode(write_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1"))
    assert np.array_equal(image.pixels, expected_store(stored, 4095, 0))
    assert image.attributes["inversion"] == "MONOCHROME1"


def test_inverse_shape_not_doubled(tmp_path):
    stored = ramp()
    plain, = decode(write_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1"))
    shaped, = decode(write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1",
                                 PresentationLUTShape="INVERSE"))
    assert np.array_equal(shaped.pixels, plain.pixels)
    assert shaped.attributes["inversion"] == "MONOCHROME1+INVERSE"


def test_inverse_shape_on_monochrome2(tmp_path):
    stored = ramp()
    image, = decode(write_dicom(tmp_path / "a.dcm", stored, PresentationLUTShape="INVERSE"))
    assert np.array_equal(image.pixels, expected_store(stored, 4095, 0))


def test_inversion_after_window(tmp_path):
    stored = ramp()
    image, = decode(write_dicom(tmp_path / "a.dcm", stored, photometric="MONOCHROME1",
                                WindowCenter=1000.5, WindowWidth=1001, VOILUTFunction="LINEAR"))
    # LINEAR with c = 1000.5, w = 1001: values <= 500 -> y_min, > 1500 -> y_max, then inverted.
    x01 = np.clip((stored - 1000) / 1000 + 0.5, 0, 1)
    assert np.array_equal(image.pixels, expected_store(1 - x01, 0, 1))


def test_unused_high_bits_masked(tmp_path):
    stored = ramp()
    junk = stored | (0b1010 << 12)
    clean, = decode(write_dicom(tmp_path / "a.dcm", stored))
    dirty, = decode(write_dicom(tmp_path / "b.dcm", junk))
    assert np.array_equal(dirty.pixels, clean.pixels)


def test_signed_sign_extended(tmp_path):
    values = ramp(high=4095) - 2048  # 12-bit signed range
    raw = (values & 0x0FFF) | (0b0101 << 12)  # two's complement in 12 bits, junk above
    image, = decode(write_dicom(tmp_path / "a.dcm", raw.astype(np.uint16).view(np.int16),
                                signed=True))
    assert np.array_equal(image.pixels, expected_store(values, -2048, 2047))


def test_high_bit_above_stored_bits(tmp_path):
    stored = ramp()
    shifted = stored << 4  # BitsStored 12 in bits 4..15
    image, = decode(write_dicom(tmp_path / "a.dcm", shifted, high_bit=15))
    assert np.array_equal(image.pixels, expected_store(stored, 0, 4095))


def test_negative_slope_keeps_modality_order(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, RescaleSlope=-2.5, RescaleIntercept=100)
    image, = decode(path, voi="none")
    modality = stored * -2.5 + 100
    assert np.array_equal(image.pixels, expected_store(modality, 4095 * -2.5 + 100, 100))
    assert image.attributes["modality_transform"] == "rescale"
    assert image.attributes["voi"] == "none:requested"


def test_negative_intercept_no_wrap(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=0, WindowWidth=2001)
    image, = decode(path)
    modality = stored - 1024.0
    x01 = np.clip((modality - (0 - 0.5)) / 2000 + 0.5, 0, 1)
    below = modality <= -0.5 - 1000
    x01[below] = 0
    assert np.array_equal(image.pixels, expected_store(x01, 0, 1))
    assert image.pixels[stored == 0].max() == 0


def test_fractional_slope(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, RescaleSlope=0.25, RescaleIntercept=-3.5)
    image, = decode(path, voi="none")
    low, high = -3.5, 4095 * 0.25 - 3.5
    assert np.array_equal(image.pixels, expected_store(stored * 0.25 - 3.5, low, high))


def test_negative_slope_window_not_flipped(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, RescaleSlope=-1, RescaleIntercept=4095,
                       WindowCenter=2048, WindowWidth=4096)
    image, = decode(path)
    modality = 4095 - stored
    # LINEAR maps low modality values to the bottom of the output range.
    assert image.pixels[modality == modality.min()].max() == 0
    assert image.pixels[modality == modality.max()].min() == 65535


def test_modality_lut_sequence(tmp_path):
    stored = ramp(high=1023)
    table = (np.arange(1024) ** 2 // 64).astype(np.uint16)  # 0..16337
    item = Dataset()
    item.LUTDescriptor = [1024, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "US", table.tolist())
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=10,
                       ModalityLUTSequence=Sequence([item]))
    image, = decode(path)
    assert np.array_equal(image.pixels, expected_store(table[stored], table.min(), table.max()))
    assert image.attributes["modality_transform"] == "lut"


def test_first_of_several_windows(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, WindowCenter=[1000.5, 3000],
                       WindowWidth=[1001, 10])
    image, = decode(path)
    x01 = np.clip((stored - 1000) / 1000 + 0.5, 0, 1)
    assert np.array_equal(image.pixels, expected_store(x01, 0, 1))
    assert image.attributes["voi"] == "window:0:LINEAR"


def test_sigmoid_window(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, WindowCenter=2000, WindowWidth=800,
                       VOILUTFunction="SIGMOID")
    image, = decode(path)
    x01 = 1 / (1 + np.exp(-4 * (stored - 2000) / 800))
    assert np.abs(image.pixels.astype(int) - expected_store(x01, 0, 1)).max() <= 1
    assert image.attributes["voi"] == "window:0:SIGMOID"


def test_voi_lut_preferred_over_window(tmp_path):
    stored = ramp()
    table = (4095 - np.arange(4096)).astype(np.uint16)  # a 12-bit inverting LUT
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", table.tolist())
    path = write_dicom(tmp_path / "a.dcm", stored, WindowCenter=100, WindowWidth=10,
                       VOILUTSequence=Sequence([item]))
    image, = decode(path)
    assert np.array_equal(image.pixels, expected_store(table[stored], 0, 4095))
    assert image.attributes["voi"] == "lut:0"


def test_voi_none_skips_window(tmp_path):
    stored = ramp()
    path = write_dicom(tmp_path / "a.dcm", stored, WindowCenter=100, WindowWidth=10)
    image, = decode(path, voi="none")
    assert np.array_equal(image.pixels, expected_store(stored, 0, 4095))


def _encoded_variants(tmp_path, stored, signed):
    """Write one image in several transfer syntaxes; return {name: path}."""
    container = np.int16 if signed else np.uint16
    paths = {"explicit-le": write_dicom(tmp_path / "le.dcm", stored.astype(container),
                                        signed=signed)}
    for name, syntax in (("rle", RLELossless), ("jpeg-ls", JPEGLSLossless),
                         ("j2k", JPEG2000Lossless)):
        if not get_encoder(syntax).is_available:
            continue  # pyjpegls (JPEG-LS) or pylibjpeg-openjpeg (JPEG 2000) is not installed
        dataset = dicom_dataset(stored.astype(container), signed=signed)
        dataset.compress(syntax, stored.astype(container), generate_instance_uid=False)
        paths[name] = tmp_path / f"{name}.dcm"
        dataset.save_as(paths[name], enforce_file_format=True)

    big = dicom_dataset(stored.astype(container), signed=signed)
    big.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    big.PixelData = stored.astype(f">{'i' if signed else 'u'}2").tobytes()
    paths["explicit-be"] = tmp_path / "be.dcm"
    big.save_as(paths["explicit-be"], enforce_file_format=True, little_endian=False,
                implicit_vr=False)
    for name, syntax in (("implicit-le", ImplicitVRLittleEndian),
                         ("deflated", DeflatedExplicitVRLittleEndian)):
        dataset = dicom_dataset(stored.astype(container), signed=signed)
        dataset.file_meta.TransferSyntaxUID = syntax
        paths[name] = tmp_path / f"{name}.dcm"
        dataset.save_as(paths[name], enforce_file_format=True)
    return paths


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_lossless_syntaxes_identical(tmp_path, signed):
    stored = ramp(64, 64, high=4095) - (2048 if signed else 0)  # openjpeg needs >= 32 px
    paths = _encoded_variants(tmp_path, stored, signed)
    low, high = (-2048, 2047) if signed else (0, 4095)
    reference = expected_store(stored, low, high)
    for name, path in paths.items():
        image, = decode(path)
        assert np.array_equal(image.pixels, reference), name


def test_jpeg_baseline_close(tmp_path):
    stored = (ramp(64, 64, high=255, seed=1) // 32 * 32).astype(np.uint8)
    smooth = np.sort(stored, axis=None).reshape(64, 64)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    dataset = dicom_dataset(smooth, bits_stored=8, bits_allocated=8)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    image, = decode(tmp_path / "a.dcm")
    error = np.abs(image.pixels.astype(int) - smooth.astype(int) * 257)
    assert error.mean() < 3 * 257


def test_multiframe_each_frame(tmp_path):
    frames = np.stack([ramp(seed=seed) for seed in range(3)])
    images = decode(write_dicom(tmp_path / "a.dcm", frames))
    assert [image.frame for image in images] == [0, 1, 2]
    assert all(image.frames == 3 for image in images)
    for image, frame in zip(images, frames):
        assert np.array_equal(image.pixels, expected_store(frame, 0, 4095))


def test_multiframe_refused(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.stack([ramp(), ramp(seed=1)]))
    with pytest.raises(IngestError, match="2 frames"):
        decode(path, multiframe="refuse")


def test_missing_frames_native(tmp_path):
    dataset = dicom_dataset(np.stack([ramp(), ramp(seed=1)]))
    dataset.NumberOfFrames = 3
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    with pytest.raises(IngestError, match="NumberOfFrames is 3 but the pixel data contains only 2"):
        decode(tmp_path / "a.dcm")


def test_missing_frames_encapsulated(tmp_path):
    frames = np.stack([ramp(), ramp(seed=1)]).astype(np.uint16)
    dataset = dicom_dataset(frames)
    dataset.compress(RLELossless, frames, generate_instance_uid=False)
    dataset.NumberOfFrames = 3
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    with pytest.raises(IngestError, match="NumberOfFrames is 3"):
        decode(tmp_path / "a.dcm")


def test_truncated_single_frame(tmp_path):
    dataset = dicom_dataset(ramp())
    dataset.PixelData = dataset.PixelData[:100]
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    with pytest.raises(IngestError, match="truncated"):
        decode(tmp_path / "a.dcm")


def test_no_preamble_or_meta_header(tmp_path):
    stored = ramp()
    dataset = dicom_dataset(stored)
    del dataset.file_meta
    path = tmp_path / "bare"
    dataset.save_as(path, implicit_vr=True, little_endian=True)
    assert detect_kind(path) == "dicom"
    image, = decode(path)
    assert np.array_equal(image.pixels, expected_store(stored, 0, 4095))
    assert image.attributes["meta_header"] == "missing"
    assert image.attributes["transfer_syntax"].startswith("Implicit VR Little Endian")


def test_zero_spacing_unknown(tmp_path):
    image, = decode(write_dicom(tmp_path / "a.dcm", ramp(), PixelSpacing=[0, 0]))
    assert image.spacing_mm is None
    assert "PixelSpacing" in image.attributes["spacing_source"]


def test_imager_spacing_fallback(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp(), PixelSpacing=[0, 0],
                       ImagerPixelSpacing=[0.15, 0.2])
    image, = decode(path)
    assert image.spacing_mm == (0.15, 0.2)
    assert image.attributes["spacing_source"] == "ImagerPixelSpacing"


def test_missing_spacing_unknown(tmp_path):
    image, = decode(write_dicom(tmp_path / "a.dcm", ramp()))
    assert image.spacing_mm is None
    assert image.attributes["spacing_source"] == "unknown"


def test_constant_pixels_fail(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", np.full((8, 8), 7))
    with pytest.raises(IngestError, match="constant"):
        decode(path)


def test_window_to_constant_fails(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", ramp(high=100), WindowCenter=3000, WindowWidth=10)
    with pytest.raises(IngestError, match="--voi none"):
        decode(path)


def test_undecodable_names_syntax(tmp_path):
    dataset = dicom_dataset(ramp(high=255), bits_stored=8, bits_allocated=8)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(200)])
    dataset["PixelData"].VR = "OB"
    path = tmp_path / "Doe_Jane_19420101.dcm"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(IngestError) as caught:
        decode(path)
    message = str(caught.value)
    assert "JPEG Baseline" in message
    assert "1.2.840.10008.1.2.4.50" in message
    assert "Doe_Jane" not in message
    assert str(tmp_path) not in message


def test_size_checked_before_decoding(tmp_path):
    dataset = dicom_dataset(ramp())
    dataset.Rows, dataset.Columns = 20000, 10000
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    with pytest.raises(IngestError, match=r"200.0 megapixels\), above --max-megapixels 60"):
        decode(tmp_path / "a.dcm")


def test_patient_id_pseudonymised(tmp_path):
    image, = decode(write_dicom(tmp_path / "a.dcm", ramp()))
    assert image.patient_id.startswith("pat-")
    assert "4711" not in image.patient_id
    assert "4711" not in repr(image.attributes)
    assert "Doe" not in repr(image.attributes)


def test_rgb_greyscale_dicom(tmp_path):
    grey = ramp(high=255).astype(np.uint8)
    dataset = dicom_dataset(grey, bits_stored=8, bits_allocated=8, photometric="RGB")
    dataset.SamplesPerPixel = 3
    dataset.PlanarConfiguration = 0
    dataset.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
    dataset.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    image, = decode(tmp_path / "a.dcm")
    assert np.array_equal(image.pixels, grey.astype(np.uint16) * 257)


@pytest.mark.parametrize("content", [b"hello", bytes(range(256)) * 2])
def test_text_file_not_dicom(tmp_path, content):
    path = tmp_path / "notes.dcm"
    path.write_bytes(content)
    with pytest.raises(IngestError, match="not a DICOM file: no DICM preamble"):
        decode(path)


def test_headerless_dicom_still_read(tmp_path):
    path = tmp_path / "bare.dcm"
    dataset = dicom_dataset(ramp())
    del dataset.file_meta  # no preamble and no File Meta: only the data elements
    dataset.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert len(decode(path)) == 1
