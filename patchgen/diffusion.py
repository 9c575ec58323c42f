"""Noise schedules, the denoising loss and the sampling loop, on diffusers schedulers.

Naming: ``timestep`` is the discrete diffusers timestep ``t`` in [0, T); ``x0`` is a clean
image in [-1, 1]; ``x_t`` its noisy version; ``model output`` is epsilon, v or x0 as the
scheduler's ``prediction_type`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from patchgen.config import ConfigError

SAMPLERS = ("ddim", "dpmsolver++")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DiffusionConfig:
    """Noise schedule, prediction target and sampler."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    sampler: str = "ddim"             # "ddim" or "dpmsolver++"
    sampling_steps: int = 25
    guidance_scale: float = 2.0       # classifier-free guidance; 1 disables it
    label_dropout: float = 0.1        # probability of the null label during training

    def validate(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"diffusion.sampler={self.sampler!r}; use one of {SAMPLERS}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"diffusion.prediction_type={self.prediction_type!r}; "
                              f"use one of {PREDICTION_TYPES}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"diffusion.label_dropout={self.label_dropout} must be in [0, 1)")
        if self.sampling_steps < 1:
            raise ConfigError(f"diffusion.sampling_steps={self.sampling_steps} must be >= 1")


def training_scheduler(config: DiffusionConfig):
    """The DDPM scheduler whose ``add_noise`` defines the forward process."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps,
                         beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False)


def sampling_scheduler(config: DiffusionConfig, steps: int | None = None):
    """A DDIM or DPM-Solver++ scheduler with its timesteps set (``steps`` or the config's)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=config.num_train_timesteps,
                  beta_schedule=config.beta_schedule, prediction_type=config.prediction_type)
    if config.sampler == "ddim":
        scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common)
    else:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
                                                solver_order=2, **common)
    scheduler.set_timesteps(steps or config.sampling_steps)
    return scheduler


def per_sample_generators(seeds: torch.Tensor, stream: int, device: torch.device) -> list[torch.Generator]:
    """One generator per sample, seeded from the sample's key seed and a stream id."""
    generators = []
    for seed in seeds.tolist():
        generator = torch.Generator(device=device)
        generator.manual_seed((int(seed) * 1_000_003 + stream) & 0x7FFFFFFFFFFFFFFF)
        generators.append(generator)
    return generators


def randn_per_sample(shape: tuple[int, ...], generators: list[torch.Generator],
                     device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``(B, *shape)``, row ``i`` drawn from ``generators[i]``."""
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def noise_batch(scheduler, x0: torch.Tensor, seeds: torch.Tensor):
    """Draw timesteps and noise per sample and return ``(x_t, timesteps, target)``."""
    device = x0.device
    generators = per_sample_generators(seeds, stream=1, device=device)
    timesteps = torch.stack([
        torch.randint(0, scheduler.config.num_train_timesteps, (), generator=g, device=device)
        for g in generators])
    noise = randn_per_sample(tuple(x0.shape[1:]), generators, device)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = x0
    return x_t, timesteps, target


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``mask`` is 1 (padding excluded)."""
    squared = (prediction.float() - target.float()) ** 2 * mask
    return squared.sum() / mask.sum().clamp_min(1.0) / prediction.shape[1]


def drop_labels(labels: torch.Tensor, seeds: torch.Tensor, probability: float,
                null_label: int) -> torch.Tensor:
    """Replace labels by ``null_label`` with ``probability`` per sample (classifier-free guidance)."""
    if probability <= 0:
        return labels
    generators = per_sample_generators(seeds, stream=2, device=labels.device)
    draws = torch.stack([torch.rand((), generator=g, device=labels.device) for g in generators])
    return torch.where(draws < probability, torch.full_like(labels, null_label), labels)


ModelFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_loop(model_fn: ModelFunction, scheduler, x_T: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Run a diffusers sampling scheduler from ``x_T`` to ``x_0``.

    ``model_fn(x_t, timestep)`` returns the model output for the whole batch; ``x_T`` is the
    initial noise already scaled by ``scheduler.init_noise_sigma``.
    """
    x_t = x_T
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x_t, timestep)
        output = model_fn(model_input, timestep)
        x_t = scheduler.step(output, timestep, x_t, generator=generator).prev_sample
    return x_t


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``u + s (c - u)``."""
    return unconditional + scale * (conditional - unconditional)
