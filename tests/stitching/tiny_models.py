"""Tiny patch-model callables that make the stitching algorithm checkable by hand.

They follow the patch model interface of ``stitching.canvas``: ``denoise_fn(x_t, cond, coords,
mask, timestep, label, level)`` and ``gan_fn(noise, cond, coords, mask, label, level)``, each
returning (B, 1, T, T).
"""

import numpy as np
import torch
from diffusers import DDIMScheduler

from stitching.canvas import LevelJob, Tiling, base_grid


def identity_denoise(x_t, cond, coords, mask, timestep, label, level):
    """Predict x_0 = cond (use with prediction_type="sample")."""
    return cond.clone()


def identity_gan(noise, cond, coords, mask, label, level):
    return cond.clone()


def mixing_denoise(x_t, cond, coords, mask, timestep, label, level):
    """A nonlinear function of every input, standing in for a network."""
    mixed = 0.4 * x_t + 0.5 * cond + 0.2 * coords[:, :1] - 0.1 * coords[:, 1:] + 0.05 * mask
    return torch.tanh(mixed + 0.001 * timestep + 0.1 * label[:, None, None, None])


def mixing_gan(noise, cond, coords, mask, label, level):
    return torch.tanh(0.3 * noise[:, :1] - 0.2 * noise[:, -1:] + cond + 0.1 * coords[:, :1])


def tile_noise(coords: torch.Tensor, salt: int) -> torch.Tensor:
    """Independent noise per tile: a random offset plus white noise, seeded by the tile position."""
    tiles = []
    for tile_coords in coords:
        seed = int(abs(tile_coords[0, 0, 0].item()) * 1e6) * 7919 + int(abs(tile_coords[1, 0, 0].item()) * 1e6) + salt
        generator = torch.Generator().manual_seed(seed)
        offset = 0.5 * torch.randn((), generator=generator)
        texture = 0.1 * torch.randn(tile_coords.shape[1:], generator=generator)
        tiles.append((offset + texture)[None])
    return torch.stack(tiles)


def noise_denoise(x_t, cond, coords, mask, timestep, label, level):
    return tile_noise(coords, int(timestep))


def noise_gan(noise, cond, coords, mask, label, level):
    return tile_noise(coords, 0)


def ddim(steps: int = 4, prediction_type: str = "sample") -> DDIMScheduler:
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def random_cond(shape, tiling: Tiling, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (image (H, W), canvas (H', W') with the image edge-padded) in [-1, 1]."""
    image = np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)
    canvas_shape = base_grid(LevelJob(shape, 0, 0, 0, 0), tiling).canvas_shape
    pad = ((0, canvas_shape[0] - shape[0]), (0, canvas_shape[1] - shape[1]))
    return image, np.pad(image, pad, mode="edge")


CPU = torch.device("cpu")
