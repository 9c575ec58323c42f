"""Tiled level sampling: exact reproduction, global coordinates, seams, batch invariance."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from eval.seams import seam_score
from patchgen.conditioning import coordinate_grid
from stitching.canvas import (LevelJob, Tiling, base_grid, first_step, sample_level_diffusion,
                             sample_level_gan)
from stitching.storage import CanvasStore
from tests.stitching.tiny_models import (CPU, ddim, identity_denoise, identity_gan, mixing_denoise,
                                         mixing_gan, noise_denoise, noise_gan, random_cond,
                                         tile_noise)

SHAPES = [(101, 70), (70, 101), (20, 13), (64, 200)]


def job_for(shape, seed=3, image_index=1, level=0, label_index=1):
    return LevelJob(shape, level, label_index, seed, image_index)


def grid_record(shape, tiling):
    grid = base_grid(job_for(shape), tiling)
    return {"level": 0, "tile_size": grid.tile_size, "origins_yx": grid.origins}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("align", [1, 2])
def test_gan_identity_reproduces_cond(shape, align):
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, align=align)
    image, cond = random_cond(shape, tiling)
    out = sample_level_gan(identity_gan, 2, cond, job_for(shape), tiling, CanvasStore(), CPU)
    assert np.abs(out[:shape[0], :shape[1]] - image).max() < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grid_shift", [False, True])
def test_diffusion_identity_reproduces_cond(shape, grid_shift):
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, grid_shift=grid_shift, align=2)
    image, cond = random_cond(shape, tiling)
    out = sample_level_diffusion(identity_denoise, ddim(), cond, job_for(shape), tiling,
                                 CanvasStore(), CPU, eta=0.0)
    assert np.abs(out[:shape[0], :shape[1]] - image).max() < 1e-6


@pytest.mark.parametrize("strength", [0.25, 0.5])
def test_identity_from_noised_cond_is_exact(strength):
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, grid_shift=True, align=2)
    image, cond = random_cond(shape, tiling)
    out = sample_level_diffusion(identity_denoise, ddim(8), cond, job_for(shape), tiling,
                                 CanvasStore(), CPU, strength=strength)
    assert np.abs(out[:shape[0], :shape[1]] - image).max() < 1e-6


@pytest.mark.parametrize(("strength", "start"), [(1.0, 0), (0.5, 4), (0.25, 6), (0.01, 7)])
def test_first_step_share_of_timesteps(strength, start):
    assert first_step(ddim(8), strength) == start


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_first_step_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        first_step(ddim(8), strength)


def test_strength_sets_start_timestep():
    shape = (40, 40)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=16)
    _, cond = random_cond(shape, tiling)
    timesteps = []

    def record(x_t, cond, coords, mask, timestep, label, level):
        timesteps.append(timestep)
        return cond.clone()

    sample_level_diffusion(record, ddim(8), cond, job_for(shape), tiling, CanvasStore(), CPU,
                           strength=0.25)
    assert timesteps == [int(t) for t in ddim(8).timesteps[6:]]


def test_strength_stays_closer_to_cond():
    shape = (64, 64)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=4, align=2)
    image, cond = random_cond(shape, tiling)
    full = sample_level_diffusion(mixing_denoise, ddim(8, "epsilon"), cond, job_for(shape), tiling,
                                  CanvasStore(), CPU)
    partial = sample_level_diffusion(mixing_denoise, ddim(8, "epsilon"), cond, job_for(shape),
                                     tiling, CanvasStore(), CPU, strength=0.25)
    error_full = np.abs(full[:64, :64] - image).mean()
    error_partial = np.abs(partial[:64, :64] - image).mean()
    assert error_partial < error_full


def test_disk_equals_host_with_strength(tmp_path):
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, grid_shift=True, align=2)
    _, cond = random_cond(shape, tiling)
    host = sample_level_diffusion(mixing_denoise, ddim(8, "epsilon"), cond, job_for(shape),
                                  tiling, CanvasStore(), CPU, eta=0.5, strength=0.5)
    disk = sample_level_diffusion(mixing_denoise, ddim(8, "epsilon"), cond, job_for(shape),
                                  tiling, CanvasStore(tmp_path, disk_min_pixels=0, band_rows=17),
                                  CPU, eta=0.5, strength=0.5)
    assert np.array_equal(host, disk[:])


@pytest.mark.parametrize("channel", [0, 1])
def test_gan_coordinates_match_global_grid(channel):
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=4)
    _, cond = random_cond(shape, tiling)

    def echo(noise, cond, coords, mask, label, level):
        return coords[:, channel:channel + 1].clone()

    out = sample_level_gan(echo, 1, cond, job_for(shape), tiling, CanvasStore(), CPU)
    expected = coordinate_grid(0, 0, *shape, *shape)[channel].numpy()
    assert np.abs(out[:shape[0], :shape[1]] - expected).max() < 1e-6


@pytest.mark.parametrize("channel", [0, 1])
def test_diffusion_coordinates_match_global_grid(channel):
    shape = (70, 101)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=4, grid_shift=True, align=2)
    _, cond = random_cond(shape, tiling)

    def echo(x_t, cond, coords, mask, timestep, label, level):
        return coords[:, channel:channel + 1].clone()

    out = sample_level_diffusion(echo, ddim(), cond, job_for(shape), tiling, CanvasStore(), CPU)
    expected = coordinate_grid(0, 0, *shape, *shape)[channel].numpy()
    assert np.abs(out[:shape[0], :shape[1]] - expected).max() < 1e-6


def test_mask_marks_image_pixels():
    shape = (20, 45)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=3)
    _, cond = random_cond(shape, tiling)

    def mask_echo(noise, cond, coords, mask, label, level):
        return mask.clone()

    out = sample_level_gan(mask_echo, 1, cond, job_for(shape), tiling, CanvasStore(), CPU)
    assert np.abs(out[:20, :45] - 1.0).max() < 1e-6
    assert np.abs(out[20:, :]).max() < 1e-6


def hard_paste(shape, tiling):
    """Paste each tile's independent noise over the previous tiles, with no blending."""
    grid = base_grid(job_for(shape), tiling)
    canvas = np.zeros(grid.canvas_shape, dtype=np.float32)
    for y, x in grid.origins:
        coords = coordinate_grid(y, x, tiling.tile_size, tiling.tile_size, *shape)[None]
        canvas[y:y + tiling.tile_size, x:x + tiling.tile_size] = tile_noise(coords, 0)[0, 0].numpy()
    return canvas[:shape[0], :shape[1]]


def test_hard_paste_has_seams():
    shape = (160, 190)
    tiling = Tiling(tile_size=32, overlap=8)
    score = seam_score((hard_paste(shape, tiling) + 1) / 2, grid_record(shape, tiling))
    assert score > 1.5


def test_gan_blend_of_independent_tiles_has_no_seam():
    shape = (160, 190)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=8)
    _, cond = random_cond(shape, tiling)
    out = sample_level_gan(noise_gan, 1, cond, job_for(shape), tiling, CanvasStore(), CPU)
    score = seam_score((out[:shape[0], :shape[1]] + 1) / 2, grid_record(shape, tiling))
    assert score < 1.5


@pytest.mark.parametrize("grid_shift", [False, True])
def test_diffusion_blend_of_independent_tiles_has_no_seam(grid_shift):
    shape = (160, 190)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=8, grid_shift=grid_shift)
    _, cond = random_cond(shape, tiling)
    out = sample_level_diffusion(noise_denoise, ddim(), cond, job_for(shape), tiling,
                                 CanvasStore(), CPU)
    score = seam_score((out[:shape[0], :shape[1]] + 1) / 2, grid_record(shape, tiling))
    assert score < 1.5


@pytest.mark.parametrize("shape", [(101, 70), (20, 13)])
def test_diffusion_same_for_any_tile_batch(shape):
    outputs = []
    for tile_batch in (1, 4, 64):
        tiling = Tiling(tile_size=32, overlap=8, tile_batch=tile_batch, grid_shift=True, align=2)
        _, cond = random_cond(shape, tiling)
        outputs.append(sample_level_diffusion(mixing_denoise, ddim(prediction_type="epsilon"),
                                              cond, job_for(shape), tiling, CanvasStore(), CPU,
                                              eta=0.7))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], outputs[2])


def test_gan_same_for_any_tile_batch():
    shape = (101, 70)
    outputs = []
    for tile_batch in (1, 3, 64):
        tiling = Tiling(tile_size=32, overlap=8, tile_batch=tile_batch)
        _, cond = random_cond(shape, tiling)
        outputs.append(sample_level_gan(mixing_gan, 3, cond, job_for(shape), tiling, CanvasStore(), CPU))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], outputs[2])


def test_seed_changes_diffusion_output():
    shape = (64, 64)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=4)
    _, cond = random_cond(shape, tiling)
    first = sample_level_diffusion(mixing_denoise, ddim(prediction_type="epsilon"), cond,
                                   job_for(shape, seed=1), tiling, CanvasStore(), CPU)
    second = sample_level_diffusion(mixing_denoise, ddim(prediction_type="epsilon"), cond,
                                    job_for(shape, seed=2), tiling, CanvasStore(), CPU)
    assert np.abs(first - second).max() > 1e-3


def test_disk_canvas_equals_host_canvas(tmp_path):
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, grid_shift=True, align=2)
    _, cond = random_cond(shape, tiling)
    host = sample_level_diffusion(mixing_denoise, ddim(prediction_type="epsilon"), cond,
                                  job_for(shape), tiling, CanvasStore(), CPU, eta=0.5)
    disk_store = CanvasStore(tmp_path, disk_min_pixels=0, band_rows=17)
    disk = sample_level_diffusion(mixing_denoise, ddim(prediction_type="epsilon"), cond,
                                  job_for(shape), tiling, disk_store, CPU, eta=0.5)
    assert not isinstance(disk, np.ndarray)
    assert np.array_equal(host, disk[:])


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_disk_canvas_with_multistep_scheduler(tmp_path, strength):
    shape = (90, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5, align=2)
    _, cond = random_cond(shape, tiling)
    outputs = []
    for store in (CanvasStore(), CanvasStore(tmp_path, disk_min_pixels=0, band_rows=20)):
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
        scheduler.set_timesteps(5)
        outputs.append(np.asarray(sample_level_diffusion(mixing_denoise, scheduler, cond,
                                                         job_for(shape), tiling, store, CPU,
                                                         strength=strength)[:]))
    assert np.array_equal(outputs[0], outputs[1])


def test_gan_disk_canvas_equals_host_canvas(tmp_path):
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=5)
    _, cond = random_cond(shape, tiling)
    host = sample_level_gan(mixing_gan, 2, cond, job_for(shape), tiling, CanvasStore(), CPU)
    disk = sample_level_gan(mixing_gan, 2, cond, job_for(shape), tiling,
                            CanvasStore(tmp_path, disk_min_pixels=0, band_rows=16), CPU)
    assert np.array_equal(host, disk[:])


def test_wrong_model_output_shape_raises():
    shape = (40, 40)
    tiling = Tiling(tile_size=32, overlap=8)
    _, cond = random_cond(shape, tiling)

    def too_small(noise, cond, coords, mask, label, level):
        return cond[..., :16, :16]

    with pytest.raises(ValueError, match="expected"):
        sample_level_gan(too_small, 1, cond, job_for(shape), tiling, CanvasStore(), CPU)


def test_model_receives_label_and_level():
    shape = (40, 40)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=3)
    _, cond = random_cond(shape, tiling)
    seen = []

    def record(noise, cond, coords, mask, label, level):
        seen.append((label.tolist(), level.tolist()))
        return cond

    sample_level_gan(record, 1, cond, job_for(shape, level=2, label_index=1), tiling,
                     CanvasStore(), CPU)
    assert all(set(labels) == {1} and set(levels) == {2} for labels, levels in seen)
    assert sum(len(labels) for labels, _ in seen) == 4


def test_tile_inputs_are_tile_sized():
    shape = (101, 70)
    tiling = Tiling(tile_size=32, overlap=8, tile_batch=4)
    _, cond = random_cond(shape, tiling)
    shapes = set()

    def record(x_t, cond, coords, mask, timestep, label, level):
        shapes.add((tuple(x_t.shape[1:]), tuple(cond.shape[1:]), tuple(coords.shape[1:]),
                    tuple(mask.shape[1:]), x_t.dtype))
        return cond

    sample_level_diffusion(record, ddim(2), cond, job_for(shape), tiling, CanvasStore(), CPU)
    assert shapes == {((1, 32, 32), (1, 32, 32), (2, 32, 32), (1, 32, 32), torch.float32)}
