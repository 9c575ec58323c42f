"""Seeded noise per owned cell, and the conditioning canvas."""

import numpy as np
import pytest
import torch

from patchgen.conditioning import upsample_to
from stitching.seeds import Stream, cell_noise, key_seed, torch_generator
from stitching.storage import CanvasStore, conditioning_canvas
from stitching.tiles import tile_grid


def test_key_seed_differs_per_part():
    seeds = {key_seed(0, 0, 0, Stream.INITIAL_NOISE, 0), key_seed(1, 0, 0, Stream.INITIAL_NOISE, 0),
             key_seed(0, 1, 0, Stream.INITIAL_NOISE, 0), key_seed(0, 0, 1, Stream.INITIAL_NOISE, 0),
             key_seed(0, 0, 0, Stream.GAN_NOISE, 0), key_seed(0, 0, 0, Stream.INITIAL_NOISE, 1)}
    assert len(seeds) == 6


def test_key_seed_rejects_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        key_seed(-1, 0, 0, Stream.LAYOUT)


def test_torch_generator_repeats():
    first = torch.randn(5, generator=torch_generator(4, 2, 1, Stream.LAYOUT))
    second = torch.randn(5, generator=torch_generator(4, 2, 1, Stream.LAYOUT))
    assert torch.equal(first, second)


def test_cell_noise_independent_of_bands():
    grid = tile_grid((101, 70), tile_size=32, overlap=8)
    key = (7, 0, 0, int(Stream.INITIAL_NOISE))
    whole = cell_noise(grid, slice(0, 101), key, channels=2)
    bands = np.concatenate([cell_noise(grid, slice(top, min(top + 13, 101)), key, channels=2)
                            for top in range(0, 101, 13)], axis=1)
    assert whole.shape == (2, 101, 70)
    assert np.array_equal(whole, bands)


def test_cell_noise_is_standard_normal():
    grid = tile_grid((256, 256), tile_size=64, overlap=16)
    noise = cell_noise(grid, slice(0, 256), (0, 0, 0, int(Stream.INITIAL_NOISE)))
    assert abs(float(noise.mean())) < 0.02
    assert abs(float(noise.std()) - 1.0) < 0.02


def test_cells_draw_independent_noise():
    grid = tile_grid((128, 128), tile_size=64, overlap=16)
    noise = cell_noise(grid, slice(0, 128), (0, 0, 0, int(Stream.INITIAL_NOISE)))[0]
    first_cell = noise[:48, :48].ravel()
    second_cell = noise[:48, 48:96].ravel()
    assert abs(np.corrcoef(first_cell, second_cell)[0, 1]) < 0.05


@pytest.mark.parametrize("shape,above_shape", [((101, 70), (51, 35)), ((64, 200), (32, 100))])
def test_cond_canvas_equals_upsample(shape, above_shape):
    above = np.random.default_rng(0).uniform(-1, 1, size=above_shape).astype(np.float32)
    cond = conditioning_canvas(above, above_shape, shape, shape, 2, CanvasStore())
    expected = upsample_to(torch.from_numpy(above)[None, None], shape)[0, 0].numpy()
    assert np.array_equal(cond, expected)


def test_cond_canvas_on_disk_matches_host(tmp_path):
    above = np.random.default_rng(1).uniform(-1, 1, size=(51, 35)).astype(np.float32)
    host = conditioning_canvas(above, (51, 35), (101, 70), (104, 72), 2, CanvasStore())
    disk = conditioning_canvas(above, (51, 35), (101, 70), (104, 72), 2,
                               CanvasStore(tmp_path, disk_min_pixels=0, band_rows=7))
    assert np.abs(host - disk[:]).max() < 1e-6


def test_cond_canvas_pads_by_edge_repetition():
    above = np.random.default_rng(2).uniform(-1, 1, size=(11, 7)).astype(np.float32)
    cond = conditioning_canvas(above, (11, 7), (21, 13), (32, 32), 2, CanvasStore())
    assert np.array_equal(cond[21:, :13], np.repeat(cond[20:21, :13], 11, axis=0))
    assert np.array_equal(cond[:, 13:], np.repeat(cond[:, 12:13], 19, axis=1))


def test_cond_canvas_level_gap_two():
    above = np.random.default_rng(3).uniform(-1, 1, size=(13, 9)).astype(np.float32)
    cond = conditioning_canvas(above, (13, 9), (50, 33), (52, 36), 4, CanvasStore())
    expected = upsample_to(torch.from_numpy(above)[None, None], (50, 33), 4)[0, 0].numpy()
    assert np.array_equal(cond[:50, :33], expected)


def test_store_places_large_canvas_on_disk(tmp_path):
    store = CanvasStore(tmp_path, disk_min_pixels=1000, band_rows=8)
    small = store.full("small", (20, 20))
    large = store.full("large", (40, 40), value=2.0)
    assert isinstance(small, np.ndarray)
    assert not isinstance(large, np.ndarray)
    assert float(large[5, 5]) == 2.0
    assert len(store.row_bands((40, 40))) == 5


def test_store_without_folder_stays_in_memory():
    store = CanvasStore(None, disk_min_pixels=0)
    assert isinstance(store.full("x", (40, 40)), np.ndarray)
    assert store.row_bands((40, 40)) == [slice(0, 40)]
