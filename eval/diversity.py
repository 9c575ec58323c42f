"""Pairwise diversity within a set: LPIPS (local backbone weights) and MS-SSIM (torchmetrics).

Higher LPIPS and lower MS-SSIM between pairs mean a more diverse set; the synthetic values are read next
to the same numbers for real pairs. LPIPS uses the `lpips` package's linear layers (shipped inside
the package) on an AlexNet or VGG16 backbone whose weights come from a local file (see eval.weights).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from eval.weights import resolve_weights

logger = logging.getLogger(__name__)

MS_SSIM_MIN_SIDE = 161  # 5 scales with an 11 px Gaussian window need more than (11 - 1) * 2^4 px


def pair_indices(count: int, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Draw up to `pairs` distinct unordered index pairs (P, 2) from `count` items (all pairs if fewer exist)."""
    if count < 2:
        return np.zeros((0, 2), np.int64)
    first, second = np.triu_indices(count, k=1)
    every = np.stack([first, second], axis=1)
    if len(every) > pairs:
        every = every[np.sort(rng.choice(len(every), pairs, replace=False))]
    return every


def ms_ssim_pairs(images: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Compute the MS-SSIM of each pair (P,) of images (N, S, S) in [0, 1], S >= 161, data range 1."""
    if images.shape[-1] < MS_SSIM_MIN_SIDE or images.shape[-2] < MS_SSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs views of at least {MS_SSIM_MIN_SIDE} px, got {images.shape[-2:]}; "
                         f"raise eval.diversity.view_size")
    if len(pairs) == 0:
        return np.zeros(0)
    tensor = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    values = multiscale_structural_similarity_index_measure(
        tensor[pairs[:, 0]], tensor[pairs[:, 1]], data_range=1.0, reduction="none")
    return values.double().numpy()


class LocalLPIPS(nn.Module):
    """LPIPS v0.1 whose backbone is loaded from a local safetensors file checked by SHA-256.

    Greyscale (B, 1, H, W) in [0, 1] is replicated to three channels and scaled once to [-1, 1], the
    input range of LPIPS, identically for real and synthetic images.
    """

    def __init__(self, net: str = "alex", path: str | Path | None = None, sha256: str | None = None,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        import lpips

        if net not in ("alex", "vgg"):
            raise ValueError(f"eval.diversity.lpips_net {net!r}: expected alex, vgg or none")
        file = resolve_weights(f"lpips-{net}", path, sha256, cache_dir)
        # pnet_rand=True builds the torchvision backbone without downloading; its weights come from `file`.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
        self._load_backbone(load_file(str(file)))

    def _load_backbone(self, features: dict[str, torch.Tensor]) -> None:
        """Copy torchvision `features.<index>.*` tensors into the lpips slices that hold those layers."""
        state = self.model.net.state_dict()
        missing = []
        for key in state:
            _, index, kind = key.split(".")  # "slice2.3.weight"
            source = f"{index}.{kind}"
            if source not in features or features[source].shape != state[key].shape:
                missing.append(source)
                continue
            state[key] = features[source]
        if missing:
            raise ValueError(f"LPIPS backbone file lacks or mismatches tensors {missing}; fetch it with "
                             f"`python cli.py weights fetch lpips-{self.model.pnet_type}`")
        self.model.net.load_state_dict(state)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Return the LPIPS distance (B,) between two batches (B, 1, H, W) in [0, 1]."""
        device = next(self.model.parameters()).device
        scaled = [image.to(device).float().clamp(0, 1).repeat(1, 3, 1, 1) * 2.0 - 1.0 for image in (first, second)]
        with torch.no_grad():
            return self.model(scaled[0], scaled[1]).flatten().cpu()


def lpips_pairs(model: LocalLPIPS, images: np.ndarray, pairs: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Compute the LPIPS of each pair (P,) of images (N, S, S) in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    values = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        values.append(model(tensor[chunk[:, 0]], tensor[chunk[:, 1]]).double().numpy())
    return np.concatenate(values) if values else np.zeros(0)
