"""Real radiographs from the shared data folder: DICOM syntaxes, FracAtlas JPEGs, NIH PNGs.

Skipped when the folder is absent (it is never copied into the repository).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps

from preprocess import privacy
from preprocess.build import build_store
from preprocess.catalog import read_catalog, read_failures
from preprocess.readers.dicom import identifying_values, quiet_pydicom
from preprocess.store import PyramidStore
from tests.preprocess.factory import REAL_DATA, SALT

pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(),
                                reason=f"real radiographs not found at {REAL_DATA}")

LOSSLESS_RG2 = ("RG2_JPLL.dcm", "RG2_JLSL.dcm", "RG2_J2KR.dcm", "RG2_RLE.dcm")
FRACATLAS_FILES = ("IMG0000002.jpg", "IMG0000008.jpg", "IMG0000428.jpg", "IMG0002289.jpg",
                   "IMG0004100.jpg")


def manifest_ids(path: Path) -> dict[str, str]:
    """Return file name -> image id(s) from a manifest."""
    with open(path, newline="") as stream:
        return {Path(record["path"]).name: record["image_ids"] for record in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def dicom_store(tmp_path_factory):
    """A store of every real DICOM file, built once: (store, summary, manifest ids)."""
    root = tmp_path_factory.mktemp("real")
    store = root / "store.zarr"
    summary = build_store([REAL_DATA / "dicom", REAL_DATA / "dicom-undecodable"], store,
                          workers=0, salt=SALT, manifest=root / "manifest.csv")
    return store, summary, manifest_ids(root / "manifest.csv")


def test_every_decodable_dicom_built(dicom_store):
    store, summary, ids = dicom_store
    assert summary.built == 14
    assert len(read_catalog(store / "catalog.csv")) == 14
    decodable = sorted(path.name for path in (REAL_DATA / "dicom").glob("*.dcm"))
    assert all(ids[name].startswith("img-") for name in decodable)


def test_undecodable_fail_with_syntax(dicom_store):
    store, summary, _ = dicom_store
    failures = read_failures(store / "failed.csv")
    expected_keys = {privacy.content_file_key(privacy.file_sha256(path))
                     for path in (REAL_DATA / "dicom-undecodable").glob("*.dcm")}
    assert {failure.file for failure in failures} == expected_keys
    for failure in failures:
        assert "JPEG Extended" in failure.reason
        assert "1.2.840.10008.1.2.4.51" in failure.reason


def test_lossless_variants_identical(dicom_store):
    store, _, ids = dicom_store
    pyramids = PyramidStore(store)
    reference = pyramids.read_level(ids["RG2_UNC.dcm"], 0)
    for name in LOSSLESS_RG2:
        assert np.array_equal(pyramids.read_level(ids[name], 0), reference), name
    lossy = pyramids.read_level(ids["RG2_JPLY_fixed.dcm"], 0)
    assert np.abs(lossy - reference).mean() < 0.01


def test_real_catalog_facts(dicom_store):
    store, _, ids = dicom_store
    rows = {row.image_id: row for row in read_catalog(store / "catalog.csv")}
    rg1 = rows[ids["RG1_UNCR.dcm"]]
    assert rg1.spacing_mm is None
    assert rg1.extra["inversion"] == "MONOCHROME1"
    assert rows[ids["RG2_UNC.dcm"]].spacing_mm == 0.2
    assert rows[ids["CR-ModalitySequenceLUT.dcm"]].extra["modality_transform"] == "lut"
    assert rows[ids["CR-MONO1-10-chest.dcm"]].extra["meta_header"] == "missing"
    assert rows[ids["dx_image.dcm"]].extra["inversion"] == "MONOCHROME1+INVERSE"
    assert (rows[ids["MG1_J2KI.dcm"]].height, rows[ids["MG1_J2KI.dcm"]].width) == (4664, 3064)


def test_rg1_bone_is_bright(dicom_store):
    store, _, ids = dicom_store
    level = PyramidStore(store).read_level(ids["RG1_UNCR.dcm"], 3)
    height, width = level.shape
    # Chest PA: the spine in the centre column is denser than the lung fields beside it.
    spine = level[height // 3: 2 * height // 3, width // 2 - 5: width // 2 + 5].mean()
    lung = level[height // 3: 2 * height // 3, width // 4 - 5: width // 4 + 5].mean()
    assert spine > lung


def test_no_identifier_reaches_store(dicom_store):
    store, _, _ = dicom_store
    secrets = set()
    for path in [*(REAL_DATA / "dicom").glob("*.dcm"), *(REAL_DATA / "dicom-undecodable").glob(
            "*.dcm")]:
        with quiet_pydicom():
            dataset = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            secrets.update(value for value in identifying_values(dataset) if len(value) >= 4)
        secrets.add(path.stem)
    texts = [path.read_text("utf-8") for path in store.rglob("*")
             if path.is_file() and path.suffix in (".json", ".csv")]
    for secret in secrets:
        assert not any(secret in text for text in texts), secret


def test_fracatlas_labels_by_relative_path(tmp_path):
    folder = REAL_DATA / "fracatlas"
    files = [folder / "images" / name for name in FRACATLAS_FILES]
    store = tmp_path / "store.zarr"
    summary = build_store(files, store, labels_csv=folder / "labels.csv", workers=0,
                          manifest=tmp_path / "manifest.csv")
    with open(folder / "labels.csv", newline="") as stream:
        expected = {Path(record["file"]).name: record["label"] for record in csv.DictReader(stream)}
    ids = manifest_ids(tmp_path / "manifest.csv")
    rows = {row.image_id: row for row in read_catalog(store / "catalog.csv")}
    for name in FRACATLAS_FILES[:4]:
        assert rows[ids[name]].label == expected[name], name
    failure, = summary.failed
    assert "truncated JPEG" in failure.reason
    assert failure.file == privacy.content_file_key(
        hashlib.sha256((folder / "images" / "IMG0004100.jpg").read_bytes()).hexdigest())


def test_fracatlas_orientation_and_colour(tmp_path):
    folder = REAL_DATA / "fracatlas" / "images"
    store = tmp_path / "store.zarr"
    build_store([folder / "IMG0000428.jpg", folder / "IMG0002289.jpg"], store, workers=0,
                manifest=tmp_path / "manifest.csv")
    ids = manifest_ids(tmp_path / "manifest.csv")
    pyramids = PyramidStore(store)
    for name in ("IMG0000428.jpg", "IMG0002289.jpg"):
        upright = np.asarray(ImageOps.exif_transpose(Image.open(folder / name)).convert("L"))
        stored = np.rint(pyramids.read_level(ids[name], 0) * 65535).astype(np.uint16)
        assert stored.shape == upright.shape, name
        assert np.array_equal(stored, upright.astype(np.uint16) * 257), name


def test_nih_png_exact(tmp_path):
    store = tmp_path / "store.zarr"
    build_store([REAL_DATA / "png"], store, workers=0, manifest=tmp_path / "manifest.csv")
    ids = manifest_ids(tmp_path / "manifest.csv")
    pyramids = PyramidStore(store)
    for path in (REAL_DATA / "png").glob("*.png"):
        original = np.asarray(Image.open(path)).astype(np.uint16) * 257
        stored = np.rint(pyramids.read_level(ids[path.name], 0) * 65535).astype(np.uint16)
        assert np.array_equal(stored, original), path.name
