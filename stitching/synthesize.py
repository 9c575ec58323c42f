"""Native-size synthesis: global layout, then the patch model level by level, then files.

For image ``i`` of a run with seed ``s``:

1. the label is ``config.label`` or the labels in turn (``labels[i % len(labels)]``);
2. the native size (H, W) is ``config.size`` or drawn from the training sizes of the label;
3. the global model samples a layout at level L, the first level that fits it;
4. for ``l = L - k, L - 2k, ..., 0`` (k = the patch model's level gap) the level-``l + k``
   result is upsampled to level ``l`` (:func:`patchgen.conditioning.upsample_to`) and the
   patch model samples level ``l`` on a tiled canvas with global coordinates;
5. level 0 is written as PNG (and DICOM, OME-Zarr) with a JSON sidecar.

Every random draw is keyed by ``(s, i, level, ...)`` (``stitching.seeds``), so an image does
not depend on the tile batch, the order of images, or how images are sharded over processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchgen.conditioning import level_shape
from patchgen.networks import check_divisible
from patchgen.config import to_dict
from preprocess.normalise import to_store_uint16
from stitching.canvas import LevelJob, Tiling, base_grid, sample_level_diffusion, sample_level_gan
from stitching.config import SynthConfig
from stitching.seeds import Stream, numpy_rng, torch_generator
from stitching.storage import CanvasArray, CanvasStore, conditioning_canvas
from stitching.writers import (DicomInfo, checkpoint_sha256, software_version, write_dicom,
                               write_ome_zarr, write_png16, write_preview, write_sidecar)

logger = logging.getLogger(__name__)

WORK_FOLDER = ".work"
FILE_SUFFIXES = {"png": ".png", "dicom": ".dcm", "zarr": ".ome.zarr"}


@dataclass
class SynthesisSummary:
    """Outcome of a synthesize run: image names per outcome and the output folder."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, error message)

    def __str__(self) -> str:
        lines = [f"{len(self.written)} written, {len(self.skipped)} skipped (already complete), "
                 f"{len(self.failed)} failed in {self.out_dir}"]
        lines += [f"  failed {name}: {error}" for name, error in self.failed]
        return "\n".join(lines)


@dataclass(frozen=True)
class ImagePlan:
    """Name, label and size of one image of the run."""

    index: int
    label: str
    native_size: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.label}_{self.index:05d}"


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device; use auto, cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def plan_image(index: int, config: SynthConfig, global_sampler) -> ImagePlan:
    """Return the label and native size of image ``index``; both depend only on (seed, index)."""
    labels = list(global_sampler.labels)
    label = config.label if config.label is not None else labels[index % len(labels)]
    if label not in labels:
        raise ValueError(f"label {label!r} is not one of the global model's labels {labels}")

    native_size = config.native_size()
    if native_size is None:
        rng = numpy_rng(config.seed, index, 0, Stream.LABEL_AND_SIZE)
        native_size = tuple(global_sampler.draw_native_size(label, rng, config.min_megapixels,
                                                                config.max_megapixels))
    return ImagePlan(index, label, native_size)


# Largest tile, in training patch sizes. The canvas is padded to whole tiles, so a tile much
# larger than the image only costs memory and time. NOTE: 8 is a chosen bound, not a measured one.
MAX_TILE_FACTOR = 8


def tiling_for(config: SynthConfig, patch_sampler) -> Tiling:
    """Return the tiling of the canvas for a patch model (tile size defaults to its patch size).

    Raises:
        ValueError: for a tile size the UNet cannot take or one over ``MAX_TILE_FACTOR``
            patch sizes.
    """
    canvas = config.canvas
    tile_size = canvas.tile_size or patch_sampler.patch_size
    channels = getattr(patch_sampler, "network_channels", None)
    if channels:
        check_divisible(tile_size, channels, "canvas.tile_size")
    largest = MAX_TILE_FACTOR * patch_sampler.patch_size
    if tile_size > largest:
        raise ValueError(f"canvas.tile_size={tile_size} is above {largest} pixels "
                         f"({MAX_TILE_FACTOR} x the patch model's {patch_sampler.patch_size}-pixel "
                         f"patches); use a smaller tile")
    return Tiling(tile_size=tile_size, overlap=canvas.overlap,
                  tile_batch=canvas.tile_batch, grid_shift=canvas.grid_shift,
                  window_floor=canvas.window_floor, align=2 ** patch_sampler.level_gap)


def patch_levels(layout_level: int, level_gap: int) -> tuple[int, list[int]]:
    """Return the level the patch chain starts from and the levels it samples, coarse to fine.

    The chain steps by ``level_gap`` and must end at level 0, so it starts at the multiple of
    ``level_gap`` at or above the layout level.
    """
    start = -(-layout_level // level_gap) * level_gap
    return start, list(range(start - level_gap, -1, -level_gap))


def start_canvas(layout: np.ndarray, layout_shape: tuple[int, int],
                 start_shape: tuple[int, int]) -> np.ndarray:
    """Return the layout in model space [-1, 1] at the level the patch chain starts from.

    NOTE: a start level above the layout level (level gap 2, odd layout level) is reached by
    area averaging, not by the pyramid's own downsampling.
    """
    if tuple(layout.shape) != tuple(layout_shape):
        raise ValueError(f"global model returned a layout of shape {layout.shape}, expected "
                         f"{layout_shape}")
    canvas = layout.astype(np.float32) * 2.0 - 1.0
    if tuple(start_shape) == tuple(layout_shape):
        return canvas
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(canvas)[None, None], start_shape)
    return pooled[0, 0].numpy()


def sample_native(global_sampler, patch_sampler, plan: ImagePlan, config: SynthConfig,
                  store: CanvasStore, device: torch.device) -> tuple[CanvasArray, dict[str, Any]]:
    """Sample one image at native size.

    Returns:
        The level-0 canvas in model space (its top-left (H, W) is the image, about [-1, 1])
        and facts for the sidecar: level shapes and the level-0 tile grid.
    """
    seed, index = config.seed, plan.index
    layout_level = global_sampler.layout_level(plan.native_size)
    gap = patch_sampler.level_gap
    start, levels = patch_levels(layout_level, gap)
    shapes = [level_shape(plan.native_size, level) for level in range(max(start, layout_level) + 1)]

    # Global layout at level L, then the start level of the patch chain.
    generator = torch_generator(seed, index, layout_level, Stream.LAYOUT)
    layout = global_sampler.sample_layout(plan.label, plan.native_size, generator,
                                          steps=config.layout.steps,
                                          guidance_scale=config.layout.guidance_scale)
    current: CanvasArray = start_canvas(layout, shapes[layout_level], shapes[start])

    # Patch model, level by level, conditioned on the level above.
    tiling = tiling_for(config, patch_sampler)
    label_index = patch_sampler.label_index(plan.label)
    for level in levels:
        job = LevelJob(shapes[level], level, label_index, seed, index)
        canvas_shape = base_grid(job, tiling).canvas_shape
        cond = conditioning_canvas(current, shapes[level + gap], shapes[level], canvas_shape,
                                   2 ** gap, store)
        logger.debug("%s: level %d, %dx%d pixels", plan.name, level, *shapes[level])
        if patch_sampler.kind == "diffusion":
            scheduler = patch_sampler.make_scheduler(config.patch.steps)
            current = sample_level_diffusion(patch_sampler.denoise_fn, scheduler, cond, job, tiling,
                                             store, device, eta=config.patch.eta,
                                             strength=config.patch.strength)
        else:
            current = sample_level_gan(patch_sampler.gan_fn, patch_sampler.noise_channels, cond, job,
                                       tiling, store, device)
        del cond

    # Level 0 comes from the layout itself when the native size fits the global model.
    grid = base_grid(LevelJob(shapes[0], 0, label_index, seed, index), tiling)
    origins = [list(origin) for origin in grid.origins] if 0 in levels else []
    facts = {"levels": [list(shape) for shape in shapes],
             "tile_grid": {"level": 0, "tile_size": grid.tile_size, "overlap": grid.overlap,
                           "align": grid.align, "grid_shift": tiling.grid_shift,
                           "patch_levels": levels, "origins_yx": origins}}
    return current, facts


def to_uint16(canvas: CanvasArray, image_shape: tuple[int, int], band_rows: int) -> np.ndarray:
    """Convert the model-space image region of a canvas to store values, band by band."""
    height, width = image_shape
    pixels = np.empty((height, width), dtype=np.uint16)
    for top in range(0, height, band_rows):
        rows = slice(top, min(top + band_rows, height))
        band = np.asarray(canvas[rows, :width], dtype=np.float32)
        pixels[rows] = to_store_uint16((band + 1.0) / 2.0)
    return pixels


def output_paths(out_dir: Path, name: str, formats: list[str]) -> dict[str, Path]:
    """Return the path of every file of image ``name``, keyed by kind."""
    paths = {kind: out_dir / f"{name}{FILE_SUFFIXES[kind]}" for kind in formats}
    if "png" in formats:
        paths["preview"] = out_dir / f"{name}.preview.png"
    paths["sidecar"] = out_dir / f"{name}.json"
    return paths


def file_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder (an OME-Zarr store), in bytes."""
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, or of every file under a folder with its relative path, in order."""
    digest = hashlib.sha256()
    files = sorted(item for item in path.rglob("*") if item.is_file()) if path.is_dir() else [path]
    for item in files:
        if path.is_dir():
            digest.update(item.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(item, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """Return the JSON record of a sidecar, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def stale_files(paths: dict[str, Path], record: dict[str, Any]) -> set[str]:
    """Return the kinds of file that are missing or differ from the sidecar's record.

    The sidecar is written last and records the byte size and SHA-256 of every file, so a
    file that is missing, truncated or otherwise changed since is stale. Sizes are compared
    first, so a truncated file is not hashed.
    """
    sizes = record.get("file_bytes") if isinstance(record.get("file_bytes"), dict) else {}
    digests = record.get("file_sha256") if isinstance(record.get("file_sha256"), dict) else {}
    return {kind for kind, path in paths.items() if kind != "sidecar"
            and (not path.exists() or sizes.get(kind) != file_bytes(path)
                 or digests.get(kind) != file_sha256(path))}


# Settings that change the pixels of an image. The others (tile batch, device, shards, output
# formats, where canvases live) change only how an image is computed or stored.
PIXEL_SETTINGS = ("layout", "patch", "canvas.tile_size", "canvas.overlap", "canvas.grid_shift",
                  "canvas.window_floor")


def pixel_settings(config: dict[str, Any]) -> dict[str, Any]:
    """Return the pixel-changing settings of a resolved config as {dotted key: value}."""
    settings = {}
    for key in PIXEL_SETTINGS:
        section, _, name = key.partition(".")
        value = config.get(section, {})
        if not name and isinstance(value, dict):
            settings.update({f"{section}.{inner}": item for inner, item in value.items()})
        elif isinstance(value, dict):
            settings[key] = value.get(name)
    return settings


def check_same_plan(record: dict[str, Any], sidecar: Path, plan: ImagePlan, config: SynthConfig,
                    checkpoints: dict[str, str]) -> None:
    """Raise ValueError when the sidecar ``record`` shows other settings or models.

    Compared: seed, label, size, the settings that change pixels and the SHA-256 of both
    checkpoints (``checkpoints`` maps "global" and "patch" to them). ``sidecar`` is the path
    named in the message.
    """
    expected = {"seed": config.seed, "label": plan.label, "height": plan.native_size[0],
                "width": plan.native_size[1]}
    found = {key: record.get(key) for key in expected}
    expected.update(pixel_settings(to_dict(config)))
    found.update(pixel_settings(record.get("config") or {}))
    for model, digest in checkpoints.items():
        expected[f"{model} checkpoint"] = digest[:12]
        found[f"{model} checkpoint"] = ((record.get("checkpoints") or {}).get(model) or {}).get(
            "sha256", "")[:12]
    differing = {key: (found.get(key), value) for key, value in expected.items()
                 if found.get(key) != value}
    if differing:
        details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differing.items())
        raise ValueError(f"{sidecar} was written with other settings ({details}); rerun with "
                         f"the same settings and models to resume, or choose a new --out folder")


def write_image_files(paths: dict[str, Path], pixels: np.ndarray, plan: ImagePlan,
                      spacing_mm: float | None, config: SynthConfig,
                      kinds: set[str] | None = None) -> None:
    """Write the PNG, preview, DICOM and OME-Zarr files of one image (not the sidecar).

    ``kinds`` limits the files written, e.g. {"preview", "dicom"}; None writes all of them.
    """
    def selected(kind: str) -> bool:
        return kind in paths and (kinds is None or kind in kinds)

    if selected("png"):
        write_png16(paths["png"], pixels)
    if selected("preview"):
        write_preview(paths["preview"], pixels, config.output.preview_max_side)
    if selected("dicom"):
        info = DicomInfo(plan.name, plan.label, plan.index, spacing_mm, software_version())
        write_dicom(paths["dicom"], pixels, info)
    if selected("zarr"):
        write_ome_zarr(paths["zarr"], pixels, plan.name, spacing_mm)


def file_records(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Return the sidecar's "files", "file_bytes" and "file_sha256" entries for ``paths``."""
    kinds = [kind for kind in paths if kind != "sidecar"]
    return {"files": {kind: paths[kind].name for kind in kinds},
            "file_bytes": {kind: file_bytes(paths[kind]) for kind in kinds},
            "file_sha256": {kind: file_sha256(paths[kind]) for kind in kinds}}


class Synthesizer:
    """Global and patch samplers plus everything shared by the images of one run.

    ``global_sampler`` and ``patch_sampler`` follow the interfaces of
    ``patchgen.inference.GlobalSampler`` and ``PatchSampler``.
    """

    def __init__(self, global_sampler, patch_sampler, out_dir: Path, config: SynthConfig,
                 device: torch.device):
        self.out_dir = Path(out_dir)
        self.config = config
        self.device = device
        self.global_sampler = global_sampler
        self.patch_sampler = patch_sampler
        self.work_root = self.out_dir / WORK_FOLDER
        self._checkpoints: dict[str, dict[str, str]] = {}

    def checkpoint(self, path: Path) -> dict[str, str]:
        """Return {"path", "sha256"} of a checkpoint, hashing each path once."""
        key = str(path)
        if key not in self._checkpoints:
            self._checkpoints[key] = {"path": key, "sha256": checkpoint_sha256(Path(path))}
        return self._checkpoints[key]

    def global_checkpoint(self, label: str) -> Path:
        """Return the checkpoint of the global model that samples ``label``."""
        sampler = self.global_sampler
        if hasattr(sampler, "checkpoint_path"):
            return Path(sampler.checkpoint_path)
        paths = [Path(p) for p in sampler.checkpoint_paths]
        # One model per class is stored as RUN/<label>/model.
        matching = [p for p in paths if p.parent.name == label]
        return matching[0] if matching else paths[0]

    def checkpoint_digests(self, plan: ImagePlan) -> dict[str, str]:
        """Return the SHA-256 of the global and patch checkpoints that make ``plan``."""
        return {"global": self.checkpoint(self.global_checkpoint(plan.label))["sha256"],
                "patch": self.checkpoint(self.patch_sampler.checkpoint_path)["sha256"]}

    def run_image(self, plan: ImagePlan) -> str:
        """Synthesize and write one image; returns "written", or "skipped" when already complete."""
        paths = output_paths(self.out_dir, plan.name, self.config.output.formats)
        record = read_sidecar(paths["sidecar"])
        if record is not None:
            stale = stale_files(paths, record)
            # An intact PNG lets the other files be written again without sampling.
            if not stale or ("png" in paths and "png" not in stale):
                check_same_plan(record, paths["sidecar"], plan, self.config,
                                self.checkpoint_digests(plan))
                if not stale:
                    return "skipped"
                self.rewrite_from_png(paths, plan, record, stale)
                return "written"

        started = time.perf_counter()
        work_dir = self.work_root / plan.name
        canvas = self.config.canvas
        store = CanvasStore(work_dir, canvas.disk_megapixels * 1e6, canvas.band_rows)
        try:
            result, facts = sample_native(self.global_sampler, self.patch_sampler, plan, self.config,
                                          store, self.device)
            pixels = to_uint16(result, plan.native_size, canvas.band_rows)
            del result
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

        spacing_mm = self.global_sampler.spacing_mm(plan.label)
        write_image_files(paths, pixels, plan, spacing_mm, self.config)
        record = {
            "name": plan.name, "label": plan.label, "seed": self.config.seed,
            "image_index": plan.index, "height": plan.native_size[0], "width": plan.native_size[1],
            "spacing_mm": spacing_mm, **facts,
            "checkpoints": {"global": self.checkpoint(self.global_checkpoint(plan.label)),
                            "patch": self.checkpoint(self.patch_sampler.checkpoint_path)},
            "config": to_dict(self.config), "software_version": software_version(),
            **file_records(paths),
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_sidecar(paths["sidecar"], record)
        return "written"

    def rewrite_from_png(self, paths: dict[str, Path], plan: ImagePlan, record: dict[str, Any],
                         stale: set[str]) -> None:
        """Write the ``stale`` preview, DICOM and OME-Zarr files from the intact saved PNG."""
        with Image.open(paths["png"]) as image:
            pixels = np.asarray(image).astype(np.uint16)
        write_image_files(paths, pixels, plan, record.get("spacing_mm"), self.config, stale)
        record.setdefault("config", {})["output"] = to_dict(self.config)["output"]
        record.update(file_records(paths))
        write_sidecar(paths["sidecar"], record)
        logger.info("%s: rewrote %s from the saved PNG", plan.name, ", ".join(sorted(stale)))


def check_labels(global_sampler, patch_sampler, label: str | None) -> None:
    """Raise ValueError unless both models know ``label`` (or every global label when None)."""
    labels = list(global_sampler.labels)
    if label is not None and label not in labels:
        raise ValueError(f"label {label!r} is not one of the global model's labels {labels}; "
                         f"pass one of them with --label")
    for name in ([label] if label is not None else labels):
        patch_sampler.label_index(name)  # raises ValueError naming the patch model's labels


def synthesize(global_run: Path, patch_run: Path, out_dir: Path, config: SynthConfig,
               progress: bool = True) -> SynthesisSummary:
    """Load a global and a patch run and synthesize ``config.n`` images into ``out_dir``.

    See :func:`synthesize_with` for what is written, skipped and reported.
    """
    from patchgen.inference import load_global, load_patch

    device = resolve_device(config.device)
    global_sampler = load_global(Path(global_run), device)
    patch_sampler = load_patch(Path(patch_run), device)
    return synthesize_with(global_sampler, patch_sampler, out_dir, config, device, progress)


def synthesize_with(global_sampler, patch_sampler, out_dir: Path, config: SynthConfig,
                    device: torch.device | None = None, progress: bool = True) -> SynthesisSummary:
    """Synthesize ``config.n`` native-size images into ``out_dir`` with loaded samplers.

    Images already complete (sidecar and files present) are skipped, so rerunning the same
    command finishes an interrupted run. A failure of one image is logged and reported in
    the summary, and the other images go on. With ``shard_count`` > 1 this process writes
    only the images ``i`` with ``i % shard_count == shard_index``.
    """
    from tqdm.auto import tqdm

    check_labels(global_sampler, patch_sampler, config.label)
    tiling_for(config, patch_sampler)  # raises ValueError for a tiling that fits no image
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if device is not None else resolve_device(config.device)
    synthesizer = Synthesizer(global_sampler, patch_sampler, out_dir, config, device)
    summary = SynthesisSummary(out_dir)
    indices = range(config.shard_index, config.n, config.shard_count)
    if not indices:
        logger.warning("shard %d/%d has no image: n=%d images are indices 0 to %d", config.shard_index,
                       config.shard_count, config.n, config.n - 1)

    for index in tqdm(indices, desc="synthesize", unit="image", disable=not progress):
        name = f"image {index}"
        try:
            plan = plan_image(index, config, global_sampler)
            name = plan.name
            outcome = synthesizer.run_image(plan)
        except Exception as error:  # one image's failure must not stop the others
            if isinstance(error, (ValueError, FileNotFoundError)):  # messages that name the fix
                logger.error("%s failed: %s", name, error)
            else:
                logger.exception("%s failed", name)
            summary.failed.append((name, f"{type(error).__name__}: {error}"))
            continue
        (summary.written if outcome == "written" else summary.skipped).append(name)
        logger.info("%s %s", name, outcome)

    shutil.rmtree(synthesizer.work_root, ignore_errors=True)
    return summary
