"""X-ray encoder that femurgen trains itself on the real training split (no downloaded weights).

A small CNN learns contrastive embeddings (SimCLR, Chen et al. 2020: two augmented views of each
image, NT-Xent loss) from square views of the store's training images. It is saved next to the store
as `<store>.encoder/` with `model.safetensors` and `config.json`, and serves as a feature extractor
(`encoder`) for the distances and for memorization.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from eval.config import EncoderConfig
from eval.data import StoreLike, real_view, sample_rows

logger = logging.getLogger(__name__)


def default_encoder_path(store_path: Path) -> Path:
    """Return `<store parent>/<store name>.encoder`, where eval keeps the encoder of a store."""
    store_path = Path(store_path)
    return store_path.parent / f"{store_path.name}.encoder"


class Encoder(nn.Module):
    """Four strided convolutions, global average pooling and a linear embedding.

    Input (B, 1, S, S) in [0, 1]; output (B, embedding_dim).
    """

    def __init__(self, width: int, embedding_dim: int) -> None:
        super().__init__()
        channels = [1, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
        self.backbone = nn.Sequential(*layers)
        self.embed = nn.Linear(channels[-1], embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone(images * 2.0 - 1.0).mean(dim=(2, 3))  # (B, 8 * width)
        return self.embed(pooled)


class EncoderFeatures(nn.Module):
    """Feature-extractor wrapper: resizes any (B, 1, H, W) in [0, 1] to the training size first."""

    name = "encoder"

    def __init__(self, encoder: Encoder, image_size: int) -> None:
        super().__init__()
        self.encoder = encoder.eval()
        self.image_size = image_size
        self.num_features = encoder.embed.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) in [0, 1] to (B, embedding_dim)."""
        resized = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                antialias=True, align_corners=False)
        with torch.no_grad():
            return self.encoder(resized)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one random view of each image (B, 1, S, S): crop 70-100%, resize back, flip, gamma, noise.

    The crop, resize and flip are one affine resampling of the whole batch (bilinear).
    """
    count = batch.shape[0]
    scale = 0.7 + 0.3 * torch.rand(count, generator=generator)  # crop side / image side
    shift = (torch.rand(count, 2, generator=generator) * 2.0 - 1.0) * (1.0 - scale)[:, None]
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    views = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.exp((torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.6)  # 0.74 .. 1.35
    noise = torch.randn(views.shape, generator=generator) * 0.02
    return (views.clamp(0.0, 1.0) ** gamma + noise).clamp(0.0, 1.0)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent loss of paired embeddings (B, D): each view must pick its partner among 2B - 1 others."""
    count = first.shape[0]
    embeddings = F.normalize(torch.cat([first, second]), dim=1)  # (2B, D)
    logits = embeddings @ embeddings.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(0, count)]).to(logits.device)
    return F.cross_entropy(logits, targets)


def train_encoder(store: StoreLike, store_path: Path, config: EncoderConfig, seed: int,
                  out: Path | None = None, device: torch.device | str = "cpu") -> Path:
    """Train the encoder on views of the store's training split and save it; returns its folder.

    Training length is `config.duration` images (each seen as two augmented views). Augmentation runs
    on the host with a seeded generator; the network runs on `device`.
    """
    out = Path(out) if out else default_encoder_path(store_path)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = sample_rows(store, "train", config.max_images, rng)
    if len(rows) < 2:
        raise ValueError(f"{store_path}: the encoder needs at least 2 training images, found {len(rows)}")
    views = torch.from_numpy(np.stack([real_view(store, row.image_id, row.levels, config.image_size)
                                       for row in rows]))[:, None]  # (N, 1, S, S)

    with torch.random.fork_rng(devices=[]):  # nn.Module initialisation draws from the global RNG
        torch.manual_seed(seed)
        encoder = Encoder(config.width, config.embedding_dim)
        head = nn.Sequential(nn.Linear(config.embedding_dim, config.embedding_dim), nn.SiLU(),
                             nn.Linear(config.embedding_dim, config.embedding_dim))
    encoder.to(device)
    head.to(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=config.learning_rate)
    batch_size = min(config.batch_size, len(views))
    steps = max(1, math.ceil(config.duration / batch_size))
    losses = []
    for step in range(steps):
        index = torch.randperm(len(views), generator=generator)[:batch_size]
        batch = views[index]
        first, second = augment(batch, generator).to(device), augment(batch, generator).to(device)
        loss = nt_xent(head(encoder(first)), head(encoder(second)), config.temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            logger.info("encoder step %d/%d images %d loss %.4f", step + 1, steps, (step + 1) * batch_size, losses[-1])

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in encoder.state_dict().items()}, str(out / "model.safetensors"))
    info = {"config": asdict(config), "seed": seed, "train_images": len(rows), "steps": steps,
            "final_loss": losses[-1], "store": str(Path(store_path).resolve())}
    (out / "config.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_encoder(path: Path) -> EncoderFeatures:
    """Load a saved encoder folder as a feature extractor; raises FileNotFoundError naming the fix."""
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"no trained encoder in {path} (model.safetensors + config.json); train it with "
                                f"`python cli.py eval train-encoder --real STORE` or set encoder.auto_train=true")
    config = EncoderConfig(**json.loads((path / "config.json").read_text())["config"])
    encoder = Encoder(config.width, config.embedding_dim)
    encoder.load_state_dict(load_file(str(path / "model.safetensors")))
    return EncoderFeatures(encoder, config.image_size)
