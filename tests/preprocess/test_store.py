"""PyramidStore reads: regions, borders, chunks, pickling, format checks, NGFF readers."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil

import numpy as np
import pytest
import zarr

from preprocess.errors import StoreError
from preprocess.store import PyramidStore, check_zarr_format


def largest(store: PyramidStore):
    """Return the catalog row of the largest image."""
    return max(store.rows(), key=lambda row: row.height * row.width)


def test_rows_filter_by_label(built):
    store = PyramidStore(built[0])
    assert store.labels() == ["fractured", "normal"]
    assert {row.label for row in store.rows(label="normal")} == {"normal"}
    assert len(store.rows()) == 4


def test_read_region_inside_matches_level(built):
    store = PyramidStore(built[0])
    row = largest(store)
    whole = store.read_level(row.image_id, 0)
    pixels, mask = store.read_region(row.image_id, 0, 30, 20, 64, 48)
    assert pixels.dtype == np.float32
    assert np.array_equal(pixels, whole[30:94, 20:68])
    assert mask.min() == 1.0


def test_read_region_border_zero_masked(built):
    store = PyramidStore(built[0])
    row = largest(store)
    height, width = store.level_shape(row.image_id, 1)
    pixels, mask = store.read_region(row.image_id, 1, height - 10, -5, 20, 20)
    whole = store.read_level(row.image_id, 1)
    assert np.array_equal(pixels[:10, 5:], whole[height - 10:, :15])
    assert mask[:10, 5:].min() == 1.0
    assert mask[10:].max() == 0.0
    assert mask[:, :5].max() == 0.0
    assert pixels[10:].max() == 0.0


def test_read_region_outside_all_zero(built):
    store = PyramidStore(built[0])
    row = largest(store)
    pixels, mask = store.read_region(row.image_id, 0, -100, -100, 16, 16)
    assert pixels.max() == 0.0
    assert mask.max() == 0.0


def test_level_shapes_and_chunks(built):
    store = PyramidStore(built[0])
    row = largest(store)
    assert store.level_shape(row.image_id, 0) == (row.height, row.width)
    assert store.level_shape(row.image_id, 1) == ((row.height + 1) // 2, (row.width + 1) // 2)
    assert store.chunk_shape(row.image_id, 0) == (32, 32)
    with pytest.raises(IndexError, match="out of range"):
        store.level_shape(row.image_id, row.levels)


def test_pickle_keeps_only_path(built):
    store = PyramidStore(built[0])
    row = largest(store)
    store.read_region(row.image_id, 0, 0, 0, 8, 8)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.path == store.path
    assert clone._rows is None
    assert len(pickle.dumps(store)) < 300


def _read_in_child(store: PyramidStore, image_id: str) -> np.ndarray:
    return store.read_region(image_id, 0, 3, 5, 40, 40)[0]


def test_spawn_worker_reads_same(built):
    store = PyramidStore(built[0])
    row = largest(store)
    expected = store.read_region(row.image_id, 0, 3, 5, 40, 40)[0]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_read_in_child, (store, row.image_id))
    assert np.array_equal(result, expected)


def test_mixed_zarr_versions_refused(built, tmp_path):
    copy = tmp_path / "mixed.zarr"
    shutil.copytree(built[0], copy)
    (copy / ".zgroup").write_text('{"zarr_format": 2}')
    with pytest.raises(StoreError, match="mixes Zarr v2 metadata"):
        PyramidStore(copy).rows()


def test_deep_check_finds_v2_array(built, tmp_path):
    copy = tmp_path / "mixed.zarr"
    shutil.copytree(built[0], copy)
    image_id = PyramidStore(copy).rows()[0].image_id
    (copy / "images" / image_id / "0" / ".zarray").write_text("{}")
    check_zarr_format(copy)
    with pytest.raises(StoreError, match="mixes"):
        check_zarr_format(copy, deep=True)


def test_v2_store_refused(tmp_path):
    zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="Zarr v2 store"):
        PyramidStore(tmp_path / "old.zarr").rows()


def test_ome_zarr_reader_opens_image(built):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    store = PyramidStore(built[0])
    row = largest(store)
    node, = list(Reader(parse_url(str(built[0] / "images" / row.image_id)))())
    assert len(node.data) == row.levels
    for level, data in enumerate(node.data):
        assert data.shape == store.level_shape(row.image_id, level)
    stored = np.rint(store.read_level(row.image_id, 1) * 65535).astype(np.uint16)
    assert np.array_equal(np.asarray(node.data[1]), stored)


def test_ngff_model_validates(built):
    from ome_zarr_models.v05.image import Image

    store = PyramidStore(built[0])
    for row in store.rows():
        group = zarr.open_group(str(built[0] / "images" / row.image_id), mode="r")
        model = Image.from_zarr(group)
        datasets = model.attributes.ome.multiscales[0].datasets
        assert len(datasets) == row.levels
