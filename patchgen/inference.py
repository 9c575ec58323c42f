"""Load trained runs and expose them to synthesis as plain samplers and callables.

``load_global(run)`` returns a ``GlobalSampler`` (sizes and layouts), ``load_patch(run)`` a
``PatchSampler`` whose ``denoise_fn`` / ``gan_fn`` take the tensors of one tile batch.
Model space is [-1, 1]; layouts are returned in [0, 1], the store's convention.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchgen.conditioning import level_shape
from patchgen.config import from_dict
from patchgen.diffusion import DiffusionConfig, guided, sample_loop, sampling_scheduler
from patchgen.networks import LayoutUNet, size_features

log = logging.getLogger(__name__)

SizeRecord = tuple[str, int, int, float | None]


def _read_snapshot_info(model_dir: Path) -> dict[str, Any]:
    info_path = model_dir / "femurgen.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path} not found: {model_dir.parent} has no finished model snapshot; train it "
            f"first (train-global / train-patch write RUN/model at every checkpoint)")
    return json.loads(info_path.read_text(encoding="utf-8"))


class LayoutSampler:
    """Sample layouts from one ``LayoutUNet`` for given labels and native sizes."""

    def __init__(self, network: LayoutUNet, diffusion: DiffusionConfig, labels: list[str],
                 sizes: list[SizeRecord]):
        self.network = network
        self.diffusion = diffusion
        self.labels = list(labels)
        self.sizes = sizes
        self.resolution = int(network.config.resolution)

    def first_size(self, label: str) -> tuple[int, int]:
        for name, height, width, _ in self.sizes:
            if name == label:
                return height, width
        raise KeyError(label)

    def typical_spacing(self, label: str) -> float | None:
        values = [s for name, _, _, s in self.sizes if name == label and s]
        return float(np.median(values)) if values else None

    @torch.no_grad()
    def sample(self, label: str, native_shape: tuple[int, int], generator: torch.Generator,
               steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
        """Return a layout (h_L, w_L) float32 in [0, 1] at the layout level of ``native_shape``."""
        from patchgen.global_model import layout_level

        device = next(self.network.parameters()).device
        resolution = self.resolution
        height, width = level_shape(native_shape, layout_level(native_shape, resolution))
        mask = torch.zeros(1, 1, resolution, resolution, device=device)
        mask[..., :height, :width] = 1.0
        spacing = self.typical_spacing(label) or 0.0
        size = size_features(torch.tensor([native_shape[0]]), torch.tensor([native_shape[1]]),
                             torch.tensor([spacing], dtype=torch.float32)).to(device)
        labels = torch.tensor([self.labels.index(label)], device=device)
        null = torch.full_like(labels, len(self.labels))
        scale = self.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        use_guidance = len(self.labels) > 1 and scale != 1.0
        scheduler = sampling_scheduler(self.diffusion, steps)

        def model_fn(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            t = timestep.expand(x_t.shape[0]).to(device)
            conditional = self.network(x_t, t, mask, labels, size)
            if not use_guidance:
                return conditional
            unconditional = self.network(x_t, t, mask, null, size)
            return guided(conditional, unconditional, scale)

        noise = torch.randn((1, 1, resolution, resolution), generator=generator).to(device)
        x0 = sample_loop(model_fn, scheduler, noise * scheduler.init_noise_sigma, generator=None)
        layout = (x0[0, 0, :height, :width].clamp(-1, 1) + 1.0) / 2.0
        return layout.float().cpu().numpy()


class GlobalSampler:
    """A trained global run (conditional, or one model per label)."""

    def __init__(self, run_dir: Path, device: torch.device | str = "cpu"):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        per_class = self.run_dir / "per-class.json"
        if per_class.is_file():
            labels = json.loads(per_class.read_text())["labels"]
            self._samplers = {label: self._load(self.run_dir / label / "model") for label in labels}
        else:
            sampler = self._load(self.run_dir / "model")
            self._samplers = {label: sampler for label in sampler.labels}
        self.labels = sorted(self._samplers)
        self.checkpoint_paths = sorted({str(self._model_dir(label)) for label in self.labels})

    def _model_dir(self, label: str) -> Path:
        per_class = (self.run_dir / label / "model")
        return per_class if per_class.is_dir() else self.run_dir / "model"

    def _load(self, model_dir: Path) -> LayoutSampler:
        info = _read_snapshot_info(model_dir)
        network = LayoutUNet.from_pretrained(model_dir / "unet").to(self.device).eval()
        diffusion = from_dict(DiffusionConfig, info["config"]["diffusion"])
        sizes = [(s["label"], int(s["height"]), int(s["width"]), s["spacing_mm"]) for s in info["sizes"]]
        return LayoutSampler(network, diffusion, info["labels"], sizes)

    @property
    def resolution(self) -> int:
        return next(iter(self._samplers.values())).resolution

    def _check_label(self, label: str) -> LayoutSampler:
        if label not in self._samplers:
            raise ValueError(f"label {label!r} is not one of the global model's labels {self.labels}")
        return self._samplers[label]

    def draw_native_size(self, label: str, rng: np.random.Generator,
                         min_megapixels: float = 0.0) -> tuple[int, int]:
        """Draw (H, W) from the training sizes of ``label`` with at least ``min_megapixels``."""
        sampler = self._check_label(label)
        sizes = [(h, w) for name, h, w, _ in sampler.sizes
                 if name == label and h * w >= min_megapixels * 1e6]
        if not sizes:
            largest = max(h * w for name, h, w, _ in sampler.sizes if name == label) / 1e6
            raise ValueError(f"no training image of label {label!r} has at least "
                             f"{min_megapixels} megapixels (largest: {largest:.2f} MP); lower "
                             f"--min-megapixels or give --size HxW")
        return sizes[int(rng.integers(len(sizes)))]

    def layout_level(self, native_shape: tuple[int, int]) -> int:
        from patchgen.global_model import layout_level
        return layout_level(native_shape, self.resolution)

    def spacing_mm(self, label: str) -> float | None:
        return self._check_label(label).typical_spacing(label)

    def sample_layout(self, label: str, native_size: tuple[int, int], generator: torch.Generator,
                      steps: int | None = None, guidance_scale: float | None = None) -> np.ndarray:
        """Layout (h_L, w_L) float32 in [0, 1] at ``layout_level(native_size)``."""
        return self._check_label(label).sample(label, native_size, generator, steps, guidance_scale)


def load_global(run_dir: Path, device: torch.device | str = "cpu") -> GlobalSampler:
    """Load a train-global run folder."""
    return GlobalSampler(run_dir, device)


def load_patch(run_dir: Path, device: torch.device | str = "cpu"):
    """Load a train-patch run folder (diffusion or GAN)."""
    from patchgen.patch_model import PatchSampler
    return PatchSampler(run_dir, device)
