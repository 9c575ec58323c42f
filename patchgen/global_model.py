"""Global layout model: a class-conditional diffusion model of whole radiographs at low resolution.

Images are never stretched. Each training image is scaled, keeping its aspect ratio, to
the largest size that fits its canvas (the fit shape). The rest of the canvas is padding,
and a validity mask channel marks which pixels are image. Two size strategies
(``data.strategy``):

* ``letterbox``: one square canvas of ``model.resolution`` x ``model.resolution`` pixels;
* ``buckets``: a list of canvas shapes of about the same pixel count (at most
  ``model.resolution ** 2``), each image in the bucket nearest to its aspect ratio, so
  elongated radiographs waste little of the pixel budget. Buckets too small to fill a
  micro-batch are merged into their neighbours (``patchgen.data_order.plan_buckets``).

The fit image is read from the coarsest pyramid level at least as large and resized with
an antialiased filter. The model is also conditioned on the native height, width and pixel
spacing, so at sampling time a native size is chosen first and the layout is generated
for it. Sampling returns the layout at pyramid level ``layout_level(native, canvas)``, the
first level that fits the canvas, which is where the patch models take over.

``mode: conditional`` trains one model for all labels with classifier-free guidance;
``mode: per-class`` trains one model per label in ``RUN/<label>/`` from the same command.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from patchgen.conditioning import level_shape
from patchgen.config import ConfigError, to_dict
from patchgen.data_order import BucketOrder, ShuffledOrder, plan_buckets
from patchgen.diffusion import (DiffusionConfig, drop_labels, masked_mse, noise_batch,
                                training_scheduler)
from patchgen.networks import LayoutUNet, check_divisible, size_features
from patchgen.trainer import TrainConfig, Trainer, seeded_init

log = logging.getLogger(__name__)

MODES = ("conditional", "per-class")
STRATEGIES = ("letterbox", "buckets")
Shape = tuple[int, int]

# Sub-folder names of a per-class run that a label must not take.
_RESERVED_NAMES = {"checkpoints", "model", "samples", "tensorboard"}
_SAFE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
SAMPLES_PER_LABEL = 4   # layouts per label in a training sample grid


@dataclass
class LayoutModelConfig:
    """Architecture of the layout UNet."""

    resolution: int = 64                      # letterbox canvas side R; R * R is the pixel budget
    channels: tuple[int, ...] = (32, 64, 64)  # UNet block widths
    layers_per_block: int = 1
    attention_from: int = 2                   # first block index with self-attention
    norm_groups: int = 8


@dataclass
class LayoutDataConfig:
    """Size strategy: how images of any size and aspect ratio become model inputs."""

    strategy: str = "letterbox"               # letterbox | buckets
    # Canvas shapes (height, width) in pixels for strategy buckets; each at most
    # model.resolution ** 2 pixels, sides divisible by the UNet's downsampling factor.
    buckets: tuple[tuple[int, int], ...] = ((64, 64), (56, 72), (72, 56), (48, 80), (80, 48))
    # Keep fitted layouts in memory after the first read: up to (images x canvas pixels x 4)
    # bytes in every DataLoader worker process.
    cache_layouts: bool = False


@dataclass
class GlobalConfig:
    """Everything ``train-global`` needs."""

    mode: str = "conditional"
    split: str = "train"                      # catalog split to train on
    model: LayoutModelConfig = field(default_factory=LayoutModelConfig)
    data: LayoutDataConfig = field(default_factory=LayoutDataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {MODES}")
        if self.data.strategy not in STRATEGIES:
            raise ConfigError(f"data.strategy={self.data.strategy!r}; use one of {STRATEGIES}")
        check_divisible(self.model.resolution, self.model.channels, "model.resolution")
        if self.data.strategy == "buckets":
            validate_buckets(self.data.buckets, self.model.resolution, tuple(self.model.channels))


def validate_buckets(buckets: Sequence[Shape], resolution: int, channels: tuple[int, ...]) -> None:
    """Check the bucket list against the pixel budget ``resolution ** 2`` and the UNet depth."""
    if not buckets:
        raise ConfigError("data.buckets is empty; list canvas shapes such as [[64, 64], [56, 72]] "
                          "or set data.strategy=letterbox")
    budget = resolution * resolution
    aspects: dict[float, Shape] = {}
    for index, bucket in enumerate(buckets):
        if len(bucket) != 2 or min(bucket) < 1:
            raise ConfigError(f"data.buckets[{index}]={list(bucket)} must be [height, width] in "
                              f"pixels, both positive")
        height, width = bucket
        check_divisible(height, channels, f"data.buckets[{index}] height")
        check_divisible(width, channels, f"data.buckets[{index}] width")
        if height * width > budget:
            raise ConfigError(
                f"data.buckets[{index}]={height}x{width} has {height * width} pixels, more than "
                f"the budget model.resolution**2 = {budget}; shrink the bucket or raise "
                f"model.resolution")
        aspect = round(height / width, 6)
        if aspect in aspects:
            raise ConfigError(f"data.buckets has two buckets of aspect ratio {aspect}: "
                              f"{list(aspects[aspect])} and {[height, width]}; keep one")
        aspects[aspect] = (height, width)


def declared_canvases(config: GlobalConfig) -> list[Shape]:
    """Canvas shapes the config allows: one square, or the bucket list."""
    if config.data.strategy == "letterbox":
        return [(config.model.resolution, config.model.resolution)]
    return [(int(h), int(w)) for h, w in config.data.buckets]


# --- canvas geometry ------------------------------------------------------------------------
def _as_canvas(canvas: int | Shape) -> Shape:
    if isinstance(canvas, int):
        return canvas, canvas
    return int(canvas[0]), int(canvas[1])


def fit_shape(native_shape: Shape, canvas: int | Shape) -> Shape:
    """Largest (h, w) with the aspect ratio of ``native_shape`` that fits inside ``canvas``.

    ``canvas`` is a side length (square) or (H, W). The scale is
    ``min(H_c / H, W_c / W)``; sides are rounded to whole pixels and are at least 1.
    """
    height, width = native_shape
    canvas_height, canvas_width = _as_canvas(canvas)
    scale = min(canvas_height / height, canvas_width / width)
    return (max(1, min(canvas_height, round(height * scale))),
            max(1, min(canvas_width, round(width * scale))))


def layout_level(native_shape: Shape, canvas: int | Shape) -> int:
    """First pyramid level whose shape fits inside ``canvas`` (a side length or (H, W))."""
    canvas_height, canvas_width = _as_canvas(canvas)
    level = 0
    while True:
        height, width = level_shape(native_shape, level)
        if height <= canvas_height and width <= canvas_width:
            return level
        level += 1


def source_level(native_shape: Shape, levels: int, target: Shape) -> int:
    """Coarsest of the ``levels`` pyramid levels that is at least ``target`` in both sides."""
    level = 0
    while level + 1 < levels:
        height, width = level_shape(native_shape, level + 1)
        if height < target[0] or width < target[1]:
            break
        level += 1
    return level


def resize_image(pixels: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Resize (..., h, w) to (..., H, W) with antialiased bilinear filtering; no-op at equal shape."""
    if tuple(pixels.shape[-2:]) == tuple(shape):
        return pixels
    batch_shape = pixels.shape[:-2]
    flat = pixels.reshape(-1, 1, *pixels.shape[-2:])
    resized = F.interpolate(flat, size=tuple(shape), mode="bilinear", align_corners=False,
                            antialias=True)
    return resized.reshape(*batch_shape, *shape)


def read_fitted(store, row, canvas: Shape) -> np.ndarray:
    """Read image ``row`` scaled to ``fit_shape`` of ``canvas``; (h, w) float32 in [0, 1]."""
    native = (row.height, row.width)
    target = fit_shape(native, canvas)
    level = source_level(native, row.levels, target)
    pixels = torch.from_numpy(np.ascontiguousarray(store.read_level(row.image_id, level),
                                                   dtype=np.float32))
    if pixels.shape[0] < target[0] or pixels.shape[1] < target[1]:
        log.warning("image %s: finest stored level %dx%d is smaller than the fit shape %dx%d; "
                    "upsampling it", row.image_id, *pixels.shape, *target)
    return resize_image(pixels, target).clamp(0.0, 1.0).numpy()


def canvas_fill(native_shape: Shape, canvas: Shape) -> float:
    """Fraction of ``canvas`` pixels covered by the fitted image, in (0, 1]."""
    height, width = fit_shape(native_shape, canvas)
    return height * width / (canvas[0] * canvas[1])


def place_on_canvas(image: np.ndarray, canvas: Shape) -> tuple[np.ndarray, np.ndarray]:
    """Put ``image`` (h, w) in [0, 1] top-left on a canvas in model space.

    Returns ``x0`` (1, H, W) in [-1, 1] with -1 padding and ``mask`` (1, H, W), 1 on the image.
    """
    height, width = image.shape
    x0 = np.full((1, *canvas), -1.0, dtype=np.float32)
    mask = np.zeros((1, *canvas), dtype=np.float32)
    x0[0, :height, :width] = image * 2.0 - 1.0
    mask[0, :height, :width] = 1.0
    return x0, mask


class LayoutDataset(torch.utils.data.Dataset):
    """Fitted layouts of the catalog rows, indexed by sample key ``(item, seed)``.

    Returns ``x0`` (1, H_c, W_c) in [-1, 1] with -1 padding, ``mask`` (1, H_c, W_c),
    ``label`` long, ``size`` (4,) from ``size_features`` and ``seed`` (the sample's key
    seed), where (H_c, W_c) is the canvas of the item.
    """

    def __init__(self, store, rows, label_names: list[str], canvas_of_item: Sequence[Shape],
                 cache: bool = False):
        self.store = store
        self.rows = rows
        self.label_index = {name: i for i, name in enumerate(label_names)}
        self.canvas_of_item = list(canvas_of_item)
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        item, seed = key
        row = self.rows[item]
        canvas = self.canvas_of_item[item]
        x0, mask = place_on_canvas(self._fitted(item), canvas)
        spacing = row.spacing_mm if row.spacing_mm else 0.0
        size = size_features(torch.tensor([row.height]), torch.tensor([row.width]),
                             torch.tensor([spacing], dtype=torch.float32))[0]
        return {"x0": torch.from_numpy(x0), "mask": torch.from_numpy(mask),
                "label": torch.tensor(self.label_index[row.label]), "size": size,
                "seed": torch.tensor(seed)}

    def _fitted(self, item: int) -> np.ndarray:
        """Fitted image (h, w) in [0, 1] of ``item``, from the cache when enabled."""
        if self.cache is not None and item in self.cache:
            return self.cache[item]
        image = read_fitted(self.store, self.rows[item], self.canvas_of_item[item])
        if self.cache is not None:
            self.cache[item] = image
        return image


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
        self.plan = plan_buckets([(r.height, r.width) for r in rows], declared_canvases(config),
                                 config.train.batch_size)
        fills = [canvas_fill((r.height, r.width), self.plan.shape_of_item(i))
                 for i, r in enumerate(rows)]
        log.info("images per canvas %s; the images cover %.0f%% of their canvases on average",
                 self.plan.counts(), 100.0 * float(np.mean(fills)))

    def dataset(self) -> LayoutDataset:
        canvases = [self.plan.shape_of_item(i) for i in range(len(self.rows))]
        return LayoutDataset(self.store, self.rows, self.label_names, canvases,
                             cache=self.config.data.cache_layouts)

    def num_items(self) -> int:
        return len(self.rows)

    def sample_order(self, batch_size: int, seed: int):
        """Return a data order with one canvas shape per micro-batch.

        One active canvas (letterbox, or buckets merged into one) gets a shuffled order,
        several get a ``BucketOrder``.
        """
        if len(self.plan.active) == 1:
            return ShuffledOrder(len(self.rows), batch_size, seed)
        return BucketOrder(self.plan, batch_size, seed)

    def loss(self, phase, networks, batch):
        """Masked denoising loss on the fitted layouts."""
        x_t, timesteps, target = noise_batch(self.scheduler, batch["x0"], batch["seed"])
        labels = drop_labels(batch["label"], batch["seed"], self.label_dropout,
                             null_label=len(self.label_names))
        output = networks["model"](x_t, timesteps, batch["mask"], labels, batch["size"])
        loss = masked_mse(output, target, batch["mask"])
        return loss, {"loss": float(loss.detach())}

    def snapshot_info(self) -> dict[str, Any]:
        """Facts sampling needs besides the weights: labels, canvases and training sizes."""
        sizes = [{"label": r.label, "height": r.height, "width": r.width,
                  "spacing_mm": r.spacing_mm} for r in self.rows]
        return {"kind": "global", "labels": self.label_names, "mode": self.config.mode,
                "canvases": [list(self.plan.shapes[b]) for b in self.plan.active],
                "config": to_dict(self.config), "sizes": sizes}

    def save_snapshot(self, network: LayoutUNet, folder: Path) -> None:
        """Write EMA weights, the sampling scheduler config and the size catalog."""
        from patchgen.diffusion import sampling_scheduler

        network.save_pretrained(folder / "unet")
        sampling_scheduler(self.config.diffusion).save_pretrained(folder / "scheduler")
        (folder / "femurgen.json").write_text(json.dumps(self.snapshot_info(), indent=2),
                                              encoding="utf-8")

    def sample_grid(self, network: LayoutUNet, seed: int) -> np.ndarray | None:
        """Layouts at training sizes: one row per label, ``SAMPLES_PER_LABEL`` columns.

        Returns (labels * H, SAMPLES_PER_LABEL * W) in [0, 1], each layout top-left in a
        cell as large as the largest canvas.
        """
        from patchgen.inference import LayoutSampler

        sampler = LayoutSampler.from_task_info(network, self.snapshot_info())
        cell = (max(h for h, _ in sampler.canvases), max(w for _, w in sampler.canvases))
        rows = []
        for label_index, label in enumerate(self.label_names):
            cells = []
            rng = np.random.default_rng([seed, label_index])
            for column in range(SAMPLES_PER_LABEL):
                native = sampler.draw_size(label, rng)
                generator = torch.Generator().manual_seed(seed * 1000 + label_index * 100 + column)
                layout = sampler.sample(label, native, generator)
                tile = np.zeros(cell, dtype=np.float32)
                tile[:layout.shape[0], :layout.shape[1]] = layout
                cells.append(tile)
            rows.append(np.concatenate(cells, axis=1))
        return np.concatenate(rows, axis=0)


# --- training entry point -------------------------------------------------------------------
def _train_rows(store, split: str):
    rows = store.rows(split=split)
    if not rows:
        counts = {s: len(store.rows(split=s)) for s in ("train", "val", "test")}
        raise ConfigError(f"{store.path}: no images in split {split!r} (split sizes {counts}); "
                          f"set split= to a non-empty split or rebuild with other fractions")
    return rows


def check_label_folder_name(label: str) -> None:
    """Per-class runs store each model in ``RUN/<label>/``; reject labels unsafe as folder names."""
    if not _SAFE_LABEL.match(label) or label in _RESERVED_NAMES or label in (".", ".."):
        raise ConfigError(
            f"label {label!r} cannot name a per-class sub-folder (letters, digits, '_', '-', "
            f"'.' and spaces, not starting with a symbol, and none of {sorted(_RESERVED_NAMES)}); "
            f"rename it in the label table or use mode=conditional")


def _check_mode(run_dir: Path, mode: str) -> None:
    """Reject a run folder of the other mode: one conditional model or per-class models."""
    per_class_file = run_dir / "per-class.json"
    if mode == "conditional" and per_class_file.exists():
        raise ConfigError(f"{run_dir} contains a per-class run ({per_class_file}); resume it with "
                          f"mode=per-class or choose a new --out folder")
    if mode == "per-class" and (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} contains a conditional run ({run_dir / 'checkpoints'}); "
                          f"resume it with mode=conditional or choose a new --out folder")


def _write_per_class_index(run_dir: Path, labels: list[str]) -> None:
    path = run_dir / "per-class.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))["labels"]
        if saved != labels:
            raise ConfigError(f"{path} lists labels {saved} but split has labels {labels}; "
                              f"use the same store and split or a new --out folder")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"labels": labels}), encoding="utf-8")
    tmp.replace(path)


def train_global(store_path: Path, run_dir: Path, config: GlobalConfig,
                 device: str | None = None) -> dict[str, Any]:
    """Train the global layout model(s); rerunning resumes. Returns a summary per model."""
    from preprocess.store import PyramidStore

    run_dir = Path(run_dir)
    store = PyramidStore(store_path)
    rows = _train_rows(store, config.split)
    labels = sorted({r.label for r in rows})
    full_config = to_dict(config)
    _check_mode(run_dir, config.mode)
    if config.mode == "conditional":
        with seeded_init(config.train.seed):
            task = GlobalTask(store, rows, labels, config)
        record = Trainer(task, config.train, run_dir, full_config, device=device).fit()
        return {"model": str(run_dir / "model"), **record}

    for label in labels:
        check_label_folder_name(label)
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_per_class_index(run_dir, labels)
    summaries: dict[str, Any] = {}
    for label in labels:
        label_rows = [r for r in rows if r.label == label]
        log.info("per-class mode: training the %s model on %d images", label, len(label_rows))
        with seeded_init(config.train.seed):
            task = GlobalTask(store, label_rows, [label], config)
        summaries[label] = Trainer(task, config.train, run_dir / label, full_config,
                                   device=device).fit()
    return summaries
