"""HDF5 reading: dataset choice, one image per leading index, spacing attributes."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from preprocess.errors import IngestError
from preprocess.readers import ReadOptions, read_images


def decode(path, **options):
    """Return all DecodedImages of an HDF5 file."""
    return list(read_images(path, "hdf5", ReadOptions(**options)))


def test_single_dataset_2d(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (20, 30)).astype(np.uint16)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["scan"] = pixels
        handle["scan"].attrs["spacing_mm"] = [0.1, 0.2]
    image, = decode(tmp_path / "a.h5")
    assert np.array_equal(image.pixels, pixels)
    assert image.spacing_mm == (0.1, 0.2)


def test_leading_index_images(tmp_path):
    stack = np.random.default_rng(1).integers(0, 256, (3, 10, 12)).astype(np.uint8)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["group/stack"] = stack
        handle["labels"] = np.arange(3)
    images = decode(tmp_path / "a.h5", h5_dataset="group/stack")
    assert [image.frame for image in images] == [0, 1, 2]
    for image, plane in zip(images, stack):
        assert np.array_equal(image.pixels, plane.astype(np.uint16) * 257)


def test_ambiguous_dataset_rejected(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["one"] = np.ones((4, 4), np.uint8)
        handle["two"] = np.ones((4, 4), np.uint8)
    with pytest.raises(IngestError, match="--h5-dataset"):
        decode(tmp_path / "a.h5")


def test_missing_dataset_rejected(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["one"] = np.ones((4, 4), np.uint8)
    with pytest.raises(IngestError, match="--h5-dataset nothing"):
        decode(tmp_path / "a.h5", h5_dataset="nothing")


def test_float_data_minmax(tmp_path):
    values = np.linspace(-1000, 3000, 64).reshape(8, 8)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["ct"] = values
        handle["ct"].attrs["element_size_um"] = [1.0, 150.0, 150.0]
    image, = decode(tmp_path / "a.h5")
    assert image.pixels.min() == 0
    assert image.pixels.max() == 65535
    assert image.attributes["intensity"] == "minmax"
    assert image.spacing_mm == (0.15, 0.15)
