"""Typed defaults of the synthesize stage; presets live in ``configs/synth/``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from patchgen.config import ConfigError

OUTPUT_FORMATS = ("png", "dicom", "zarr")
SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")


# DDIM with diffusers' default "leading" spacing runs a single step at timestep 0, where the
# model treats its input as clean and returns the initial noise.
ONE_STEP = "a single DDIM step runs at timestep 0 and returns the initial noise"


@dataclass
class LayoutSamplingConfig:
    """Sampling of the global layout model."""

    steps: int | None = None             # denoising steps; None = the global run's default
    guidance_scale: float | None = None  # classifier-free guidance; None = the run's default

    def validate(self) -> None:
        if self.steps is not None and self.steps < 2:
            raise ConfigError(f"layout.steps={self.steps}; use 2 or more, or null ({ONE_STEP})")


@dataclass
class PatchSamplingConfig:
    """Sampling of the patch model at every level below the layout."""

    steps: int | None = None  # denoising steps per level; None = the patch run's default
    eta: float = 0.0          # DDIM eta: 0 is deterministic given the initial noise, 1 is DDPM-like
    strength: float = 1.0     # 1: from pure noise; below 1: from the noised level above (SDEdit)

    def validate(self) -> None:
        if self.steps is not None and self.steps < 2:
            raise ConfigError(f"patch.steps={self.steps}; use 2 or more, or null ({ONE_STEP})")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"patch.eta={self.eta}; use a value in [0, 1]")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"patch.strength={self.strength}; use a value in (0, 1], 1 for "
                              f"sampling from pure noise")


@dataclass
class CanvasConfig:
    """Tiling of each level canvas and where the canvas lives."""

    tile_size: int | None = None  # tile side in pixels; None = the patch model's patch size
    overlap: int = 16             # pixels shared by neighbouring tiles
    tile_batch: int = 16          # tiles per model call; device memory grows with it
    grid_shift: bool = True       # move the tile grid by a random offset at every denoising step
    window_floor: float = 0.01    # smallest blending weight at a tile edge, in (0, 1]
    disk_megapixels: float = 24.0  # canvases of at least this many pixels (1e6) live on disk
    band_rows: int = 512          # rows per scheduler step on disk canvases

    def validate(self) -> None:
        if self.tile_size is not None and self.tile_size < 8:
            raise ConfigError(f"canvas.tile_size={self.tile_size}; use at least 8 pixels or null")
        if self.overlap < 0:
            raise ConfigError(f"canvas.overlap={self.overlap}; use a non-negative pixel count")
        if self.tile_size is not None and self.overlap >= self.tile_size:
            raise ConfigError(f"canvas.overlap={self.overlap} must be below "
                              f"canvas.tile_size={self.tile_size}")
        if self.tile_batch < 1:
            raise ConfigError(f"canvas.tile_batch={self.tile_batch}; use at least 1")
        if not 0.0 < self.window_floor <= 1.0:
            raise ConfigError(f"canvas.window_floor={self.window_floor}; use a value in (0, 1]")
        if self.disk_megapixels <= 0:
            raise ConfigError(f"canvas.disk_megapixels={self.disk_megapixels}; use a positive "
                              f"number (a very large one keeps every canvas in memory)")
        if self.band_rows < 1:
            raise ConfigError(f"canvas.band_rows={self.band_rows}; use at least 1")


@dataclass
class OutputConfig:
    """Files written per image besides the JSON sidecar."""

    formats: list[str] = field(default_factory=lambda: ["png"])  # png, dicom, zarr
    preview_max_side: int = 1024  # long side of the 8-bit preview in pixels; 0 = native size

    def validate(self) -> None:
        unknown = sorted(set(self.formats) - set(OUTPUT_FORMATS))
        if unknown or not self.formats:
            raise ConfigError(f"output.formats={self.formats}; choose one or more of "
                              f"{list(OUTPUT_FORMATS)}")
        if self.preview_max_side < 0:
            raise ConfigError(f"output.preview_max_side={self.preview_max_side}; use 0 or more")


@dataclass
class SynthConfig:
    """Everything ``synthesize`` needs besides the two runs and the output folder."""

    n: int = 2                      # number of images; image i has index i
    seed: int = 0                   # run seed; image i draws everything from (seed, i, ...)
    label: str | None = None        # class of every image; None = labels in turn
    size: str = "native"            # native (drawn from training sizes) or HxW in pixels
    min_megapixels: float = 0.0     # native sizes are drawn from training sizes at least this large
    max_megapixels: float = 60.0    # no image above this size: native draws and --size alike
    device: str = "auto"            # torch device; auto = cuda when available, else cpu
    shard_index: int = 0            # this process writes images i with i % shard_count == shard_index
    shard_count: int = 1
    layout: LayoutSamplingConfig = field(default_factory=LayoutSamplingConfig)
    patch: PatchSamplingConfig = field(default_factory=PatchSamplingConfig)
    canvas: CanvasConfig = field(default_factory=CanvasConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n={self.n}; synthesize at least one image")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}; use a non-negative integer")
        if self.size != "native" and not SIZE_PATTERN.match(self.size):
            raise ConfigError(f"size={self.size!r}; use native or HxW in pixels, e.g. 2048x1536")
        if self.min_megapixels < 0:
            raise ConfigError(f"min_megapixels={self.min_megapixels}; use 0 or more")
        if not self.max_megapixels > self.min_megapixels:
            raise ConfigError(f"max_megapixels={self.max_megapixels} must be above "
                              f"min_megapixels={self.min_megapixels}")
        self.native_size()  # raises ConfigError for a size outside 1 pixel to max_megapixels
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard_index={self.shard_index} must be in [0, shard_count="
                              f"{self.shard_count})")

    def native_size(self) -> tuple[int, int] | None:
        """Return the requested (H, W), or None when sizes are drawn from the training data."""
        match = SIZE_PATTERN.match(self.size)
        if match is None:
            return None
        height, width = int(match.group(1)), int(match.group(2))
        if height < 1 or width < 1:
            raise ConfigError(f"size={self.size!r}; both sides must be at least 1 pixel")
        megapixels = height * width / 1e6
        if megapixels > self.max_megapixels:
            raise ConfigError(f"size={self.size!r} is {megapixels:.1f} megapixels, above "
                              f"max_megapixels={self.max_megapixels}; give a smaller --size, or "
                              f"raise --max-megapixels when the host has the memory and time")
        return height, width
