"""Output files: 16-bit PNG, preview, DICOM secondary capture, OME-Zarr, sidecar."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import zarr
from PIL import Image

from stitching.writers import (DicomInfo, checkpoint_sha256, software_version, write_dicom,
                               write_ome_zarr, write_png16, write_preview, write_sidecar)

RADIOGRAPHS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "radiographs"


@pytest.fixture
def pixels():
    ramp = np.linspace(0, 65535, 101 * 70).reshape(101, 70)
    return ramp.astype(np.uint16)


def info(spacing_mm=0.2):
    return DicomInfo("fractured_00003", "fractured", 3, spacing_mm, software_version())


def test_png16_round_trip(tmp_path, pixels):
    path = tmp_path / "image.png"
    write_png16(path, pixels)
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        assert image.size == (70, 101)
        assert np.array_equal(np.asarray(image).astype(np.uint16), pixels)


def test_preview_is_8_bit_and_small(tmp_path, pixels):
    path = tmp_path / "image.preview.png"
    write_preview(path, pixels, max_side=50)
    with Image.open(path) as image:
        assert image.mode == "L"
        assert max(image.size) == 50


def test_atomic_write_leaves_no_temporary(tmp_path, pixels):
    write_png16(tmp_path / "image.png", pixels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]


def test_dicom_reads_back(tmp_path, pixels):
    path = tmp_path / "image.dcm"
    write_dicom(path, pixels, info())
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (101, 70)
    assert np.array_equal(ds.pixel_array, pixels)
    assert str(ds.PatientName) == "SYNTHETIC"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.BurnedInAnnotation == "NO"
    assert "synthetic" in ds.ImageComments.lower()
    assert [float(v) for v in ds.PixelSpacing] == [0.2, 0.2]


def test_dicom_without_spacing(tmp_path, pixels):
    path = tmp_path / "image.dcm"
    write_dicom(path, pixels, info(spacing_mm=None))
    assert "PixelSpacing" not in pydicom.dcmread(path)


def test_dicom_uids_are_new(tmp_path, pixels):
    write_dicom(tmp_path / "a.dcm", pixels, info())
    write_dicom(tmp_path / "b.dcm", pixels, info())
    first, second = pydicom.dcmread(tmp_path / "a.dcm"), pydicom.dcmread(tmp_path / "b.dcm")
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.StudyInstanceUID != second.StudyInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID


def test_dicom_has_no_training_patient_data(tmp_path, pixels):
    source = RADIOGRAPHS / "dicom"
    if not source.is_dir():
        pytest.skip(f"real DICOM files not found at {source}")
    path = tmp_path / "image.dcm"
    write_dicom(path, pixels, info())
    written = path.read_bytes()
    for real in sorted(source.iterdir()):
        try:
            real_ds = pydicom.dcmread(real, stop_before_pixels=True, force=True)
        except Exception:  # a file pydicom cannot parse carries no name to compare
            continue
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            value = str(real_ds.get(keyword, "") or "").strip()
            if len(value) >= 3:
                assert value.encode() not in written, f"{keyword} of {real.name} found in output"


def test_ome_zarr_pyramid(tmp_path, pixels):
    path = tmp_path / "image.ome.zarr"
    write_ome_zarr(path, pixels, "fractured_00003", spacing_mm=0.2)
    group = zarr.open_group(str(path), mode="r")
    multiscales = group.attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in multiscales["datasets"]] == ["0", "1"]
    assert np.array_equal(group["0"][:], pixels)
    assert group["1"].shape == (51, 35)
    scale = multiscales["datasets"][1]["coordinateTransformations"][0]["scale"]
    assert scale == [0.4, 0.4]


def test_ome_zarr_opens_in_reader(tmp_path, pixels):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path = tmp_path / "image.ome.zarr"
    write_ome_zarr(path, pixels, "fractured_00003", spacing_mm=None)
    nodes = list(Reader(parse_url(str(path)))())
    assert nodes[0].data[0].shape == (101, 70)


def test_sidecar_json(tmp_path):
    path = tmp_path / "image.json"
    write_sidecar(path, {"name": "x", "seed": 1})
    assert path.read_text().startswith("{")


def test_checkpoint_sha256_of_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    first = checkpoint_sha256(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{\"a\": 1}")
    assert first != checkpoint_sha256(tmp_path / "model")
    assert len(first) == 64


def test_checkpoint_sha256_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        checkpoint_sha256(tmp_path / "absent")
