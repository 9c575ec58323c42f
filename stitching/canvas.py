"""Tiled sampling of one pyramid level on a canvas.

Symbols (DDIM, Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12):

=================  ==========================================================
``sample``         canvas sample x_t at timestep t, (H', W') float32
``fused``          per-pixel blend of the tile model outputs (epsilon, v or x_0)
``w_k``            normalised weight of tile k (``stitching.weights``)
``cond``           level-above image upsampled to this level, in [-1, 1]
=================  ==========================================================

Every denoising step predicts all tiles, blends the outputs on the canvas as
``fused = sum_k w_k * D(x_t[tile k])`` and then lets the diffusers scheduler step the canvas,
so neighbouring tiles agree at every step (MultiDiffusion, Bar-Tal et al. 2023, eq. 5, with
smooth weights in place of uniform ones). A host canvas is stepped once as a whole. A disk
canvas is stepped in fixed row bands, each with its own copy of the scheduler. A band is
stepped as soon as no remaining tile of the step reads or writes it. Band steps need an
element-wise scheduler step, which excludes dynamic thresholding.

Tiles run through the model in batches of ``tile_batch``, so device memory depends on the
tile batch and tile size only. Tiles are blended in row-major order whatever the batch size,
so the result is bitwise the same for every ``tile_batch``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from patchgen.conditioning import coordinate_grid
from stitching.seeds import Stream, cell_noise, numpy_rng, torch_generator
from stitching.storage import CanvasArray, CanvasStore
from stitching.tiles import TileGrid, stride_of, tile_grid
from stitching.weights import DEFAULT_FLOOR, BlendWeights

logger = logging.getLogger(__name__)

DenoiseFn = Callable[..., torch.Tensor]
GanFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Tiling:
    """Tile layout and batching of a level canvas.

    Attributes:
        tile_size: tile side T in pixels.
        overlap: overlap O of neighbouring tiles in pixels, 0 <= O < T.
        tile_batch: tiles per model call.
        grid_shift: move the interior tiles by a random offset in [0, T - O) at every
            denoising step, so tile borders fall on different pixels from step to step.
        window_floor: smallest value of the blending window, > 0.
        align: tile origins are multiples of it; ``2 ** level_gap`` of the patch model.
    """

    tile_size: int
    overlap: int
    tile_batch: int = 16
    grid_shift: bool = False
    window_floor: float = DEFAULT_FLOOR
    align: int = 1

    def __post_init__(self) -> None:
        stride_of(self.tile_size, self.overlap, self.align)
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be at least 1, got {self.tile_batch}")


@dataclass(frozen=True)
class LevelJob:
    """One level of one image: what to sample and which seeds to use.

    Attributes:
        image_shape: (H, W) of the image at this level in pixels.
        level: pyramid level (0 = native).
        label_index: class index passed to the model.
        seed: run seed.
        image_index: index of the image in the run.
    """

    image_shape: tuple[int, int]
    level: int
    label_index: int
    seed: int
    image_index: int

    def key(self, stream: Stream, *more: int) -> tuple[int, ...]:
        """Return the random key ``(seed, image_index, level, stream, *more)``."""
        return (self.seed, self.image_index, self.level, int(stream), *more)


class _RowAccumulator:
    """Blend tile outputs in row-major order and hand over rows once no tile touches them again.

    Only the rows of the current tile row are kept, (T, W') float32. ``on_final(rows, values)``
    is called once per tile row with the rows that tile row finished, top to bottom.
    """

    def __init__(self, grid: TileGrid, weights: BlendWeights,
                 on_final: Callable[[slice, np.ndarray], None]):
        self.grid = grid
        self.weights = weights
        self.on_final = on_final
        self.buffer = np.zeros((grid.tile_size, grid.canvas_shape[1]), dtype=np.float32)
        self.tile_row = 0

    def add(self, index: int, output: np.ndarray) -> None:
        """Add tile ``index``'s (T, T) output; tiles must arrive in increasing index order."""
        row = index // len(self.grid.xs)
        while self.tile_row < row:
            self._finish_tile_row()
        _, cols = self.grid.tile_slices(index)
        self.buffer[:, cols] += self.weights.tile_weight(index) * output

    def close(self) -> None:
        """Hand over all remaining rows."""
        while self.tile_row < len(self.grid.ys):
            self._finish_tile_row()

    def _finish_tile_row(self) -> None:
        ys = self.grid.ys
        top = ys[self.tile_row]
        bottom = ys[self.tile_row + 1] if self.tile_row + 1 < len(ys) else self.grid.canvas_shape[0]
        done = bottom - top
        self.on_final(slice(top, bottom), self.buffer[:done].copy())

        # Later tiles start at ``bottom`` or below, so the buffer moves down by ``done`` rows.
        self.buffer[:self.buffer.shape[0] - done] = self.buffer[done:]
        self.buffer[self.buffer.shape[0] - done:] = 0.0
        self.tile_row += 1


class _TileInputs:
    """Build model inputs tile by tile, reading each canvas one tile row band at a time.

    ``band_readers`` map an input name to a function that returns (C, T, W') float32 for the
    canvas rows of one tile row.
    """

    def __init__(self, grid: TileGrid, band_readers: dict[str, Callable[[slice], np.ndarray]]):
        self.grid = grid
        self.band_readers = band_readers
        self._band_row = -1
        self._bands: dict[str, np.ndarray] = {}
        height, width = grid.image_shape
        self._full_mask = torch.ones(1, grid.tile_size, grid.tile_size)
        self._needs_mask = grid.canvas_shape != (height, width)

    def batches(self, tile_batch: int):
        """Yield (tile indices, inputs) with inputs (B, C, T, T) float32 CPU tensors."""
        indices = list(range(len(self.grid)))
        for start in range(0, len(indices), tile_batch):
            chunk = indices[start:start + tile_batch]
            tiles = [self._tile(index) for index in chunk]
            yield chunk, {name: torch.stack([t[name] for t in tiles]) for name in tiles[0]}

    def _tile(self, index: int) -> dict[str, torch.Tensor]:
        row = index // len(self.grid.xs)
        if row != self._band_row:
            rows = slice(self.grid.ys[row], self.grid.ys[row] + self.grid.tile_size)
            self._bands = {name: read(rows) for name, read in self.band_readers.items()}
            self._band_row = row

        y, x = self.grid.origin(index)
        _, cols = self.grid.tile_slices(index)
        tile = {name: torch.from_numpy(band[:, :, cols].copy()) for name, band in self._bands.items()}
        tile["coords"] = coordinate_grid(y, x, self.grid.tile_size, self.grid.tile_size,
                                         *self.grid.image_shape)
        tile["mask"] = self._mask(y, x)
        return tile

    def _mask(self, y: int, x: int) -> torch.Tensor:
        if not self._needs_mask:
            return self._full_mask
        height, width = self.grid.image_shape
        mask = torch.zeros(1, self.grid.tile_size, self.grid.tile_size)
        mask[:, :max(height - y, 0), :max(width - x, 0)] = 1.0
        return mask


def canvas_band_reader(canvas: CanvasArray) -> Callable[[slice], np.ndarray]:
    """Return a reader of canvas rows as (1, rows, W') float32."""
    return lambda rows: np.asarray(canvas[rows], dtype=np.float32)[None]


def blend_tiles(grid: TileGrid, weights: BlendWeights, inputs: _TileInputs, tile_batch: int,
                predict: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                on_final: Callable[[slice, np.ndarray], None]) -> int:
    """Run ``predict`` on all tiles in batches and blend the outputs with the normalised weights.

    ``predict`` maps a batch of CPU inputs to a (B, 1, T, T) output on any device. Blended
    rows go to ``on_final`` top to bottom. Returns the number of model calls.
    """
    accumulator = _RowAccumulator(grid, weights, on_final)
    calls = 0
    with torch.inference_mode():
        for indices, batch in inputs.batches(tile_batch):
            output = predict(batch).detach().to("cpu", torch.float32).numpy()  # (B, 1, T, T)
            calls += 1
            for position, index in enumerate(indices):
                accumulator.add(index, output[position, 0])
    accumulator.close()
    return calls


def step_grid(job: LevelJob, tiling: Tiling, step: int) -> TileGrid:
    """Return the tile grid of denoising ``step``: the base grid, shifted when enabled."""
    if not tiling.grid_shift:
        return base_grid(job, tiling)
    positions = (tiling.tile_size - tiling.overlap) // tiling.align
    shift = numpy_rng(*job.key(Stream.GRID_SHIFT, step)).integers(0, positions, size=2) * tiling.align
    return tile_grid(job.image_shape, tiling.tile_size, tiling.overlap,
                     (int(shift[0]), int(shift[1])), tiling.align)


def base_grid(job: LevelJob, tiling: Tiling) -> TileGrid:
    """Return the unshifted tile grid of a level; it defines pixel ownership."""
    return tile_grid(job.image_shape, tiling.tile_size, tiling.overlap, align=tiling.align)


def _check_band_steps(scheduler) -> None:
    """Reject schedulers whose step is not element-wise, so bands would change the result."""
    if scheduler.config.get("thresholding", False):
        raise ValueError(
            f"{type(scheduler).__name__} uses dynamic thresholding, which needs the whole "
            f"sample, so it cannot step a disk-backed canvas band by band; turn thresholding "
            f"off or raise canvas.disk_megapixels so the canvas stays in host memory")


def _step_is_stochastic(scheduler, eta: float, params) -> bool:
    if "eta" in params:
        return eta > 0.0
    algorithm = scheduler.config.get("algorithm_type")  # DPM-Solver family
    if algorithm is not None:
        return str(algorithm).startswith("sde")
    return "variance_noise" in params or "generator" in params


def _step_kwargs(scheduler, eta: float, job: LevelJob, step: int, base: TileGrid,
                 rows: slice) -> dict:
    """Return the keyword arguments of ``scheduler.step`` for canvas ``rows``.

    Step noise is drawn per owned cell when the scheduler takes ``variance_noise``, so it
    is the same for host and disk canvases. Otherwise the scheduler draws it from a
    generator keyed by the step and the first row of the band.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in params else {}
    if not _step_is_stochastic(scheduler, eta, params):
        return kwargs

    if "variance_noise" in params:
        noise = cell_noise(base, rows, job.key(Stream.STEP_NOISE, step))  # (1, rows, W')
        kwargs["variance_noise"] = torch.from_numpy(noise)[None]
    else:
        kwargs["generator"] = torch_generator(*job.key(Stream.SCHEDULER_STEP, step, rows.start))
    return kwargs


class _BandStepper:
    """Collect blended rows into fixed row bands and step each band once it is complete.

    Band ``b`` is stepped by ``schedulers[b]``, so schedulers that keep a history between
    steps (multistep solvers) keep one per band.
    """

    def __init__(self, bands: list[slice], schedulers: list, sample: CanvasArray,
                 timestep, make_kwargs: Callable[[slice], dict]):
        self.bands = bands
        self.schedulers = schedulers
        self.sample = sample
        self.timestep = timestep
        self.make_kwargs = make_kwargs
        width = sample.shape[1]
        self.buffer = np.empty((max(b.stop - b.start for b in bands), width), dtype=np.float32)
        self.band = 0

    def __call__(self, rows: slice, values: np.ndarray) -> None:
        top = rows.start
        while top < rows.stop:
            band = self.bands[self.band]
            bottom = min(rows.stop, band.stop)
            self.buffer[top - band.start:bottom - band.start] = values[top - rows.start:bottom - rows.start]
            top = bottom
            if bottom == band.stop:
                self._step_band(band)

    def _step_band(self, band: slice) -> None:
        scheduler = self.schedulers[self.band]
        fused = torch.from_numpy(self.buffer[:band.stop - band.start])[None, None]  # (1, 1, rows, W')
        current = torch.from_numpy(np.asarray(self.sample[band], dtype=np.float32))[None, None]
        if len(self.schedulers) > 1:
            # Sets a band copy's step index the way the tile inputs were scaled; the values are unused.
            scheduler.scale_model_input(current[..., :1, :1], self.timestep)
        previous = scheduler.step(fused, self.timestep, current, **self.make_kwargs(band)).prev_sample
        self.sample[band] = previous[0, 0].to(torch.float32).numpy()
        self.band += 1


def _check_output(output: torch.Tensor, batch_size: int, tile_size: int) -> torch.Tensor:
    expected = (batch_size, 1, tile_size, tile_size)
    if tuple(output.shape) != expected:
        raise ValueError(f"patch model returned shape {tuple(output.shape)}, expected {expected}")
    return output


def first_step(scheduler, strength: float) -> int:
    """Return the index of the first timestep to run for an SDEdit start of ``strength``.

    ``strength`` = 1 runs every timestep from pure noise. Below 1 the canvas starts from the
    conditioning noised to the timestep at index ``steps - max(1, floor(steps * strength))``,
    so low frequencies of the level above are kept and fewer model calls are spent. This is
    the start of SDEdit (Meng et al., "SDEdit: Guided Image Synthesis and Editing with
    Stochastic Differential Equations", arXiv:2108.01073), which diffusers' image-to-image
    pipelines use with the same meaning of ``strength``.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength}; use a value in (0, 1]")
    steps = len(scheduler.timesteps) // scheduler.order
    kept_steps = min(max(int(steps * strength), 1), steps)
    start = (steps - kept_steps) * scheduler.order
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return start


def initial_sample(scheduler, cond: CanvasArray, store: CanvasStore, base: TileGrid, job: LevelJob,
                   bands: list[slice], timesteps: torch.Tensor, start: int) -> CanvasArray:
    """Return x_T: noise drawn per owned cell, or for ``start`` > 0 the noised conditioning."""
    sample = store.full("sample", base.canvas_shape)
    sigma = float(scheduler.init_noise_sigma)
    for rows in bands:
        noise = cell_noise(base, rows, job.key(Stream.INITIAL_NOISE))[0]  # (rows, W')
        if start == 0:
            sample[rows] = noise * sigma
            continue
        clean = torch.from_numpy(np.asarray(cond[rows], dtype=np.float32))
        noised = scheduler.add_noise(clean, torch.from_numpy(noise), timesteps[start:start + 1])
        sample[rows] = noised.to(torch.float32).numpy()
    return sample


def sample_level_diffusion(denoise_fn: DenoiseFn, scheduler, cond: CanvasArray, job: LevelJob,
                           tiling: Tiling, store: CanvasStore, device: torch.device,
                           eta: float = 0.0, strength: float = 1.0) -> CanvasArray:
    """Sample one level with a diffusion patch model, blending tile outputs at every step.

    Args:
        denoise_fn: ``(x_t, cond, coords, mask, timestep, label, level) -> (B, 1, T, T)``
            model output in the scheduler's prediction type.
        scheduler: diffusers scheduler with ``set_timesteps`` already called; it is stepped.
        cond: (H', W') canvas of the upsampled level above, float32 in [-1, 1].
        job: level, shape, label and seeds.
        store: where canvases live (host memory or disk).
        device: device of the model; the canvas stays on the host.
        eta: DDIM eta; 0 makes sampling deterministic given the initial noise.
        strength: 1 samples from pure noise; below 1 starts from the noised conditioning
            and runs that share of the timesteps (:func:`first_step`).

    Returns:
        (H', W') canvas of x_0 in model space, about [-1, 1]; the image is its top-left (H, W).
    """
    base = base_grid(job, tiling)
    bands = store.row_bands(base.canvas_shape)
    if len(bands) > 1:
        _check_band_steps(scheduler)
    start = first_step(scheduler, strength)
    pristine = copy.deepcopy(scheduler)
    band_schedulers = [scheduler] if len(bands) == 1 else [copy.deepcopy(scheduler) for _ in bands]
    sample = initial_sample(pristine, cond, store, base, job, bands, pristine.timesteps, start)

    labels = torch.full((tiling.tile_batch,), job.label_index, dtype=torch.long, device=device)
    levels = torch.full((tiling.tile_batch,), job.level, dtype=torch.long, device=device)
    for step in range(start, len(pristine.timesteps)):
        timestep = pristine.timesteps[step]
        # Band schedulers advance as bands finish, so inputs are scaled by a fresh copy.
        input_scheduler = scheduler if len(bands) == 1 else copy.deepcopy(pristine)

        def predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            size = batch["sample"].shape[0]
            x_in = input_scheduler.scale_model_input(batch["sample"], timestep)
            output = denoise_fn(x_in.to(device), batch["cond"].to(device), batch["coords"].to(device),
                                batch["mask"].to(device), int(timestep), labels[:size], levels[:size])
            return _check_output(output, size, tiling.tile_size)

        # Blend all tiles; each row band is stepped once no later tile touches it.
        grid = step_grid(job, tiling, step)
        inputs = _TileInputs(grid, {"sample": canvas_band_reader(sample),
                                    "cond": canvas_band_reader(cond)})
        stepper = _BandStepper(bands, band_schedulers, sample, timestep,
                               lambda rows: _step_kwargs(scheduler, eta, job, step, base, rows))
        blend_tiles(grid, BlendWeights(grid, tiling.window_floor), inputs, tiling.tile_batch,
                    predict, stepper)
    return sample


def sample_level_gan(gan_fn: GanFn, noise_channels: int, cond: CanvasArray, job: LevelJob,
                     tiling: Tiling, store: CanvasStore, device: torch.device) -> CanvasArray:
    """Sample one level with a GAN patch generator in one pass, blended like diffusion outputs.

    The noise input is one (Z, H', W') field drawn per owned cell, and each tile reads its
    crop of it, so overlapping tiles see the same noise where they overlap.

    Args:
        gan_fn: ``(noise, cond, coords, mask, label, level) -> (B, 1, T, T)`` in [-1, 1].
        noise_channels: Z, channels of the noise input.
        cond: (H', W') canvas of the upsampled level above, float32 in [-1, 1].

    Returns:
        (H', W') canvas in [-1, 1]; the image is its top-left (H, W).
    """
    if noise_channels < 1:
        raise ValueError(f"noise_channels must be at least 1, got {noise_channels}")
    grid = base_grid(job, tiling)
    weights = BlendWeights(grid, tiling.window_floor)
    noise_key = job.key(Stream.GAN_NOISE)
    inputs = _TileInputs(grid, {"noise": lambda rows: cell_noise(grid, rows, noise_key, noise_channels),
                                "cond": canvas_band_reader(cond)})

    labels = torch.full((tiling.tile_batch,), job.label_index, dtype=torch.long, device=device)
    levels = torch.full((tiling.tile_batch,), job.level, dtype=torch.long, device=device)

    def predict(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        size = batch["noise"].shape[0]
        output = gan_fn(batch["noise"].to(device), batch["cond"].to(device), batch["coords"].to(device),
                        batch["mask"].to(device), labels[:size], levels[:size])
        return _check_output(output, size, tiling.tile_size)

    output = store.full("output", grid.canvas_shape)
    blend_tiles(grid, weights, inputs, tiling.tile_batch, predict,
                lambda rows, values: output.__setitem__(rows, values))
    return output
