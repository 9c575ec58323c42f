"""Patch models that turn level ``l + k`` into level ``l``, tile by tile.

``model: diffusion`` trains a ``PatchUNet`` denoiser; ``model: gan`` trains a conditional
generator against a patch discriminator (``patchgen.patch_gan``). Both use the same
dataset, trainer, checkpoint format and snapshot folder ``RUN/model``.

Noise augmentation of the conditioning crop follows cascaded diffusion: during training
the crop is noised to a random timestep below ``cond_max_timestep`` with probability
``cond_aug_probability`` and that timestep is given to the model; sampling uses
``cond_timestep_sampling`` (0 = clean crop).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patchgen.config import ConfigError, from_dict, to_dict
from patchgen.diffusion import (DiffusionConfig, drop_labels, guided, masked_mse, noise_batch,
                                per_sample_generators, sampling_scheduler, training_scheduler)
from patchgen.networks import PatchUNet, check_divisible
from patchgen.patch_data import PatchDataConfig, PatchDataset
from patchgen.trainer import TrainConfig, Trainer, seeded_init

log = logging.getLogger(__name__)

MODEL_KINDS = ("diffusion", "gan")


@dataclass
class PatchNetworkConfig:
    """Architecture of the patch UNet (the GAN generator uses it too)."""

    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention_from: int = 3         # >= len(channels): no attention
    norm_groups: int = 8


@dataclass
class CondAugConfig:
    """Noise augmentation of the conditioning crop."""

    probability: float = 0.5
    max_timestep: int = 250
    sampling_timestep: int = 0


@dataclass
class PatchConfig:
    """Everything ``train-patch`` needs."""

    model: str = "diffusion"
    split: str = "train"
    network: PatchNetworkConfig = field(default_factory=PatchNetworkConfig)
    data: PatchDataConfig = field(default_factory=PatchDataConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(guidance_scale=1.0))
    cond_aug: CondAugConfig = field(default_factory=CondAugConfig)
    gan: dict = field(default_factory=dict)   # GAN settings, see patchgen.patch_gan.GanConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ConfigError(f"model={self.model!r}; use one of {MODEL_KINDS}")
        check_divisible(self.data.patch_size, self.network.channels, "data.patch_size")
        if self.data.large_patch_size:
            check_divisible(self.data.large_patch_size, self.network.channels,
                            "data.large_patch_size")
        if self.model == "gan":
            from patchgen.patch_gan import gan_config
            self.gan = to_dict(gan_config(self))   # every GAN setting, defaults filled in


def build_patch_unet(config: PatchConfig, num_labels: int) -> PatchUNet:
    network = config.network
    return PatchUNet(patch_size=config.data.patch_size, channels=tuple(network.channels),
                     layers_per_block=network.layers_per_block,
                     attention_from=network.attention_from, norm_groups=network.norm_groups,
                     num_labels=num_labels)


def augment_condition(scheduler, cond: torch.Tensor, seeds: torch.Tensor,
                      config: CondAugConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise the conditioning crops per sample; returns (noisy cond, cond timesteps)."""
    device = cond.device
    generators = per_sample_generators(seeds, stream=3, device=device)
    timesteps, noises = [], []
    for generator in generators:
        apply = torch.rand((), generator=generator, device=device) < config.probability
        t = torch.randint(0, max(config.max_timestep, 1), (), generator=generator, device=device)
        timesteps.append(torch.where(apply, t, torch.zeros_like(t)))
        noises.append(torch.randn(cond.shape[1:], generator=generator, device=device))
    timesteps_tensor = torch.stack(timesteps)
    noisy = scheduler.add_noise(cond, torch.stack(noises), timesteps_tensor)
    clean = (timesteps_tensor == 0).view(-1, 1, 1, 1)
    return torch.where(clean, cond, noisy), timesteps_tensor


class PatchDiffusionTask:
    """Training task of the diffusion patch model."""

    ema_network = "model"
    phases = ("model",)
    sample_unit = "patch"

    def __init__(self, store, rows, label_names: list[str], config: PatchConfig):
        self.store = store
        self.rows = rows
        self.label_names = label_names
        self.config = config
        self.networks = {"model": build_patch_unet(config, len(label_names))}
        self.scheduler = training_scheduler(config.diffusion)

    def dataset(self) -> PatchDataset:
        return PatchDataset(self.store, self.rows, self.label_names, self.config.data)

    def num_items(self) -> int:
        return len(self.rows)

    def loss(self, phase, networks, batch):
        """Masked denoising loss of the patch given its conditioning."""
        seeds = batch["seed"]
        x_t, timesteps, target = noise_batch(self.scheduler, batch["x0"], seeds)
        cond, cond_t = augment_condition(self.scheduler, batch["cond"], seeds, self.config.cond_aug)
        labels = drop_labels(batch["label"], seeds, self.config.diffusion.label_dropout,
                             null_label=len(self.label_names))
        output = networks["model"](x_t, timesteps, cond, batch["coords"], batch["mask"], labels,
                                   batch["level"], cond_t)
        loss = masked_mse(output, target, batch["mask"])
        return loss, {"loss": float(loss.detach())}

    def save_snapshot(self, network: PatchUNet, folder: Path) -> None:
        network.save_pretrained(folder / "unet")
        sampling_scheduler(self.config.diffusion).save_pretrained(folder / "scheduler")
        write_patch_info(folder, "diffusion", self.label_names, self.config)

    def sample_grid(self, network, seed: int):
        return None


def write_patch_info(folder: Path, kind: str, label_names: list[str], config: PatchConfig) -> None:
    info = {"kind": kind, "labels": label_names, "config": to_dict(config)}
    (folder / "femurgen.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def _make_task(store, rows, labels, config: PatchConfig):
    if config.model == "diffusion":
        return PatchDiffusionTask(store, rows, labels, config)
    from patchgen.patch_gan import PatchGanTask
    return PatchGanTask(store, rows, labels, config)


def train_patch(store_path: Path, run_dir: Path, config: PatchConfig,
                device: str | None = None) -> dict[str, Any]:
    """Train the patch model; rerunning resumes. Returns the last status record."""
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    rows = store.rows(split=config.split)
    if not rows:
        raise ConfigError(f"{store_path}: no images in split {config.split!r}")
    labels = sorted({r.label for r in rows})
    with seeded_init(config.train.seed):
        task = _make_task(store, rows, labels, config)
    record = Trainer(task, config.train, run_dir, to_dict(config), device=device).fit()
    return {"model": str(Path(run_dir) / "model"), **record}


class PatchSampler:
    """A trained patch run as callables on tile batches (model space [-1, 1])."""

    def __init__(self, run_dir: Path, device: torch.device | str = "cpu"):
        from patchgen.inference import PATCH_KINDS, _read_snapshot_info

        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        model_dir = self.run_dir / "model"
        info = _read_snapshot_info(model_dir, PATCH_KINDS)
        self.config: PatchConfig = from_dict(PatchConfig, info["config"])
        self.kind: str = info["kind"]
        self.labels: list[str] = info["labels"]
        self.patch_size = self.config.data.patch_size
        self.level_gap = self.config.data.level_gap
        self.network_channels = tuple(self.config.network.channels)
        self.checkpoint_path = model_dir
        if self.kind == "diffusion":
            self.network = PatchUNet.from_pretrained(model_dir / "unet").to(self.device).eval()
            self.prediction_type = self.config.diffusion.prediction_type
            self.noise_channels = 0
        else:
            from patchgen.patch_gan import load_generator
            self.network, self.noise_channels = load_generator(model_dir, self.device)
            self.prediction_type = None

    def label_index(self, label: str) -> int:
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of the patch model's labels {self.labels}")
        return self.labels.index(label)

    def make_scheduler(self, steps: int | None = None):
        return sampling_scheduler(self.config.diffusion, steps)

    @torch.no_grad()
    def denoise_fn(self, x_t: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor,
                   mask: torch.Tensor, timestep: int, label: torch.Tensor,
                   level: torch.Tensor) -> torch.Tensor:
        """Model output (B, 1, P, P) for a batch of tiles at one denoising step."""
        batch = x_t.shape[0]
        t = torch.full((batch,), int(timestep), device=self.device, dtype=torch.long)
        cond_t = torch.full((batch,), self.config.cond_aug.sampling_timestep, device=self.device,
                            dtype=torch.long)
        inputs = [v.to(self.device) for v in (x_t, cond, coords, mask)]
        label, level = label.to(self.device), level.to(self.device)
        output = self.network(*inputs[:1], t, *inputs[1:], label, level, cond_t)
        scale = self.config.diffusion.guidance_scale
        if scale == 1.0 or len(self.labels) < 2:
            return output
        null = torch.full_like(label, len(self.labels))
        unconditional = self.network(*inputs[:1], t, *inputs[1:], null, level, cond_t)
        return guided(output, unconditional, scale)

    @torch.no_grad()
    def gan_fn(self, noise: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor,
               mask: torch.Tensor, label: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Generated patches (B, 1, P, P) in [-1, 1]."""
        if self.kind != "gan":
            raise ValueError(f"{self.run_dir} holds a {self.kind} patch model, not a GAN")
        args = [v.to(self.device) for v in (noise, cond, coords, mask, label, level)]
        return self.network(*args)

