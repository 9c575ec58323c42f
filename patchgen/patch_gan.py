"""Conditional patch GAN: a generator that upsamples one tile, and a patch discriminator.

Both networks take the inputs of the diffusion patch model: the upsampled crop of level
``l + k`` (``cond``), the global coordinates (``coords``), the validity mask, the class and
the pyramid level. The generator also takes ``Z`` channels of per-pixel Gaussian noise, so
neighbouring tiles of a canvas can share noise in their overlap.

Losses (``gan.loss``), with D(x) the discriminator's logit map and every mean weighted by
the share of valid pixels under each logit:

* ``hinge``: L_D = E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))], L_G = -E[D(G(z))];
* ``non-saturating``: L_D = E[softplus(-D(x))] + E[softplus(D(G(z)))],
  L_G = E[softplus(-D(G(z)))], the -log D generator loss of the original GAN.

R1 penalty, gamma / 2 * E[||grad_x D(x)||^2] on real patches (Mescheder et al., "Which
Training Methods for GANs do actually Converge?", arXiv:1801.04406). It is applied lazily
(Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", arXiv:1912.04958):
on a share 1 / ``r1_interval`` of the discriminator steps, scaled by ``r1_interval``. Which
steps get it is drawn from the micro-batch's first sample seed, so a resumed run applies it
on the same steps. An optional L1 term pulls the generated patch towards the real one at
``l1_weight``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from patchgen.config import ConfigError, from_dict
from patchgen.data_order import derive_seed
from patchgen.diffusion import per_sample_generators, randn_per_sample
from patchgen.networks import unet_block_types
from patchgen.patch_data import PatchDataset

log = logging.getLogger(__name__)

GAN_LOSSES = ("hinge", "non-saturating")
GENERATOR_FOLDER = "generator"
NOISE_STREAM_DISCRIMINATOR = 11   # per-sample noise of the fakes in the discriminator phase
NOISE_STREAM_GENERATOR = 12       # per-sample noise of the fakes in the generator phase
R1_STREAM = 0x7A1                 # lazy R1 draw per micro-batch
ATANH_LIMIT = 1.0 - 1e-3          # conditioning is clamped to +-ATANH_LIMIT before atanh


@dataclass
class GanConfig:
    """GAN settings (the ``gan`` section of a patch config)."""

    noise_channels: int = 4                   # Z, noise channels of the generator input
    residual: bool = True                     # generator output = tanh(net + atanh(cond))
    loss: str = "hinge"                       # "hinge" or "non-saturating"
    r1_gamma: float = 1.0                     # R1 weight gamma; 0 disables R1
    r1_interval: int = 4                      # apply R1 on 1 in r1_interval discriminator steps
    l1_weight: float = 0.0                    # weight of the L1 term (model space) in L_G
    disc_channels: tuple[int, ...] = (32, 64, 128)  # widths of the stride-2 discriminator convs
    spectral_norm: bool = False               # spectral normalisation of the discriminator convs

    def validate(self) -> None:
        if self.noise_channels < 1:
            raise ConfigError(f"gan.noise_channels={self.noise_channels} must be >= 1")
        if self.loss not in GAN_LOSSES:
            raise ConfigError(f"gan.loss={self.loss!r}; use one of {GAN_LOSSES}")
        if self.r1_gamma < 0:
            raise ConfigError(f"gan.r1_gamma={self.r1_gamma} must be >= 0 (0 disables R1)")
        if self.r1_interval < 1:
            raise ConfigError(f"gan.r1_interval={self.r1_interval} must be >= 1")
        if self.l1_weight < 0:
            raise ConfigError(f"gan.l1_weight={self.l1_weight} must be >= 0")
        if not self.disc_channels or min(self.disc_channels) < 1:
            raise ConfigError(f"gan.disc_channels={list(self.disc_channels)} needs at least one "
                              f"positive width")

    def downsampling(self) -> int:
        """Return the factor by which the discriminator's logit map is smaller than the patch."""
        return 2 ** len(self.disc_channels)


def gan_config(patch_config) -> GanConfig:
    """Parse the ``gan`` section of a ``PatchConfig``; errors name the key."""
    return from_dict(GanConfig, dict(patch_config.gan), "gan")


class PatchGenerator(ModelMixin, ConfigMixin):
    """Generator of one patch from noise, the level above, coordinates, class and level.

    A diffusers ``UNet2DModel`` at timestep 0 whose class embedding carries the label and
    level embeddings. Inputs: ``noise`` (B, Z, P, P) standard normal, ``cond`` (B, 1, P, P)
    upsampled crop of level ``l + k`` in [-1, 1], ``coords`` (B, 2, P, P) global y/H and
    x/W, ``mask`` (B, 1, P, P), ``labels`` and ``level`` (B,) long. Returns (B, 1, P, P) in
    [-1, 1]. With ``residual`` the network adds its output to ``atanh(cond)`` before the
    tanh, so it learns the detail that the upsampled crop lacks.
    """

    @register_to_config
    def __init__(self, patch_size: int = 64, noise_channels: int = 4,
                 channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1,
                 attention_from: int = 3, norm_groups: int = 8, num_labels: int = 2,
                 max_levels: int = 16, residual: bool = True):
        super().__init__()
        down, up = unet_block_types(len(channels), attention_from)
        self.unet = UNet2DModel(in_channels=noise_channels + 4, out_channels=1,
                                block_out_channels=tuple(channels),
                                layers_per_block=layers_per_block, down_block_types=down,
                                up_block_types=up, norm_num_groups=norm_groups,
                                attention_head_dim=max(channels[-1] // 4, 8),
                                add_attention=attention_from < len(channels),
                                class_embed_type="identity")
        embed_dim = channels[0] * 4
        self.label_embedding = nn.Embedding(num_labels, embed_dim)
        self.level_embedding = nn.Embedding(max_levels, embed_dim)
        if residual:
            # A zero output layer makes the untrained generator return the upsampled crop.
            nn.init.zeros_(self.unet.conv_out.weight)
            nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, noise: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor,
                mask: torch.Tensor, labels: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        if noise.shape[1] != self.config.noise_channels:
            raise ValueError(f"noise has {noise.shape[1]} channels; this generator takes "
                             f"{self.config.noise_channels}")
        dtype = noise.dtype
        condition = self.label_embedding(labels) + self.level_embedding(level)
        inputs = torch.cat([noise, cond.to(dtype), coords.to(dtype), mask.to(dtype)], dim=1)
        timestep = torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
        detail = self.unet(inputs, timestep, class_labels=condition.to(dtype)).sample
        if not self.config.residual:
            return torch.tanh(detail)
        base = torch.atanh(cond.to(detail.dtype).clamp(-ATANH_LIMIT, ATANH_LIMIT))
        return torch.tanh(detail + base)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator with projection of the class and level.

    Stride-2 4x4 convolutions (widths ``channels``) and one 3x3 convolution turn the patch,
    ``cond``, ``coords`` and ``mask`` (5 input channels) into features phi (B, C, P/s, P/s)
    with s = 2 ** len(channels). The logit map is ``w . phi + <e(label) + e(level), phi>``
    per location: the projection discriminator of Miyato and Koyama ("cGANs with Projection
    Discriminator", arXiv:1802.05637), applied at every location instead of to pooled features.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), num_labels: int = 2,
                 max_levels: int = 16, spectral_norm: bool = False):
        super().__init__()
        wrap = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        width_in = 5
        for width in channels:
            layers += [wrap(nn.Conv2d(width_in, width, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            width_in = width
        layers += [wrap(nn.Conv2d(width_in, width_in, 3, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.logit = wrap(nn.Conv2d(width_in, 1, 1))
        self.label_embedding = nn.Embedding(num_labels, width_in)
        self.level_embedding = nn.Embedding(max_levels, width_in)
        nn.init.zeros_(self.label_embedding.weight)
        nn.init.zeros_(self.level_embedding.weight)

    def forward(self, patch: torch.Tensor, cond: torch.Tensor, coords: torch.Tensor,
                mask: torch.Tensor, labels: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """Logit map (B, 1, P/s, P/s); higher means more likely real."""
        dtype = patch.dtype
        inputs = torch.cat([patch, cond.to(dtype), coords.to(dtype), mask.to(dtype)], dim=1)
        phi = self.features(inputs)                                       # (B, C, h, w)
        embedding = self.label_embedding(labels) + self.level_embedding(level)  # (B, C)
        projection = (phi * embedding.to(phi.dtype)[:, :, None, None]).sum(dim=1, keepdim=True)
        return self.logit(phi) + projection


def fill_padding(patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set padded pixels to -1 (black, as real patches are there), keep the image pixels."""
    return patch * mask + (mask - 1.0)


def logit_weights(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Return the share of valid pixels under each logit, (B, 1, h, w) in [0, 1]."""
    return F.interpolate(mask.to(logits.dtype), size=logits.shape[-2:], mode="area")


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return the mean of ``values`` weighted by ``weights`` (both (B, 1, h, w)), in float32."""
    weights = weights.float()
    return (values.float() * weights).sum() / weights.sum().clamp_min(1e-6)


def discriminator_terms(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                        loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the per-location discriminator loss on real and on generated patches."""
    if loss == "hinge":
        return F.relu(1.0 - real_logits), F.relu(1.0 + fake_logits)
    return F.softplus(-real_logits), F.softplus(fake_logits)


def generator_term(fake_logits: torch.Tensor, loss: str) -> torch.Tensor:
    """Return the per-location generator loss on generated patches."""
    if loss == "hinge":
        return -fake_logits
    return F.softplus(-fake_logits)


def r1_penalty(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Return the batch mean of ||d sum(D(x)) / dx||^2. ``real`` must require grad."""
    (gradient,) = torch.autograd.grad(logits.float().sum(), real, create_graph=True)
    return gradient.float().square().sum(dim=(1, 2, 3)).mean()


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the mean absolute error over the pixels where ``mask`` is 1."""
    absolute = (prediction.float() - target.float()).abs() * mask
    return absolute.sum() / mask.sum().clamp_min(1.0)


def conditioning_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Return (cond, coords, mask, label, level) of a batch, the inputs both networks share."""
    return batch["cond"], batch["coords"], batch["mask"], batch["label"], batch["level"]


def build_generator(patch_config, num_labels: int) -> PatchGenerator:
    """Build the generator of a ``PatchConfig`` (architecture from its ``network`` section)."""
    network = patch_config.network
    gan = gan_config(patch_config)
    return PatchGenerator(patch_size=patch_config.data.patch_size,
                          noise_channels=gan.noise_channels, channels=tuple(network.channels),
                          layers_per_block=network.layers_per_block,
                          attention_from=network.attention_from, norm_groups=network.norm_groups,
                          num_labels=num_labels, residual=gan.residual)


class PatchGanTask:
    """Training task of the patch GAN: a discriminator phase, then a generator phase."""

    ema_network = "generator"
    phases = ("discriminator", "generator")
    sample_unit = "patch"

    def __init__(self, store, rows, label_names: list[str], config):
        self.store = store
        self.rows = rows
        self.label_names = label_names
        self.config = config
        self.gan = gan_config(config)
        self._check_sizes()
        self.networks = {
            "generator": build_generator(config, len(label_names)),
            "discriminator": PatchDiscriminator(tuple(self.gan.disc_channels), len(label_names),
                                                spectral_norm=self.gan.spectral_norm),
        }

    def _check_sizes(self) -> None:
        factor = self.gan.downsampling()
        for size in self.config.data.patch_sizes():
            if size % factor:
                raise ConfigError(f"patch size {size} must be divisible by {factor} for a "
                                  f"discriminator with {len(self.gan.disc_channels)} stride-2 "
                                  f"layers (gan.disc_channels); change data.patch_size, "
                                  f"data.large_patch_size or gan.disc_channels")

    def dataset(self) -> PatchDataset:
        return PatchDataset(self.store, self.rows, self.label_names, self.config.data)

    def num_items(self) -> int:
        return len(self.rows)

    def _noise(self, batch: dict[str, torch.Tensor], stream: int) -> torch.Tensor:
        """Draw noise (B, Z, P, P), row ``i`` from the seed of sample ``i``."""
        x0 = batch["x0"]
        generators = per_sample_generators(batch["seed"], stream, x0.device)
        shape = (self.gan.noise_channels, *x0.shape[-2:])
        return randn_per_sample(shape, generators, x0.device).to(x0.dtype)

    def _apply_r1(self, seeds: torch.Tensor) -> bool:
        if self.gan.r1_gamma <= 0:
            return False
        draw = derive_seed(int(seeds[0]), R1_STREAM)
        return draw % self.gan.r1_interval == 0

    def loss(self, phase: str, networks, batch):
        if phase == "discriminator":
            return self.discriminator_loss(networks, batch)
        if phase == "generator":
            return self.generator_loss(networks, batch)
        raise ValueError(f"unknown GAN phase {phase!r}; expected one of {self.phases}")

    def discriminator_loss(self, networks, batch):
        """Compute L_D on real and generated patches, plus the lazy R1 penalty."""
        conditioning = conditioning_inputs(batch)
        noise = self._noise(batch, NOISE_STREAM_DISCRIMINATOR)
        with torch.no_grad():
            fake = networks["generator"](noise, *conditioning)
        apply_r1 = self._apply_r1(batch["seed"])
        real = fill_padding(batch["x0"], batch["mask"]).detach().requires_grad_(apply_r1)
        real_logits = networks["discriminator"](real, *conditioning)
        fake_logits = networks["discriminator"](fill_padding(fake, batch["mask"]), *conditioning)

        weights = logit_weights(batch["mask"], real_logits)
        real_term, fake_term = discriminator_terms(real_logits, fake_logits, self.gan.loss)
        d_real, d_fake = weighted_mean(real_term, weights), weighted_mean(fake_term, weights)
        r1 = torch.zeros((), device=real.device)
        if apply_r1:
            scale = self.gan.r1_gamma / 2 * self.gan.r1_interval
            r1 = scale * r1_penalty(real_logits * weights, real)
        loss = d_real + d_fake + r1
        return loss, {"d_loss": float(loss.detach()), "d_real": float(d_real.detach()),
                      "d_fake": float(d_fake.detach()), "d_r1": float(r1.detach())}

    def generator_loss(self, networks, batch):
        """Compute L_G of generated patches, plus the L1 term to the real patch."""
        conditioning = conditioning_inputs(batch)
        fake = networks["generator"](self._noise(batch, NOISE_STREAM_GENERATOR), *conditioning)
        fake_logits = networks["discriminator"](fill_padding(fake, batch["mask"]), *conditioning)

        adversarial = weighted_mean(generator_term(fake_logits, self.gan.loss),
                                    logit_weights(batch["mask"], fake_logits))
        l1 = masked_l1(fake, batch["x0"], batch["mask"])
        loss = adversarial + self.gan.l1_weight * l1
        return loss, {"g_loss": float(loss.detach()), "g_adv": float(adversarial.detach()),
                      "g_l1": float(l1.detach())}

    def save_snapshot(self, network: PatchGenerator, folder: Path) -> None:
        """Write the (EMA) generator with ``save_pretrained`` and ``femurgen.json``."""
        from patchgen.patch_model import write_patch_info

        network.save_pretrained(folder / GENERATOR_FOLDER)
        write_patch_info(folder, "gan", self.label_names, self.config)

    @torch.no_grad()
    def sample_grid(self, network: PatchGenerator, seed: int) -> np.ndarray | None:
        """Generate rows of (cond | generated | real) for up to 4 training images, in [0, 1]."""
        dataset = self.dataset()
        keys = [(item, derive_seed(seed, item)) for item in range(min(4, len(self.rows)))]
        batch = torch.utils.data.default_collate(dataset.__getitems__(keys))
        device = next(network.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = self._noise(batch, NOISE_STREAM_GENERATOR)
        fake = network(noise, *conditioning_inputs(batch))
        columns = [batch["cond"], fill_padding(fake, batch["mask"]), batch["x0"]]
        rows = torch.cat(columns, dim=3)[:, 0]                  # (B, P, 3P)
        grid = torch.cat(list(rows), dim=0)                     # (B P, 3P)
        return ((grid.float().clamp(-1, 1) + 1.0) / 2.0).cpu().numpy()


def load_generator(model_dir: Path, device: torch.device | str) -> tuple[PatchGenerator, int]:
    """Load the generator snapshot of a GAN patch run; returns (generator, noise channels)."""
    folder = Path(model_dir) / GENERATOR_FOLDER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no generator snapshot (config.json); the run in "
                                f"{Path(model_dir).parent} is not a finished GAN patch run")
    generator = PatchGenerator.from_pretrained(folder).to(device).eval()
    return generator, int(generator.config.noise_channels)
