"""ChunkReader: window reads equal zarr's for every layout the writer produces."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from preprocess.chunk_reader import ChunkReader
from preprocess.writer import ChunkLayout, write_array
from tests.preprocess.test_writer import LAYOUTS, SHAPES, sparse_image


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout.chunk_size}-"
                         f"{layout.shard_size}-{layout.compression}")
def test_windows_equal_zarr(tmp_path, layout):
    rng = np.random.default_rng(0)
    for number, shape in enumerate(SHAPES):
        folder = tmp_path / str(number)
        write_array(folder, sparse_image(shape, number), layout)
        reference = zarr.open_array(str(folder), mode="r")[...]
        reader = ChunkReader.open(folder)
        assert reader is not None
        assert np.array_equal(reader.read(0, shape[0], 0, shape[1]), reference), shape
        for _ in range(10):
            top, left = int(rng.integers(shape[0])), int(rng.integers(shape[1]))
            bottom = int(rng.integers(top + 1, shape[0] + 1))
            right = int(rng.integers(left + 1, shape[1] + 1))
            window = reader.read(top, bottom, left, right)
            assert np.array_equal(window, reference[top:bottom, left:right]), (shape, top, left)


def test_damaged_shard_index_detected(tmp_path):
    write_array(tmp_path / "a", sparse_image((100, 100), 0), ChunkLayout(32, 64))
    shard = tmp_path / "a" / "c" / "1" / "1"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = ChunkReader.open(tmp_path / "a")
    with pytest.raises(ValueError, match="CRC32C"):
        reader.read(64, 100, 64, 100)


def test_other_layout_not_supported(tmp_path):
    zarr.create_array(str(tmp_path / "a"), shape=(10, 10), dtype="float32", chunks=(5, 5))
    assert ChunkReader.open(tmp_path / "a") is None
