"""Load trained runs and expose them to synthesis as plain samplers and callables.

``load_global(run)`` returns a ``GlobalSampler`` (sizes and layouts), ``load_patch(run)`` a
``PatchSampler`` whose ``denoise_fn`` / ``gan_fn`` take the tensors of one tile batch.
Model space is [-1, 1]; layouts are returned in [0, 1], the store's convention.
"""

from __future__ import annotations

import json
import logging
import math
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
Shape = tuple[int, int]


GLOBAL_KINDS = ("global",)
PATCH_KINDS = ("diffusion", "gan")


def _read_snapshot_info(model_dir: Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Read RUN/model/femurgen.json and check that the run is of one of ``kinds``."""
    info_path = model_dir / "femurgen.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{info_path} not found: {model_dir.parent} has no finished model snapshot; train it "
            f"first (train-global / train-patch write RUN/model at every checkpoint)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    kind = info.get("kind")
    if kind not in kinds:
        made_by = "train-global" if kind in GLOBAL_KINDS else "train-patch"
        raise ValueError(f"{model_dir.parent} is a {kind} model run made by {made_by}, not a "
                         f"{'/'.join(kinds)} run; check the order of --global and --patch")
    return info


class LayoutSampler:
    """Sample layouts from one ``LayoutUNet`` for given labels and native sizes.

    ``sizes`` are the (label, height, width, spacing_mm) records of the training images;
    ``canvases`` the canvas shapes the model was trained on (one square for letterbox, the
    active buckets otherwise). A native size is generated on the canvas nearest to its
    aspect ratio, the rule training used to assign images to canvases.
    """

    def __init__(self, network: LayoutUNet, diffusion: DiffusionConfig, labels: list[str],
                 sizes: list[SizeRecord], canvases: list[Shape] | None = None):
        self.network = network
        self.diffusion = diffusion
        self.labels = list(labels)
        self.sizes = sizes
        self.resolution = int(network.config.resolution)
        self.canvases = [tuple(c) for c in canvases] if canvases else [(self.resolution,) * 2]

    @classmethod
    def from_task_info(cls, network: LayoutUNet, info: dict[str, Any]) -> "LayoutSampler":
        """Build from the ``femurgen.json`` mapping a global snapshot stores."""
        diffusion = from_dict(DiffusionConfig, info["config"]["diffusion"])
        sizes = [(s["label"], int(s["height"]), int(s["width"]), s["spacing_mm"])
                 for s in info["sizes"]]
        canvases = [(int(h), int(w)) for h, w in info.get("canvases", [])]
        return cls(network, diffusion, info["labels"], sizes, canvases)

    # -- sizes ---------------------------------------------------------------------------
    def label_sizes(self, label: str) -> list[SizeRecord]:
        records = [r for r in self.sizes if r[0] == label]
        if not records:
            raise ValueError(f"label {label!r} has no training sizes; labels: {self.labels}")
        return records

    def first_size(self, label: str) -> Shape:
        _, height, width, _ = self.label_sizes(label)[0]
        return height, width

    def draw_size(self, label: str, rng: np.random.Generator, min_megapixels: float = 0.0,
                  max_megapixels: float = math.inf) -> Shape:
        """Draw (H, W) of a random training image of ``label`` within the megapixel range.

        Drawing whole records keeps height and width jointly distributed as in training.
        """
        records = self.label_sizes(label)
        fitting = [(h, w) for _, h, w, _ in records
                   if min_megapixels * 1e6 <= h * w <= max_megapixels * 1e6]
        if not fitting:
            sizes = [h * w / 1e6 for _, h, w, _ in records]
            raise ValueError(f"no training image of label {label!r} has {min_megapixels} to "
                             f"{max_megapixels} megapixels (training sizes: {min(sizes):.2f} to "
                             f"{max(sizes):.2f} MP); widen --min-megapixels/--max-megapixels "
                             f"or give --size HxW")
        return fitting[int(rng.integers(len(fitting)))]

    def typical_spacing(self, label: str) -> float | None:
        """Median pixel spacing (mm) of the training images of ``label``; None when unknown."""
        values = [s for name, _, _, s in self.sizes if name == label and s]
        return float(np.median(values)) if values else None

    def spacing_for(self, label: str, native_shape: Shape) -> float | None:
        """Spacing (mm) of training images of ``label`` with this native size, else the median.

        Detectors fix both the matrix size and the pixel spacing, so images of one size
        usually share a spacing.
        """
        same_size = [s for name, h, w, s in self.sizes
                     if name == label and (h, w) == tuple(native_shape) and s]
        if same_size:
            return float(np.median(same_size))
        return self.typical_spacing(label)

    # -- geometry ------------------------------------------------------------------------
    def canvas_for(self, native_shape: Shape) -> Shape:
        """Training canvas nearest to the aspect ratio of ``native_shape``."""
        from patchgen.data_order import nearest_bucket

        return self.canvases[nearest_bucket(native_shape, self.canvases,
                                            range(len(self.canvases)))]

    def layout_level(self, native_shape: Shape) -> int:
        """Pyramid level of the returned layout: the first level that fits the canvas."""
        from patchgen.global_model import layout_level

        return layout_level(native_shape, self.canvas_for(native_shape))

    # -- sampling ------------------------------------------------------------------------
    def _condition(self, label: str, native_shape: Shape, spacing_mm: float | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels (2,) [label, null] and size features (2, 4) for a guided batch of two."""
        spacing = spacing_mm if spacing_mm else 0.0
        size = size_features(torch.tensor([native_shape[0]]), torch.tensor([native_shape[1]]),
                             torch.tensor([spacing], dtype=torch.float32)).to(device)
        labels = torch.tensor([self.labels.index(label), len(self.labels)], device=device)
        return labels, size.expand(2, -1)

    @torch.no_grad()
    def sample(self, label: str, native_shape: Shape, generator: torch.Generator,
               steps: int | None = None, guidance_scale: float | None = None,
               spacing_mm: float | None = None, level: int | None = None) -> np.ndarray:
        """Return a layout (h_L, w_L) float32 in [0, 1] for an image of ``native_shape``.

        The layout is generated at the fit shape of the nearest canvas and resized with an
        antialiased filter to level ``level`` (default ``layout_level(native_shape)``).
        ``spacing_mm`` defaults to ``spacing_for(label, native_shape)``; ``generator`` draws
        the initial noise on the CPU, so a seed gives the same layout on any device.
        """
        from patchgen.global_model import fit_shape, resize_image

        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of the model's labels {self.labels}")
        device = next(self.network.parameters()).device
        canvas = self.canvas_for(native_shape)
        fit = fit_shape(native_shape, canvas)
        level = self.layout_level(native_shape) if level is None else level
        out_shape = level_shape(native_shape, level)
        if spacing_mm is None:
            spacing_mm = self.spacing_for(label, native_shape)

        mask = torch.zeros(2, 1, *canvas, device=device)
        mask[..., :fit[0], :fit[1]] = 1.0
        labels, size = self._condition(label, native_shape, spacing_mm, device)
        scale = self.diffusion.guidance_scale if guidance_scale is None else guidance_scale
        use_guidance = len(self.labels) > 1 and scale != 1.0
        scheduler = sampling_scheduler(self.diffusion, steps)

        def model_fn(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            if not use_guidance:
                t = timestep.expand(1).to(device)
                return self.network(x_t, t, mask[:1], labels[:1], size[:1])
            t = timestep.expand(2).to(device)
            conditional, unconditional = self.network(x_t.expand(2, -1, -1, -1), t, mask,
                                                      labels, size).chunk(2)
            return guided(conditional, unconditional, scale)

        noise = torch.randn((1, 1, *canvas), generator=generator).to(device)
        x0 = sample_loop(model_fn, scheduler, noise * scheduler.init_noise_sigma, generator=None)
        image = x0[0, 0, :fit[0], :fit[1]].float().cpu()
        layout = (resize_image(image, out_shape).clamp(-1, 1) + 1.0) / 2.0
        return layout.numpy()


class GlobalSampler:
    """A trained global run (conditional, or one model per label)."""

    def __init__(self, run_dir: Path, device: torch.device | str = "cpu"):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        per_class = self.run_dir / "per-class.json"
        if per_class.is_file():
            labels = json.loads(per_class.read_text(encoding="utf-8"))["labels"]
            self._samplers = {label: self._load(self.run_dir / label / "model") for label in labels}
        else:
            sampler = self._load(self.run_dir / "model")
            self._samplers = {label: sampler for label in sampler.labels}
        self.labels = sorted(self._samplers)
        self.checkpoint_paths = sorted({str(self.checkpoint_for(label)) for label in self.labels})

    def checkpoint_for(self, label: str) -> Path:
        """Snapshot folder of the model that samples ``label``."""
        per_class = self.run_dir / label / "model"
        return per_class if (self.run_dir / "per-class.json").is_file() else self.run_dir / "model"

    def _load(self, model_dir: Path) -> LayoutSampler:
        info = _read_snapshot_info(model_dir, GLOBAL_KINDS)
        network = LayoutUNet.from_pretrained(model_dir / "unet").to(self.device).eval()
        return LayoutSampler.from_task_info(network, info)

    @property
    def resolution(self) -> int:
        return next(iter(self._samplers.values())).resolution

    def _check_label(self, label: str) -> LayoutSampler:
        if label not in self._samplers:
            raise ValueError(f"label {label!r} is not one of the global model's labels {self.labels}")
        return self._samplers[label]

    def draw_native_size(self, label: str, rng: np.random.Generator, min_megapixels: float = 0.0,
                         max_megapixels: float = math.inf) -> tuple[int, int]:
        """Draw (H, W) from the training sizes of ``label`` within the megapixel range."""
        return self._check_label(label).draw_size(label, rng, min_megapixels, max_megapixels)

    def layout_level(self, native_shape: tuple[int, int]) -> int:
        """Pyramid level of every label's layout for ``native_shape``.

        Per-class models may use different canvases; the coarsest of their levels fits all.
        """
        samplers = {id(s): s for s in self._samplers.values()}.values()
        return max(s.layout_level(native_shape) for s in samplers)

    def spacing_mm(self, label: str, native_size: tuple[int, int] | None = None) -> float | None:
        """Pixel spacing (mm) for output metadata: of training images of that size, else typical."""
        sampler = self._check_label(label)
        if native_size is None:
            return sampler.typical_spacing(label)
        return sampler.spacing_for(label, native_size)

    def sample_layout(self, label: str, native_size: tuple[int, int], generator: torch.Generator,
                      steps: int | None = None, guidance_scale: float | None = None,
                      spacing_mm: float | None = None) -> np.ndarray:
        """Layout (h_L, w_L) float32 in [0, 1] at ``layout_level(native_size)``.

        ``spacing_mm`` conditions the model; by default the spacing of training images of
        this size (else the label's median) is used.
        """
        return self._check_label(label).sample(label, native_size, generator, steps,
                                               guidance_scale, spacing_mm,
                                               level=self.layout_level(native_size))


def load_global(run_dir: Path, device: torch.device | str = "cpu") -> GlobalSampler:
    """Load a train-global run folder."""
    return GlobalSampler(run_dir, device)


def load_patch(run_dir: Path, device: torch.device | str = "cpu"):
    """Load a train-patch run folder (diffusion or GAN)."""
    from patchgen.patch_model import PatchSampler
    return PatchSampler(run_dir, device)
