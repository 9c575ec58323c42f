"""The Zarr v3 writer: arrays read back by zarr for every layout, metadata equal to zarr's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype

from preprocess.ngff import AXIS_NAMES
from preprocess.writer import ChunkLayout, write_array

LAYOUTS = [ChunkLayout(), ChunkLayout(32, 64, "zstd", 3), ChunkLayout(32, 0, "none"),
           ChunkLayout(16, 48, "blosc-zstd", 5)]
SHAPES = [(1, 1), (13, 17), (32, 32), (33, 95), (100, 64), (129, 20)]


def sparse_image(shape, seed):
    """Return a uint16 image with random values and an all-zero band (empty chunks)."""
    image = np.random.default_rng(seed).integers(1, 65536, shape).astype(np.uint16)
    image[: shape[0] // 2, : shape[1] // 3] = 0
    return image


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout.chunk_size}-"
                         f"{layout.shard_size}-{layout.compression}")
def test_zarr_reads_every_shape(tmp_path, layout):
    for number, shape in enumerate(SHAPES):
        image = sparse_image(shape, number)
        write_array(tmp_path / str(number), image, layout)
        array = zarr.open_array(str(tmp_path / str(number)), mode="r", zarr_format=3)
        assert np.array_equal(array[...], image), shape
        assert np.array_equal(array[shape[0] // 3:, 1:], image[shape[0] // 3:, 1:]), shape


@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=["default", "small-zstd"])
def test_metadata_equals_zarr(tmp_path, layout):
    shape = (100, 70)
    write_array(tmp_path / "ours", sparse_image(shape, 0), layout)
    chunks, shards = layout.array_shapes(shape)
    reference = zarr.create_array(store=zarr.storage.MemoryStore(), shape=shape, dtype="uint16",
                                  chunks=chunks, shards=shards, compressors=layout.compressors(),
                                  fill_value=0, dimension_names=AXIS_NAMES)
    expected = json.loads(reference.metadata.to_buffer_dict(default_buffer_prototype())[
        "zarr.json"].to_bytes())
    assert json.loads((tmp_path / "ours" / "zarr.json").read_text()) == expected


def test_all_zero_array_writes_no_chunks(tmp_path):
    write_array(tmp_path / "zero", np.zeros((70, 70), np.uint16), ChunkLayout(32, 64))
    assert list((tmp_path / "zero" / "c").iterdir()) == []
    assert zarr.open_array(str(tmp_path / "zero"), mode="r")[...].max() == 0
