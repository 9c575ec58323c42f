"""Denoising networks: diffusers ``UNet2DModel`` with femurgen's conditioning.

Both networks add a conditioning vector to the UNet's timestep embedding through
``class_embed_type="identity"``: the UNet adds ``class_labels`` (B, D) to its embedding of
``t``. The vector is a sum of learned embeddings (class, pyramid level, noise level of the
conditioning crop) and an MLP of continuous values (native size, pixel spacing).

Both are diffusers ``ModelMixin``/``ConfigMixin`` models, so ``save_pretrained`` writes
safetensors plus ``config.json`` and ``from_pretrained`` reads them back.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def unet_block_types(num_blocks: int, attention_from: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types: plain blocks, attention blocks from ``attention_from`` on."""
    down = tuple("AttnDownBlock2D" if i >= attention_from else "DownBlock2D" for i in range(num_blocks))
    up = tuple("AttnUpBlock2D" if i >= attention_from else "UpBlock2D"
               for i in reversed(range(num_blocks)))
    return down, up


def _build_unet(in_channels: int, channels: tuple[int, ...], layers_per_block: int,
                attention_from: int, norm_groups: int) -> UNet2DModel:
    down, up = unet_block_types(len(channels), attention_from)
    return UNet2DModel(in_channels=in_channels, out_channels=1, block_out_channels=tuple(channels),
                       layers_per_block=layers_per_block, down_block_types=down,
                       up_block_types=up, norm_num_groups=norm_groups,
                       attention_head_dim=max(channels[-1] // 4, 8),
                       add_attention=attention_from < len(channels),
                       class_embed_type="identity")


def size_features(height: torch.Tensor, width: torch.Tensor, spacing_mm: torch.Tensor) -> torch.Tensor:
    """Continuous size conditioning, (B, 4): log2 H / 12, log2 W / 12, spacing known, log spacing.

    ``spacing_mm`` <= 0 marks unknown spacing.
    """
    known = (spacing_mm > 0).float()
    log_spacing = torch.where(spacing_mm > 0, torch.log(spacing_mm.clamp_min(1e-6)),
                              torch.zeros_like(spacing_mm))
    return torch.stack([torch.log2(height.float()) / 12.0, torch.log2(width.float()) / 12.0,
                        known, log_spacing * known], dim=1)


class LayoutUNet(ModelMixin, ConfigMixin):
    """Global layout denoiser: (noisy layout, validity mask) -> model output.

    Input ``x_t`` (B, 1, H, W) is in model space on a canvas: the R x R letterbox square or an
    aspect-ratio bucket, with H and W divisible by ``2 ** (len(channels) - 1)``. ``mask``
    (B, 1, H, W) is 1 on the image and 0 on the padding. ``labels`` (B,) long uses
    ``num_labels`` as the null label of classifier-free guidance. ``size`` (B, 4) comes from
    ``size_features``. ``resolution`` is R, whose square is the canvas pixel budget.
    """

    @register_to_config
    def __init__(self, resolution: int = 64, channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, attention_from: int = 2, norm_groups: int = 8,
                 num_labels: int = 2):
        super().__init__()
        self.unet = _build_unet(2, channels, layers_per_block, attention_from, norm_groups)
        embed_dim = channels[0] * 4
        self.label_embedding = nn.Embedding(num_labels + 1, embed_dim)
        self.size_mlp = nn.Sequential(nn.Linear(4, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor,
                labels: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        condition = self.label_embedding(labels) + self.size_mlp(size.to(x_t.dtype))
        return self.unet(torch.cat([x_t, mask], dim=1), timestep, class_labels=condition).sample


class PatchUNet(ModelMixin, ConfigMixin):
    """Patch denoiser conditioned on the level above, global coordinates, level and class.

    Input channels: ``x_t`` (B, 1, P, P), ``cond`` (B, 1, P, P) upsampled crop of the level
    above in [-1, 1], ``coords`` (B, 2, P, P) global y/H and x/W in [-1, 1], ``mask``
    (B, 1, P, P). ``level`` (B,) long is the pyramid level of the patch; ``cond_timestep``
    (B,) is the noise-augmentation timestep of ``cond`` (0 = clean), as in cascaded
    diffusion.
    """

    @register_to_config
    def __init__(self, patch_size: int = 64, channels: tuple[int, ...] = (32, 64, 64),
                 layers_per_block: int = 1, attention_from: int = 3, norm_groups: int = 8,
                 num_labels: int = 2, max_levels: int = 16):
        super().__init__()
        self.unet = _build_unet(5, channels, layers_per_block, attention_from, norm_groups)
        embed_dim = channels[0] * 4
        self.label_embedding = nn.Embedding(num_labels + 1, embed_dim)
        self.level_embedding = nn.Embedding(max_levels, embed_dim)
        self.cond_time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.cond_time_embedding = TimestepEmbedding(channels[0], embed_dim)

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                coords: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                level: torch.Tensor, cond_timestep: torch.Tensor) -> torch.Tensor:
        cond_time = self.cond_time_embedding(self.cond_time_proj(cond_timestep).to(x_t.dtype))
        condition = self.label_embedding(labels) + self.level_embedding(level) + cond_time
        inputs = torch.cat([x_t, cond, coords.to(x_t.dtype), mask], dim=1)
        return self.unet(inputs, timestep, class_labels=condition).sample


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def check_divisible(size: int, channels: tuple[int, ...], what: str) -> None:
    """A UNet with ``len(channels)`` blocks halves the input ``len(channels) - 1`` times."""
    factor = 2 ** (len(channels) - 1)
    if size % factor:
        raise ValueError(f"{what}={size} must be divisible by {factor} for a UNet with "
                         f"{len(channels)} blocks; choose a multiple of {factor}")
