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


class StubGlobalSampler:
    """The global sampler interface of ``patchgen.inference`` with an analytic layout.

    The layout is a smooth ramp plus a little generator noise, so every level has structure.
    ``fail_size`` makes ``sample_layout`` raise for that native size.
    """

    resolution = 16

    def __init__(self, checkpoint_path, sizes=None, fail_size=None):
        from patchgen.global_model import layout_level

        self.labels = ["fractured", "non_fractured"]
        self.sizes = sizes or {"fractured": [(100, 70), (61, 90)], "non_fractured": [(90, 61)]}
        self.checkpoint_path = checkpoint_path
        self.fail_size = fail_size
        self._layout_level = layout_level

    def draw_native_size(self, label, rng, min_megapixels=0.0, max_megapixels=float("inf")):
        sizes = [s for s in self.sizes[label]
                 if min_megapixels * 1e6 <= s[0] * s[1] <= max_megapixels * 1e6]
        return sizes[int(rng.integers(len(sizes)))]

    def layout_level(self, native_size):
        return self._layout_level(native_size, self.resolution)

    def sample_layout(self, label, native_size, generator, steps=None, guidance_scale=None):
        from patchgen.conditioning import level_shape

        if tuple(native_size) == self.fail_size:
            raise RuntimeError("layout sampling failed on purpose")
        height, width = level_shape(native_size, self.layout_level(native_size))
        ramp = np.add.outer(np.linspace(0.2, 0.5, height), np.linspace(0.0, 0.3, width))
        noise = 0.05 * torch.rand((height, width), generator=generator).numpy()
        return (ramp + noise).astype(np.float32)

    def spacing_mm(self, label):
        return 0.2


class StubPatchSampler:
    """The patch sampler interface of ``patchgen.inference`` around the tiny callables above."""

    def __init__(self, checkpoint_path, kind="diffusion", patch_size=32, level_gap=1):
        self.kind = kind
        self.patch_size = patch_size
        self.level_gap = level_gap
        self.labels = ["fractured", "non_fractured"]
        self.checkpoint_path = checkpoint_path
        self.noise_channels = 2
        self.prediction_type = "sample"

    def label_index(self, label):
        return self.labels.index(label)

    def make_scheduler(self, steps=None):
        return ddim(steps or 3)

    def denoise_fn(self, x_t, cond, coords, mask, timestep, label, level):
        return torch.tanh(cond + 0.05 * x_t)

    def gan_fn(self, noise, cond, coords, mask, label, level):
        return torch.tanh(cond + 0.05 * noise[:, :1])
