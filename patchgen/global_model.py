"""Global layout model: a class-conditional diffusion model of whole radiographs at low resolution.

Each training image is read at its layout level ``L``: the first pyramid level whose long
side fits the model's square canvas of ``R`` pixels. The image is never stretched: it sits
in the top-left corner of the canvas, the rest is padding, and a validity mask channel
tells the model which pixels are image. The model is also conditioned on the native height,
width and pixel spacing, so at sampling time a native size is chosen first and the layout
is generated for it.

``mode: conditional`` trains one model for all labels with classifier-free guidance;
``mode: per-class`` trains one model per label in ``RUN/<label>/`` from the same command.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchgen.conditioning import level_shape
from patchgen.config import ConfigError, to_dict
from patchgen.diffusion import (DiffusionConfig, drop_labels, masked_mse, noise_batch,
                                training_scheduler)
from patchgen.networks import LayoutUNet, check_divisible, size_features
from patchgen.trainer import TrainConfig, Trainer, seeded_init

log = logging.getLogger(__name__)

MODES = ("conditional", "per-class")


@dataclass
class LayoutModelConfig:
    """Architecture of the layout UNet."""

    resolution: int = 64                      # square canvas side R, pixels
    channels: tuple[int, ...] = (32, 64, 64)  # UNet block widths
    layers_per_block: int = 1
    attention_from: int = 2                   # first block index with self-attention
    norm_groups: int = 8


@dataclass
class GlobalConfig:
    """Everything ``train-global`` needs."""

    mode: str = "conditional"
    split: str = "train"                      # catalog split to train on
    model: LayoutModelConfig = field(default_factory=LayoutModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {MODES}")
        check_divisible(self.model.resolution, self.model.channels, "model.resolution")


def layout_level(native_shape: tuple[int, int], resolution: int) -> int:
    """First pyramid level whose long side is at most ``resolution`` pixels."""
    level = 0
    while max(level_shape(native_shape, level)) > resolution:
        level += 1
    return level


class LayoutDataset(torch.utils.data.Dataset):
    """Letterboxed layouts of the catalog rows, indexed by sample key ``(item, seed)``.

    Returns ``x0`` (1, R, R) in [-1, 1] with -1 padding, ``mask`` (1, R, R), ``label`` long,
    ``size`` (4,) from ``size_features`` and ``seed`` (the sample's key seed).
    """

    def __init__(self, store, rows, label_names: list[str], resolution: int):
        self.store = store
        self.rows = rows
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        item, seed = key
        row = self.rows[item]
        level = layout_level((row.height, row.width), self.resolution)
        if level >= row.levels:
            raise ConfigError(
                f"image {row.image_id} ({row.height}x{row.width}) has {row.levels} pyramid levels "
                f"but the layout needs level {level} for model.resolution={self.resolution}; "
                f"raise model.resolution or rebuild the store with smaller top levels")
        pixels = self.store.read_level(row.image_id, level)
        height, width = pixels.shape
        canvas = np.full((1, self.resolution, self.resolution), -1.0, dtype=np.float32)
        mask = np.zeros_like(canvas)
        canvas[0, :height, :width] = pixels * 2.0 - 1.0
        mask[0, :height, :width] = 1.0
        spacing = row.spacing_mm if row.spacing_mm else 0.0
        size = size_features(torch.tensor([row.height]), torch.tensor([row.width]),
                             torch.tensor([spacing], dtype=torch.float32))[0]
        return {"x0": torch.from_numpy(canvas), "mask": torch.from_numpy(mask),
                "label": torch.tensor(self.label_index[row.label]), "size": size,
                "seed": torch.tensor(seed)}


class GlobalTask:
    """Training task of one layout model (all labels, or one label in per-class mode)."""

    ema_network = "model"
    phases = ("model",)

    def __init__(self, store, rows, label_names: list[str], config: GlobalConfig):
        self.store = store
        self.rows = rows
        self.label_names = label_names
        self.config = config
        model = config.model
        self.networks = {"model": LayoutUNet(resolution=model.resolution,
                                             channels=tuple(model.channels),
                                             layers_per_block=model.layers_per_block,
                                             attention_from=model.attention_from,
                                             norm_groups=model.norm_groups,
                                             num_labels=len(label_names))}
        self.scheduler = training_scheduler(config.diffusion)
        self.label_dropout = config.diffusion.label_dropout if len(label_names) > 1 else 0.0

    def dataset(self) -> LayoutDataset:
        return LayoutDataset(self.store, self.rows, self.label_names, self.config.model.resolution)

    def num_items(self) -> int:
        return len(self.rows)

    def loss(self, phase, networks, batch):
        """Masked denoising loss on the letterboxed layouts."""
        x_t, timesteps, target = noise_batch(self.scheduler, batch["x0"], batch["seed"])
        labels = drop_labels(batch["label"], batch["seed"], self.label_dropout,
                             null_label=len(self.label_names))
        output = networks["model"](x_t, timesteps, batch["mask"], labels, batch["size"])
        loss = masked_mse(output, target, batch["mask"])
        return loss, {"loss": float(loss.detach())}

    def save_snapshot(self, network: LayoutUNet, folder: Path) -> None:
        """Write EMA weights, the sampling scheduler config and the size catalog."""
        from patchgen.diffusion import sampling_scheduler

        network.save_pretrained(folder / "unet")
        sampling_scheduler(self.config.diffusion).save_pretrained(folder / "scheduler")
        sizes = [{"label": r.label, "height": r.height, "width": r.width,
                  "spacing_mm": r.spacing_mm} for r in self.rows]
        info = {"kind": "global", "labels": self.label_names, "mode": self.config.mode,
                "config": to_dict(self.config), "sizes": sizes}
        (folder / "femurgen.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    def sample_grid(self, network: LayoutUNet, seed: int) -> np.ndarray | None:
        """One layout per label at the size of a training image of that label, side by side."""
        from patchgen.inference import LayoutSampler

        sampler = LayoutSampler(network, self.config.diffusion, self.label_names,
                                sizes=[(r.label, r.height, r.width, r.spacing_mm) for r in self.rows])
        tiles = []
        for index, label in enumerate(self.label_names):
            native = sampler.first_size(label)
            generator = torch.Generator().manual_seed(seed * 1000 + index)
            layout = sampler.sample(label, native, generator)
            tile = np.zeros((self.config.model.resolution,) * 2, dtype=np.float32)
            tile[:layout.shape[0], :layout.shape[1]] = layout
            tiles.append(tile)
        return np.concatenate(tiles, axis=1)


def _train_rows(store, split: str):
    rows = store.rows(split=split)
    if not rows:
        counts = {s: len(store.rows(split=s)) for s in ("train", "val", "test")}
        raise ConfigError(f"{store.path}: no images in split {split!r} (split sizes {counts}); "
                          f"set split= to a non-empty split or rebuild with other fractions")
    return rows


def train_global(store_path: Path, run_dir: Path, config: GlobalConfig,
                 device: str | None = None) -> dict[str, Any]:
    """Train the global layout model(s); rerunning resumes. Returns a summary per model."""
    from preprocess.store import PyramidStore

    store = PyramidStore(store_path)
    rows = _train_rows(store, config.split)
    labels = sorted({r.label for r in rows})
    full_config = to_dict(config)
    if config.mode == "conditional":
        with seeded_init(config.train.seed):
            task = GlobalTask(store, rows, labels, config)
        record = Trainer(task, config.train, run_dir, full_config, device=device).fit()
        return {"model": str(Path(run_dir) / "model"), **record}
    summaries: dict[str, Any] = {}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "per-class.json").write_text(json.dumps({"labels": labels}), encoding="utf-8")
    for label in labels:
        label_rows = [r for r in rows if r.label == label]
        log.info("per-class mode: training the %s model on %d images", label, len(label_rows))
        with seeded_init(config.train.seed):
            task = GlobalTask(store, label_rows, [label], config)
        summaries[label] = Trainer(task, config.train, Path(run_dir) / label, full_config,
                                   device=device).fit()
    return summaries
