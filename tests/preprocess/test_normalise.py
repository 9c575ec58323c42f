"""Store conventions: exact integer mappings, float round trip, greyscale detection."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess import normalise
from preprocess.errors import IngestError


def test_float_round_trip_within_half_step():
    image01 = np.linspace(0, 1, 1001)
    restored = normalise.from_store_uint16(normalise.to_store_uint16(image01))
    assert restored.dtype == np.float32
    assert np.abs(restored - image01).max() <= 0.5 / 65535 + 1e-7


def test_store_values_round_trip_exactly():
    stored = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(normalise.to_store_uint16(normalise.from_store_uint16(stored)), stored)


def test_to_store_clips_and_zeroes_nan():
    values = np.array([-0.5, np.nan, 1.5, 0.5])
    assert normalise.to_store_uint16(values).tolist() == [0, 0, 65535, 32768]


def test_uint8_times_257():
    values = np.arange(256, dtype=np.uint8)
    assert np.array_equal(normalise.integers_to_store(values), values.astype(np.uint16) * 257)


def test_int16_full_range():
    values = np.array([-32768, 0, 32767], dtype=np.int16)
    assert normalise.integers_to_store(values).tolist() == [0, 32768, 65535]


def test_rescale_inverts_when_swapped():
    values = np.array([0, 50, 100])
    assert normalise.rescale_to_store(values, 100, 0).tolist() == [65535, 32768, 0]


def test_near_grey_rgb_accepted():
    grey = np.random.default_rng(0).integers(1, 255, (50, 50)).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, -1)
    rgb[..., 2] += 1  # chroma rounding of a JPEG
    assert normalise.to_greyscale(rgb, 255).shape == (50, 50)


def test_coloured_marker_tolerated():
    rgb = np.full((100, 100, 3), 90, np.uint8)
    rgb[0, :5] = (255, 0, 0)  # 0.05% red pixels
    assert normalise.to_greyscale(rgb, 255).shape == (100, 100)


def test_true_colour_message_gives_share():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 0] = 200
    with pytest.raises(IngestError, match=r"100.0% of pixels"):
        normalise.to_greyscale(rgb, 255)


def test_constant_rejected():
    with pytest.raises(IngestError, match="constant"):
        normalise.require_varying(np.zeros((3, 3)), "image")
