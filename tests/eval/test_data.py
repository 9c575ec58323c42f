"""Reading synthetic outputs."""

import numpy as np
import pytest
from PIL import Image

from eval.data import read_png_uint16


def test_truncated_png_names_file(tmp_path):
    path = tmp_path / "fractured_00000.png"
    noise = np.random.default_rng(0).integers(0, 65535, (64, 64), dtype=np.uint16)
    Image.fromarray(noise).save(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="fractured_00000.png"):
        read_png_uint16(path)


def test_sixteen_bit_png_round_trips(tmp_path):
    path = tmp_path / "image.png"
    pixels = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(pixels).save(path)
    assert np.array_equal(read_png_uint16(path), pixels)
