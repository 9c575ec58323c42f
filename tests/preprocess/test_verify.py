"""pyramid verify and info on a built store, and on damaged copies."""

from __future__ import annotations

import shutil

from preprocess.store import PyramidStore
from preprocess.verify import store_info, verify_store


def test_built_store_verifies(built):
    report = verify_store(built[0])
    assert report.ok, str(report)
    assert report.images_checked == 4
    assert report.levels_checked == sum(row.levels for row in PyramidStore(built[0]).rows())


def test_changed_pixels_found(built, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built[0], copy)
    row = max(PyramidStore(copy).rows(), key=lambda row: row.height)
    import zarr

    array = zarr.open_array(str(copy / "images" / row.image_id / "0"), mode="r+")
    array[0, 0] = (int(array[0, 0]) + 1) % 65536
    report = verify_store(copy)
    assert not report.ok
    assert any("checksum" in problem and row.image_id in problem for problem in report.problems)


def test_missing_image_found(built, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(built[0], copy)
    row = PyramidStore(copy).rows()[0]
    shutil.rmtree(copy / "images" / row.image_id)
    report = verify_store(copy)
    assert f"{row.image_id}: in catalog.csv but no complete image group" in report.problems


def test_info_counts(built):
    info = store_info(built[0])
    assert info.images == 4
    assert info.failures == 1
    assert sum(sum(counts.values()) for counts in info.by_label_split.values()) == 4
    assert info.height_range == (13, 150)
    assert info.spacing_known == 1
    assert "fractured" in str(info)
