"""`eval`: compare a real pyramid store with a folder of synthetic images; write metrics.json and report.html.

Steps: counts per label -> global views and their features -> FID/KID/PRDC per extractor and label ->
native-resolution crops per level (distances, histograms, spectra) -> diversity -> seam score ->
memorization -> report. A metric that is undefined for the inputs (too few images, no test split) is
recorded as "not_computed" with its reason; nothing here writes NaN.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval import report
from eval.config import EvalConfig, resolve_device
from eval.data import (SyntheticImage, list_synthetic, real_crops, real_view, sample_rows, synthetic_crops,
                       synthetic_view)
from eval.distances import (equalize_counts, frechet_distance, frechet_interval, kernel_distance,
                            precision_recall_density_coverage, standardize)
from eval.diversity import LocalLPIPS, lpips_pairs, ms_ssim_pairs, pair_indices
from eval.encoder import default_encoder_path, train_encoder
from eval.features import build_extractor, extract_features
from eval.memorization import memorization_table, normalise_rows, unit_rows
from eval.records import TooFewSamplesError, bootstrap_ci, computed, not_computed, write_json
from eval.seams import seam_score
from eval.spectra import histogram_distances, intensity_histogram, radial_power_spectrum, spectrum_distance

logger = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Images (N, S, S) in [0, 1] with a label and an id per image."""

    images: np.ndarray
    labels: list[str]
    ids: list[str]

    def subset(self, label: str | None) -> "ImageSet":
        if label is None:
            return self
        keep = [i for i, item in enumerate(self.labels) if item == label]
        return ImageSet(self.images[keep], [self.labels[i] for i in keep], [self.ids[i] for i in keep])


@dataclass
class Context:
    """State shared by the steps of one evaluation."""

    store: Any
    store_path: Path
    synthetic: list[SyntheticImage]
    config: EvalConfig
    device: Any = "cpu"  # torch.device of the extractors
    extractors: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # report material collected by the steps

    def rng(self, step: str) -> np.random.Generator:
        """Return a generator of its own for each step, so adding a step does not change the others."""
        return np.random.default_rng([self.config.seed, zlib.crc32(step.encode())])


def evaluate(real_store: Path, synthetic_dir: Path, out_dir: Path, config: EvalConfig) -> dict:
    """Run every evaluation step and write `out_dir/metrics.json` and `out_dir/report.html`; returns the metrics."""
    from preprocess.store import PyramidStore

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = Context(PyramidStore(real_store), Path(real_store), list_synthetic(synthetic_dir), config,
                      resolve_device(config.device))
    context.extractors = load_extractors(context)

    metrics: dict[str, Any] = {"inputs": {"real_store": str(Path(real_store).resolve()),
                                          "synthetic_dir": str(Path(synthetic_dir).resolve())},
                               "config": asdict(config)}
    metrics["counts"] = count_images(context)
    for name, step in (("global", global_metrics), ("patch", patch_metrics), ("diversity", diversity_metrics),
                       ("seams", seam_metrics), ("memorization", memorization_metrics)):
        step_start = time.perf_counter()
        metrics[name] = step(context)
        logger.info("%s metrics done in %.1f s", name, time.perf_counter() - step_start)
    collect_report_images(context)
    metrics["runtime_s"] = round(time.perf_counter() - started, 2)

    write_json(out_dir / "metrics.json", metrics)
    report.write_report(out_dir / "report.html", metrics, context.figures)
    return metrics


def load_extractors(context: Context) -> dict[str, Any]:
    """Build every configured extractor before any slow work, so a missing weights file fails at once."""
    config = context.config
    names = list(dict.fromkeys([*config.features.extractors, config.memorization.embedding]))
    encoder_path = Path(config.features.encoder_path) if config.features.encoder_path else \
        default_encoder_path(context.store_path)
    if "encoder" in names and not (encoder_path / "model.safetensors").is_file():
        if not config.encoder.auto_train:
            raise FileNotFoundError(f"no encoder at {encoder_path}; run `python cli.py eval train-encoder` or set "
                                    f"encoder.auto_train=true")
        logger.info("training the X-ray encoder into %s", encoder_path)
        train_encoder(context.store, context.store_path, config.encoder, config.seed, encoder_path, context.device)
    return {name: build_extractor(name, config.features, encoder_path) for name in names}


def count_images(context: Context) -> dict[str, Any]:
    """Real images per label and split, and synthetic images per label."""
    real: dict[str, dict[str, int]] = {}
    for row in context.store.rows():
        real.setdefault(row.label, {}).setdefault(row.split, 0)
        real[row.label][row.split] += 1
    synthetic: dict[str, int] = {}
    for image in context.synthetic:
        synthetic[image.label] = synthetic.get(image.label, 0) + 1
    return {"real": real, "synthetic": synthetic, "real_total": sum(sum(v.values()) for v in real.values()),
            "synthetic_total": len(context.synthetic)}


def read_global_sets(context: Context) -> tuple[ImageSet, ImageSet]:
    """Square views of sampled real images (configured split) and of every synthetic image."""
    settings = context.config.global_view
    rows = sample_rows(context.store, settings.split, settings.max_real, context.rng("global"))
    real = ImageSet(np.stack([real_view(context.store, row.image_id, row.levels, settings.view_size) for row in rows]),
                    [row.label for row in rows], [row.image_id for row in rows])
    fake = ImageSet(np.stack([synthetic_view(image, settings.view_size) for image in context.synthetic]),
                    [image.label for image in context.synthetic], [image.name for image in context.synthetic])
    return real, fake


DISTANCE_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage")


def distance_records(real: np.ndarray, fake: np.ndarray, context: Context, step: str) -> dict[str, Any]:
    """FID, KID and precision/recall/density/coverage of two feature tables, each a record."""
    settings = context.config.distance
    allow_small = context.config.allow_small
    records: dict[str, Any] = {"n_real": len(real), "n_synthetic": len(fake)}
    try:
        value = frechet_distance(real, fake, allow_small, context.device)
        interval = frechet_interval(real, fake, settings.fid_bootstrap, context.rng(step + "fid"), context.device)
        records["fid"] = computed(value, ci95=interval)
    except TooFewSamplesError as error:
        records["fid"] = not_computed(str(error))
    try:
        mean, std = kernel_distance(real, fake, settings.kid_subset_size, settings.kid_subsets,
                                    context.config.seed, allow_small)
        records["kid"] = computed(mean, std=std)
    except TooFewSamplesError as error:
        records["kid"] = not_computed(str(error))
    try:
        equal_real, equal_fake = equalize_counts(real, fake, context.rng(step + "prdc"))
        prdc = precision_recall_density_coverage(equal_real, equal_fake, settings.prdc_k, allow_small)
        for name in ("precision", "recall", "density", "coverage"):
            records[name] = computed(prdc[name], k=prdc["k"], n_each=prdc["n"])
    except TooFewSamplesError as error:
        for name in ("precision", "recall", "density", "coverage"):
            records[name] = not_computed(str(error))
    return records


def features_by_extractor(context: Context, real: np.ndarray, fake: np.ndarray) -> dict[str, tuple]:
    """Features of both image sets for every distance extractor; radiomics is z-scored with real statistics."""
    tables = {}
    for name in context.config.features.extractors:
        extractor = context.extractors[name]
        real_features = extract_features(extractor, real, context.config.features.batch_size, context.device)
        fake_features = extract_features(extractor, fake, context.config.features.batch_size, context.device)
        if name == "radiomics":
            real_features, fake_features = standardize(real_features, fake_features)
        tables[name] = (real_features, fake_features)
    return tables


def grouped_distances(context: Context, real: ImageSet, fake: ImageSet, step: str) -> dict[str, Any]:
    """Distances per extractor, overall ("all") and per label present in the synthetic set."""
    tables = features_by_extractor(context, real.images, fake.images)
    result: dict[str, Any] = {}
    for name, (real_features, fake_features) in tables.items():
        per_group = {"all": distance_records(real_features, fake_features, context, f"{step}{name}all")}
        for label in sorted(set(fake.labels)):
            real_mask = np.array([item == label for item in real.labels], bool)
            fake_mask = np.array([item == label for item in fake.labels], bool)
            if not real_mask.any():
                reason = f"no real image with label {label!r} in this sample of the store"
                per_group[label] = {"n_real": 0, "n_synthetic": int(fake_mask.sum()),
                                    **{metric: not_computed(reason) for metric in DISTANCE_METRICS}}
                continue
            per_group[label] = distance_records(real_features[real_mask], fake_features[fake_mask], context,
                                                f"{step}{name}{label}")
        result[name] = per_group
    return result


def intensity_and_spectrum(real: np.ndarray, fake: np.ndarray, context: Context) -> dict[str, Any]:
    """Histogram and power-spectrum curves of two image sets and the distances between them."""
    settings = context.config.statistics
    real_histogram = intensity_histogram(real, settings.histogram_bins)
    fake_histogram = intensity_histogram(fake, settings.histogram_bins)
    frequencies, real_power = radial_power_spectrum(real, settings.spectrum_bins)
    _, fake_power = radial_power_spectrum(fake, settings.spectrum_bins)
    return {"histogram": {"real": real_histogram, "synthetic": fake_histogram,
                          **histogram_distances(real_histogram, fake_histogram)},
            "spectrum": {"frequency_cycles_per_px": frequencies, "real_log10_power": real_power,
                         "synthetic_log10_power": fake_power, **spectrum_distance(real_power, fake_power)}}


def global_metrics(context: Context) -> dict[str, Any]:
    """Whole-image distances per extractor and label, and the histogram/spectrum of the global views."""
    real, fake = read_global_sets(context)
    context.figures["global_sets"] = (real, fake)
    result = {"view_size_px": context.config.global_view.view_size, "n_real": len(real.ids),
              "n_synthetic": len(fake.ids), "distances": grouped_distances(context, real, fake, "global")}
    result.update(intensity_and_spectrum(real.images, fake.images, context))
    return result


def patch_metrics(context: Context) -> dict[str, Any]:
    """Per pyramid level: distances, histograms and spectra of native-resolution crops."""
    settings = context.config.patch
    rows = context.store.rows(split=None if context.config.global_view.split == "all"
                              else context.config.global_view.split)
    result: dict[str, Any] = {"patch_size_px": settings.patch_size}
    for level in settings.levels:
        rng = context.rng(f"patch{level}")
        real_pixels, real_labels = real_crops(context.store, rows, level, settings.patch_size, settings.real_crops, rng)
        fake_pixels, fake_labels = synthetic_crops(context.synthetic, level, settings.patch_size,
                                                   settings.synthetic_crops, rng)
        if len(real_pixels) == 0 or len(fake_pixels) == 0:
            result[f"level_{level}"] = not_computed(
                f"no {'real' if len(real_pixels) == 0 else 'synthetic'} image is at least "
                f"{settings.patch_size} px on both sides at level {level}")
            continue
        real = ImageSet(real_pixels, real_labels, [""] * len(real_labels))
        fake = ImageSet(fake_pixels, fake_labels, [""] * len(fake_labels))
        entry = {"status": "computed", "n_real": len(real_pixels), "n_synthetic": len(fake_pixels),
                 "distances": grouped_distances(context, real, fake, f"patch{level}")}
        entry.update(intensity_and_spectrum(real_pixels, fake_pixels, context))
        result[f"level_{level}"] = entry
        context.figures.setdefault("patch_examples", {})[level] = (real_pixels[:6], fake_pixels[:6])
    return result


def mean_record(values: np.ndarray, rng: np.random.Generator, **extra: Any) -> dict[str, Any]:
    """Mean of pair values with a 95% bootstrap interval, or a not-computed record without pairs."""
    if len(values) == 0:
        return not_computed("fewer than 2 images, so there is no pair", **extra)
    interval = bootstrap_ci(values, lambda x: float(x.mean()), 1000, 0.95, rng)
    return computed(values.mean(), ci95=list(interval) if interval else None, n_pairs=len(values), **extra)


def diversity_metrics(context: Context) -> dict[str, Any]:
    """MS-SSIM and LPIPS between random pairs of synthetic images, next to the same for real pairs."""
    settings = context.config.diversity
    rng = context.rng("diversity")
    real_rows = sample_rows(context.store, context.config.global_view.split, max(2 * settings.pairs, 2), rng)
    sets = {"real": np.stack([real_view(context.store, row.image_id, row.levels, settings.view_size)
                              for row in real_rows]),
            "synthetic": np.stack([synthetic_view(image, settings.view_size) for image in context.synthetic])}
    lpips_model = None
    if settings.lpips_net != "none":
        lpips_model = LocalLPIPS(settings.lpips_net, settings.lpips_path, settings.lpips_sha256,
                                 context.config.features.weights_dir).to(context.device)
    result: dict[str, Any] = {"view_size_px": settings.view_size}
    for name, images in sets.items():
        pairs = pair_indices(len(images), settings.pairs, rng)
        entry = {"ms_ssim": mean_record(ms_ssim_pairs(images, pairs), rng) if settings.ms_ssim
                 else not_computed("diversity.ms_ssim is false")}
        entry["lpips"] = mean_record(lpips_pairs(lpips_model, images, pairs), rng, net=settings.lpips_net) \
            if lpips_model else not_computed("diversity.lpips_net is none (LPIPS needs local backbone weights)")
        result[name] = entry
    return result


def seam_metrics(context: Context) -> dict[str, Any]:
    """Seam score of each synthetic image from its sidecar tile grid, and their mean."""
    if not context.config.seam.enabled:
        return {"mean": not_computed("seam.enabled is false")}
    per_image = {}
    for image in context.synthetic:
        if not image.tile_grid:
            per_image[image.name] = not_computed("the sidecar has no tile_grid")
            continue
        score = seam_score(image.level(0), image.tile_grid, context.config.seam.band)
        per_image[image.name] = computed(score) if score is not None else \
            not_computed("no inner tile edge, or no gradient away from the edges")
    values = np.array([r["value"] for r in per_image.values() if r["status"] == "computed"])
    mean = computed(values.mean(), n=len(values)) if len(values) else not_computed("no image has a seam score")
    return {"mean": mean, "per_image": per_image, "band_px": context.config.seam.band}


def split_views(context: Context, split: str, size: int) -> ImageSet:
    """Square views of every image of a split (no subsampling: memorization compares all pairs)."""
    rows = sorted(context.store.rows(split=split), key=lambda row: row.image_id)
    images = np.stack([real_view(context.store, row.image_id, row.levels, size) for row in rows]) if rows \
        else np.zeros((0, size, size), np.float32)
    return ImageSet(images, [row.label for row in rows], [row.image_id for row in rows])


def embedding_rows(context: Context, train: ImageSet, test: ImageSet, fake: ImageSet) -> tuple[np.ndarray, ...]:
    """Unit-norm embeddings of the three sets; radiomics features are z-scored with the training statistics."""
    name = context.config.memorization.embedding
    batch = context.config.features.batch_size
    tables = [extract_features(context.extractors[name], s.images, batch, context.device)
              for s in (train, test, fake)]
    if name == "radiomics":
        mean, std = tables[0].mean(axis=0), tables[0].std(axis=0)
        std[std < 1e-12] = 1.0
        tables = [(table - mean) / std for table in tables]
    return tuple(unit_rows(table) for table in tables)


def memorization_metrics(context: Context) -> dict[str, Any]:
    """Nearest training image of each synthetic image by NCC and by embedding cosine, with calibrated thresholds."""
    settings = context.config.memorization
    size = settings.view_size
    train = split_views(context, "train", size)
    test = split_views(context, "test", size)
    calibration_split = "test"
    if len(test.ids) < 2:
        test, calibration_split = split_views(context, "val", size), "val"
    fake = ImageSet(np.stack([synthetic_view(image, size) for image in context.synthetic]),
                    [image.label for image in context.synthetic], [image.name for image in context.synthetic])
    if len(train.ids) == 0:
        return {"status": "not_computed", "reason": "the store has no image in the train split"}

    # An explicit width, because a split without images (a tiny store) has zero rows.
    flat = [normalise_rows(s.images.reshape(len(s.images), size * size)) for s in (train, test, fake)]
    rng = context.rng("memorization")
    tables = {"ncc": memorization_table("ncc", flat[2], flat[0], flat[1], fake.labels, settings.threshold_quantile, rng)}
    train_rows, test_rows, fake_rows = embedding_rows(context, train, test, fake)
    tables["embedding"] = memorization_table(f"cosine ({settings.embedding})", fake_rows, train_rows, test_rows,
                                             fake.labels, settings.threshold_quantile, rng)
    for table in tables.values():
        table["nearest_train_id"] = [train.ids[i] for i in table.pop("nearest_index")]
        table["synthetic_names"] = fake.ids

    flagged = sorted({fake.ids[i] for table in tables.values() for i, above in enumerate(table.get("above", []))
                      if above})
    order = np.argsort(-np.asarray(tables["ncc"]["nearest_similarity"]))[:settings.closest_pairs]
    pairs = [{"synthetic": fake.ids[i], "label": fake.labels[i], "train_id": tables["ncc"]["nearest_train_id"][i],
              "ncc": tables["ncc"]["nearest_similarity"][i],
              "cosine": tables["embedding"]["nearest_similarity"][i],
              "embedding_train_id": tables["embedding"]["nearest_train_id"][i]} for i in order]
    context.figures["closest_pairs"] = pairs
    return {"view_size_px": size, "calibration_split": calibration_split, "n_train": len(train.ids),
            "n_calibration": len(test.ids), **tables, "flagged": flagged, "closest_pairs": pairs}


def memorization_gate(metrics: dict[str, Any], max_share: float) -> tuple[bool, str]:
    """Return (passed, message) for release gating: every computed share above the threshold <= max_share."""
    memorization = metrics.get("memorization", {})
    problems = []
    for name in ("ncc", "embedding"):
        record = memorization.get(name, {}).get("share_above", {})
        if record.get("status") == "computed" and record["value"] > max_share:
            problems.append(f"{name}: {record['count']} of {record['n']} synthetic images above the threshold "
                            f"(share {record['value']:.3f} > {max_share})")
    if problems:
        return False, "memorization check failed: " + "; ".join(problems) + f"; flagged: {memorization.get('flagged')}"
    return True, "memorization check passed"


def collect_report_images(context: Context) -> None:
    """Thumbnails for the report: a grid per label (real and synthetic) and the closest pairs."""
    size = context.config.report.thumbnail_size
    count = context.config.report.images_per_label
    rng = context.rng("report")
    grids = {}
    for label in sorted(set(context.store.labels()) | {image.label for image in context.synthetic}):
        rows = sample_rows(context.store, "train", count, rng, label=label)
        grids[label] = {"real": [(row.image_id, real_view(context.store, row.image_id, row.levels, size))
                                 for row in rows],
                        "synthetic": [(image.name, synthetic_view(image, size))
                                      for image in context.synthetic if image.label == label][:count]}
    by_name = {image.name: image for image in context.synthetic}
    pair_images = []
    for pair in context.figures.get("closest_pairs", []):
        row = context.store.row(pair["train_id"])
        pair_images.append((pair, synthetic_view(by_name[pair["synthetic"]], size),
                            real_view(context.store, row.image_id, row.levels, size)))
    context.figures["grids"] = grids
    context.figures["pair_images"] = pair_images
